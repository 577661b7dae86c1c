"""Thread scaling on CPU: the same cases timed with 1 thread and with the run's thread count, back to back.

For each (shape, mode) of the run and each backend asked for (by default the fused "cpu" backend, issue 13), the
case is built once and, at each thread count in turn, checked against the float64 reference (a parallel kernel can
be right on one thread and wrong on two) and timed like every bench case (`timing.time_cpu`). The speed-up is
t(1 thread) / t(n threads) and the efficiency that over n; next to them the CPU limit's own speed-up at the same
counts (`cpu_limit`), which says how much of the second core the machine actually gave at that moment.

Threads: `torch.set_num_threads(n)` for the call; the fused CPU kernels take numba's thread count from torch's at
every launch (`attn_fast.backends.cpu_kernels.use_torch_threads`), so one setting governs both. The previous count
is restored afterwards.
"""
from __future__ import annotations

import contextlib

import torch

from attn_fast.tools.bench import cpu_limit, roofline
from attn_fast.tools.bench.cases import PreparedCase, case_specs, check_case
from attn_fast.tools.bench.timing import time_cpu

#: The modes whose scaling is reported: the issue's targets are on these (decode_step without a prepared memory
#: is the same work as prepared_step plus per-call overhead).
SCALING_MODES = ("forward", "forward_backward", "prepared_step")


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set to `threads` inside the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _at_threads(prepared: PreparedCase, threads: int, *, target_s: float, limit: dict | None) -> dict:
    """Check then time `prepared` with `threads` threads; {"status", "median_s", "errors", "throughput"}."""
    with torch_threads(threads):
        check = check_case(prepared)
        if not check.passed:
            return {"status": "failed", "error": "does not match the float64 reference", "errors": check.errors,
                    "tolerances": check.tolerances}
        timing = time_cpu(prepared.run, target_s=target_s)
    evaluations = roofline.visible_tanh_evaluations(prepared.spec, prepared.inputs.key_lengths)
    return {"status": "ok", "median_s": timing["median_s"], "samples_s": timing["samples_s"],
            "errors": check.errors,
            "throughput": cpu_limit.throughput(evaluations, timing["median_s"], threads, limit)}


def run_scaling_bench(shape_names, dtype_name: str, backends, *, thread_counts, target_s: float,
                      limit: dict | None = None, modes=SCALING_MODES, seed: int = 0) -> dict:
    """Rows of (shape, mode, backend) at each of `thread_counts` (ascending, e.g. (1, 2)).

    Returns {"thread_counts", "rows": [{"shape", "dtype", "mode", "backend", "sizes", "by_threads": {"1": {...},
    "2": {...}}, "speedup", "efficiency"}], "limit_speedup", "method"}; a row whose case fails at some count has
    no speed-up."""
    thread_counts = sorted(set(thread_counts))
    most = thread_counts[-1]
    rows = []
    for spec in case_specs(shape_names, [dtype_name], list(modes), backends):
        row = {"shape": spec.shape_name, "dtype": spec.dtype_name, "mode": spec.mode, "backend": spec.backend,
               "sizes": spec.problem.as_dict(), "by_threads": {}}
        try:
            prepared = PreparedCase(spec, "cpu", seed=seed)
            for threads in thread_counts:
                row["by_threads"][str(threads)] = _at_threads(prepared, threads, target_s=target_s, limit=limit)
        except Exception as error:  # a backend that cannot run here: reported in its row, not fatal
            row["error"] = f"{type(error).__name__}: {error}"
        entries = row["by_threads"]
        if len(entries) == len(thread_counts) and all(entry["status"] == "ok" for entry in entries.values()):
            row["speedup"] = entries[str(thread_counts[0])]["median_s"] / entries[str(most)]["median_s"]
            row["efficiency"] = row["speedup"] / (most / thread_counts[0])
        rows.append(row)
    return {"thread_counts": thread_counts, "rows": rows, "limit_speedup": cpu_limit.scaling(limit),
            "method": "each case checked, then timed (time.perf_counter medians) at each thread count in turn, "
                      "torch.set_num_threads governing torch and the fused CPU kernels alike"}

