"""A/B in one process: the fused numba tanh pass of the backward (attn_fast/backends/cpu_kernels/backward.py)
against the torch backend's backward op, at the named bench shapes, `key_lengths` mask.

    python -m benchmarks.cpu_backward_tanh_pass [--threads 2] [--calls 5] [--shapes caption,long]
                                               [--dtype fp32|fp64] [--form factorized|direct]
    python -m benchmarks.cpu_backward_tanh_pass --micro     # the per-element costs behind the kernel's choices
    python -m benchmarks.cpu_backward_tanh_pass --first-call   # compile (empty numba cache) and cached first calls

Per shape: P from the torch backend's forward op, dE = common.grad_of_scores(P, value, dO) with a random dO; then,
alternating call by call so that drift in the machine's speed hits both, (a) `tanh_pass_grads` on dE and
(b) the torch backend's backward op (attn_fast::torch_backward, which recomputes dE from P and dO with
grad_of_scores — timed apart here, (c), so that its tanh pass is (b) - (c)). Both results are compared first
(relative error of each gradient). Printed: medians of wall time and of process CPU time (user + system of all
threads: less sensitive to other processes on the machine than wall time, but inflated by threads that spin while
a sibling is descheduled), the minimum wall time of each, and the tanh elements per second of the kernel (visible
(step, key) pairs x A / median wall time).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np
import torch

from attn_fast.backends import common
from attn_fast.backends.cpu_kernels.backward import FASTMATH, tanh_pass_grads, vector_exp, vector_reciprocal
from attn_fast.cpu_warmup import warm_cpu_math
from attn_fast.tolerances import relative_error
from attn_fast.tools.bench.shapes import NAMED_SHAPES, ProblemShape, make_inputs

#: The named shapes, their decode steps, and the long shape at B = 2 (2 rows on 2 threads: the split of a row's keys
#: between threads).
SHAPES = {
    **NAMED_SHAPES,
    **{f"{name}_step": shape.decode_step() for name, shape in NAMED_SHAPES.items() if shape.tgt_len > 1},
    "long_b2": ProblemShape("long_b2", 2, 400, 400, 256, 256),
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(shape: ProblemShape, calls: int, threads: int, dtype: torch.dtype, form: str) -> dict:
    case = make_inputs(shape, dtype, "cpu", seed=0)
    query, keys, value, v = case.inputs()
    lengths = case.key_lengths
    chunk = common.DEFAULT_CHUNK_ELEMENTS
    torch_forward = torch.ops.attn_fast.torch_forward
    torch_backward = torch.ops.attn_fast.torch_backward
    _, probs = torch_forward(query, keys, value, v, None, lengths, None, None, False, form, chunk, None)
    grad_context = torch.randn(shape.batch, shape.tgt_len, shape.value_dim, dtype=dtype,
                               generator=torch.Generator().manual_seed(1))
    grad_scores, _ = common.grad_of_scores(probs, value, None, grad_context, None, need_value_grad=True)
    key_limits = lengths.clamp(0, shape.src_len).to(torch.int64).numpy()
    arrays = [tensor.contiguous().numpy() for tensor in (query, keys, v, grad_scores)]

    def kernel():
        return tanh_pass_grads(arrays[0], arrays[1], None, None, arrays[2], arrays[3], key_limits, False,
                               form == "factorized", threads)

    def torch_op():
        return torch_backward(grad_context, None, query, keys, value, v, None, None, probs, False, form, chunk,
                              lengths)

    def scores_only():
        return common.grad_of_scores(probs, value, None, grad_context, None, need_value_grad=True)

    ours, theirs = kernel(), torch_op()
    errors = {name: relative_error(torch.from_numpy(mine), reference)
              for name, mine, reference in zip(("query", "keys", "v"), ours, (theirs[0], theirs[1], theirs[3]))}
    runs = {"kernel": kernel, "torch_op": torch_op, "grad_of_scores": scores_only}
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(calls):
        for name, run in runs.items():
            start_cpu, start = cpu_seconds(), time.perf_counter()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - start_cpu)
    medians = {name: statistics.median(samples) for name, samples in wall.items()}
    minima = {name: min(samples) for name, samples in wall.items()}
    cpu_medians = {name: statistics.median(samples) for name, samples in cpu.items()}
    visible_pairs = int(key_limits.sum()) * shape.tgt_len
    torch_tanh_pass = medians["torch_op"] - medians["grad_of_scores"]
    return {"errors": errors, "wall_ms": {k: 1e3 * s for k, s in medians.items()},
            "cpu_ms": {k: 1e3 * s for k, s in cpu_medians.items()},
            "min_ms": {k: 1e3 * s for k, s in minima.items()},
            "speedup_of_minima": (minima["torch_op"] - minima["grad_of_scores"]) / minima["kernel"],
            "kernel_gelem_s": visible_pairs * shape.attn_dim / medians["kernel"] / 1e9,
            "kernel_gelem_s_at_min": visible_pairs * shape.attn_dim / minima["kernel"] / 1e9,
            "kernel_gelem_cpu_s": visible_pairs * shape.attn_dim / cpu_medians["kernel"] / 1e9,
            "speedup_vs_tanh_pass": torch_tanh_pass / medians["kernel"]}


def _element_loops(dtype):
    """The factorized hot loop's element with a divide and with `vector_reciprocal`; libm exp and `vector_exp`."""
    one, weight = dtype(1.0), dtype(0.3)

    @numba.njit(fastmath=FASTMATH)
    def with_divide(eq, ek, grads, sums, rounds):
        for _ in range(rounds):
            for a in range(eq.shape[0]):
                r = one / (one + eq[a] * ek[a])
                sums[a] += weight * r
                grads[a] += weight * (r - r * r)

    @numba.njit(fastmath=FASTMATH)
    def with_newton(eq, ek, grads, sums, rounds):
        for _ in range(rounds):
            for a in range(eq.shape[0]):
                r = vector_reciprocal(one + eq[a] * ek[a])
                sums[a] += weight * r
                grads[a] += weight * (r - r * r)

    @numba.njit(fastmath=FASTMATH)
    def libm_exp(x, out, rounds):
        for _ in range(rounds):
            for a in range(x.shape[0]):
                out[a] = np.exp(x[a])

    @numba.njit(fastmath=FASTMATH)
    def polynomial_exp(x, out, rounds):
        for _ in range(rounds):
            for a in range(x.shape[0]):
                out[a] = vector_exp(x[a])

    return with_divide, with_newton, libm_exp, polynomial_exp


