"""Measurements behind the torch backend's two choices — the tanh form and the block size — and its speed next to
the eager reference, on this machine. Writes JSON to benchmarks/results/ and prints a table.

    python -m benchmarks.tune_torch_backend [--quick]

Wall-clock medians after one warm-up call, with the thread count recorded (CPU timing; the GPU suite with device
events is `attn-fast bench`). Every timed configuration is first checked against the float64 reference.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import time

import torch

from attn_fast.backends import torch_backend
from attn_fast.backends.common import DEFAULT_CHUNK_ELEMENTS
from attn_fast.cpu_warmup import warm_cpu_math
from attn_fast.functional import additive_attention_reference
from attn_fast.tolerances import forward_tolerance, relative_error
from attn_fast.tools.bench.shapes import NAMED_SHAPES
from attn_fast.tools.testing import random_case
from attn_fast.validation import attention_call

#: (B, T, S, A, D): the issue's measurement point (tuning only), then the bench's named shapes.
SHAPES = {"issue_point": (8, 256, 512, 512, 64), **{name: shape.sizes for name, shape in NAMED_SHAPES.items()}}
CHUNKS = (1 << 18, 1 << 20, 1 << 22)


def cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: first-touch page faults, allocator growth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_only(function, case):
    def run():
        function(*case.inputs(), **case.options())
    return run


def forward_backward(function, case):
    def run():
        leaves = case.cast(torch.float32, requires_grad=True)
        context, _ = function(*leaves.inputs(), **leaves.options())
        context.sum().backward()
    return run


def checked(function, case, expected) -> None:
    """Refuse to time a configuration that is wrong."""
    actual, _ = function(*case.inputs(), **case.options())
    error = relative_error(actual, expected)
    if error > forward_tolerance(torch.float32):
        raise AssertionError(f"relative error {error:.2e} before timing")


def print_summary(rows: list[dict]) -> None:
    """Per shape: the default torch backend against the eager reference, forward and forward + backward."""
    default = f"torch/factorized/chunk={DEFAULT_CHUNK_ELEMENTS}"
    print(f"\n{'shape':<12} {'(B, T, S, A, D)':<24} {'eager fwd':>10} {'torch fwd':>10} {'speed-up':>8} "
          f"{'eager f+b':>10} {'torch f+b':>10} {'speed-up':>8}")
    for shape in dict.fromkeys(row["shape"] for row in rows):
        eager = next(row for row in rows if row["shape"] == shape and row["variant"] == "reference")
        ours = next(row for row in rows if row["shape"] == shape and row["variant"] == default)
        print(f"{shape:<12} {str(tuple(eager['sizes'])):<24} {eager['forward_s'] * 1e3:>8.1f}ms "
              f"{ours['forward_s'] * 1e3:>8.1f}ms {eager['forward_s'] / ours['forward_s']:>7.1f}x "
              f"{eager['forward_backward_s'] * 1e3:>8.1f}ms {ours['forward_backward_s'] * 1e3:>8.1f}ms "
              f"{eager['forward_backward_s'] / ours['forward_backward_s']:>7.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip the largest eager runs")
    parser.add_argument("--out",
                        default=str(pathlib.Path(__file__).parent / "results" / "cpu-torch-backend-tuning.json"))
    args = parser.parse_args()
    warm_cpu_math()
    repeats = 3 if args.quick else 5
    rows = []
    for shape_name, sizes in SHAPES.items():
        case = random_case(*sizes, mask="lengths", seed=0)
        oracle = case.cast(torch.float64)
        expected, _ = additive_attention_reference(*oracle.inputs(), **oracle.options())
        del oracle
        variants = {"reference": additive_attention_reference}
        for form in ("direct", "factorized"):
            for chunk in CHUNKS:
                variants[f"torch/{form}/chunk={chunk}"] = (
                    lambda *a, form=form, chunk=chunk, **k: torch_backend.attend(
                        attention_call(*a, **k), tanh_form=form, chunk_elements=chunk))
        for name, function in variants.items():
            checked(function, case, expected)
            forward = median_seconds(forward_only(function, case), repeats)
            row = {"shape": shape_name, "sizes": sizes, "variant": name, "forward_s": forward}
            if name == "reference" or name.endswith(f"chunk={DEFAULT_CHUNK_ELEMENTS}"):
                row["forward_backward_s"] = median_seconds(forward_backward(function, case), repeats)
            rows.append(row)
            print(f"{shape_name:<12} {name:<34} fwd {forward * 1e3:9.1f} ms"
                  + (f"   fwd+bwd {row['forward_backward_s'] * 1e3:9.1f} ms" if "forward_backward_s" in row else ""),
                  flush=True)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": cpu_model(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "method": "wall-clock median after one warm-up, float32, key_lengths mask, CPU",
        "rows": rows,
    }
    print_summary(rows)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