def micro(rounds: int = 20000, width: int = 256) -> None:
    """Single thread, L1-resident rows of `width` elements, process CPU time per element (min of 5 interleaved
    runs), and the largest error of each function against float64/longdouble over its whole input range."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        loops = _element_loops(dtype)
        eq, ek = (rng.uniform(0.0, 3.0, width).astype(dtype) for _ in range(2))
        x = rng.uniform(-80.0, 80.0, width).astype(dtype)
        args = {0: (eq, ek, np.zeros(width, dtype), np.zeros(width, dtype)), 1: None, 2: (x, np.empty_like(x))}
        args[1], args[3] = args[0], args[2]
        for index, loop in enumerate(loops):
            loop(*args[index], 1)  # compile
        best = [float("inf")] * 4
        for _ in range(5):
            for index, loop in enumerate(loops):
                start = cpu_seconds()
                loop(*args[index], rounds)
                best[index] = min(best[index], cpu_seconds() - start)
        per_element = [1e9 * seconds / (rounds * width) for seconds in best]
        # Accuracy over the ranges the kernel uses: 1 + e^{2q} e^{2k} in [1, 1e30), 2x in the exp-safe range.
        denominators = (1.0 + np.exp(rng.uniform(-80.0, 69.0, 1 << 20))).astype(dtype)
        exponents = rng.uniform(-80.0, 80.0, 1 << 20).astype(dtype)
        reciprocals, exps = np.empty_like(denominators), np.empty_like(exponents)
        _fill(denominators, reciprocals, exponents, exps)
        eps = float(np.finfo(dtype).eps)
        exact_reciprocal = 1.0 / denominators.astype(np.longdouble)
        exact_exp = np.exp(exponents.astype(np.longdouble))
        reciprocal_ulps = float(np.max(np.abs(reciprocals - exact_reciprocal) / exact_reciprocal)) / eps
        exp_ulps = float(np.max(np.abs(exps - exact_exp) / exact_exp)) / eps
        print(f"{np.dtype(dtype).name}: element with divide {per_element[0]:.3f} ns, with vector_reciprocal "
              f"{per_element[1]:.3f} ns; libm exp {per_element[2]:.3f} ns, vector_exp {per_element[3]:.3f} ns "
              f"(ns per element, 1 thread, CPU time); max error vector_reciprocal {reciprocal_ulps:.2f} eps, "
              f"vector_exp {exp_ulps:.2f} eps")


@numba.njit(fastmath=FASTMATH)
def _fill(denominators, reciprocals, exponents, exps):
    for n in range(denominators.shape[0]):
        reciprocals[n] = vector_reciprocal(denominators[n])
        exps[n] = vector_exp(exponents[n])


#: Run in a fresh process: the first call of each dtype, wall and CPU seconds, after the import.
_FIRST_CALL = """
import resource, time
start = time.perf_counter()
import numpy as np
from attn_fast.backends.cpu_kernels.backward import tanh_pass_grads
parts = [f"import (torch, numba, attn_fast) {time.perf_counter() - start:.2f} s"]
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
for dtype in (np.float32, np.float64):
    rng = np.random.default_rng(0)
    query, keys = rng.standard_normal((2, 3, 8)).astype(dtype), rng.standard_normal((2, 5, 8)).astype(dtype)
    v, grad_scores = rng.standard_normal(8).astype(dtype), rng.standard_normal((2, 3, 5)).astype(dtype)
    start_cpu, start = cpu(), time.perf_counter()
    tanh_pass_grads(query, keys, None, None, v, grad_scores, np.array([5, 5]), False, True, 2)
    wall, used = time.perf_counter() - start, cpu() - start_cpu
    parts.append(f"first {np.dtype(dtype).name} call {wall:.2f} s wall, {used:.2f} s CPU")
print("; ".join(parts))
"""


def first_call() -> None:
    """Two fresh processes sharing an empty numba cache directory: the first compiles, the second loads."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("empty cache", "cache written"):
            result = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True,
                                    check=True)
            print(f"{label}: {result.stdout.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dtype", choices=("fp32", "fp64"), default="fp32")
    parser.add_argument("--form", choices=("factorized", "direct"), default="factorized")
    parser.add_argument("--micro", action="store_true", help="per-element costs and errors of the kernel's pieces")
    parser.add_argument("--first-call", action="store_true", help="compile time and first call of a fresh process")
    args = parser.parse_args()
    if args.micro:
        micro()
        return
    if args.first_call:
        first_call()
        return
    torch.set_num_threads(args.threads)
    warm_cpu_math()
    print(f"torch {torch.__version__}, numpy {np.__version__}, {args.threads} thread(s), {args.calls} alternating "
          f"calls each, {args.dtype}, {args.form}, key_lengths mask; medians (wall ms | process CPU ms), minima")
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        result = measure(shape, args.calls, args.threads, dtype, args.form)
        wall, cpu, least = result["wall_ms"], result["cpu_ms"], result["min_ms"]
        errors = ", ".join(f"{key} {value:.1e}" for key, value in result["errors"].items())
        print(f"{name:<16} {shape.sizes}: kernel {wall['kernel']:8.2f} | {cpu['kernel']:8.2f}   torch backward op "
              f"{wall['torch_op']:8.2f} | {cpu['torch_op']:8.2f}   its grad_of_scores {wall['grad_of_scores']:6.2f}"
              f"   min {least['kernel']:.2f} vs {least['torch_op']:.2f} - {least['grad_of_scores']:.2f}"
              f"   -> kernel {result['speedup_vs_tanh_pass']:.1f}x the torch tanh pass (of minima "
              f"{result['speedup_of_minima']:.1f}x), "
              f"{result['kernel_gelem_s']:.2f} Gelem/s wall ({result['kernel_gelem_s_at_min']:.2f} at min), "
              f"{result['kernel_gelem_cpu_s']:.2f} per CPU-s;"
              f" vs torch: {errors}")


if __name__ == "__main__":
    main()
