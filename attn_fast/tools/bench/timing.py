"""Timing of one case: wall-clock medians on CPU, device-side medians on GPU.

CPU: `time.perf_counter` around each call, median of several calls after warm-up calls; the number of calls
adapts to the case (about `target_s` of samples, within [min_repeats, max_repeats]) so that a 1 ms decode step
gets many samples and a 5 s eager call a few. `torch.get_num_threads()` is recorded with every figure: CPU speed
depends on it, and other processes on the machine add noise that only the median tames.

GPU: `triton.testing.do_bench` (CUDA events, median after warm-up; it also flushes L2 before every call) over
several input sets used in turn, so that a small shape's inputs are not served from the 50 MB L2 across calls.
The single-step decode is captured in CUDA graphs (one per input set), as a real decoding loop would run it,
so that launch overhead is not what is measured; if capture fails (a backend that synchronizes with the host),
the case falls back to plain launches and says so.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def time_cpu(run: Callable[[], None], *, warmup: int = 1, min_repeats: int = 3, max_repeats: int = 50,
             target_s: float = 1.0) -> dict:
    """Median wall-clock seconds of `run()` after `warmup` calls. Returns {"median_s", "min_s", "samples_s",
    "repeats", "threads", "method"}."""
    for _ in range(warmup):
        run()
    start = time.perf_counter()
    run()
    samples = [time.perf_counter() - start]
    repeats = int(min(max_repeats, max(min_repeats, math.ceil(target_s / max(samples[0], 1e-6)))))
    for _ in range(repeats - 1):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "samples_s": samples,
        "repeats": len(samples),
        "threads": torch.get_num_threads(),
        "method": f"time.perf_counter wall clock, median of {len(samples)} calls after {warmup} warm-up call(s)",
    }


def input_sets_for_l2(bytes_per_set: int, device: torch.device, *, most: int = 8) -> int:
    """How many input sets to rotate through so that together they exceed twice the GPU's L2 cache."""
    try:
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    except (AttributeError, RuntimeError):
        l2_bytes = 50 * 2**20  # H100
    return int(max(1, min(most, math.ceil(2 * l2_bytes / max(bytes_per_set, 1)))))


def _capture_graphs(runs: Sequence[Callable[[], None]]) -> list:
    """One CUDA graph per callable (warmed up on a side stream first, as torch.cuda.graphs requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for run in runs:
            for _ in range(3):
                run()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for run in runs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graphs.append(graph)
    return graphs


def time_cuda(runs: Sequence[Callable[[], None]], *, use_graph: bool = False, warmup_ms: float = 25,
              rep_ms: float = 100) -> dict:
    """Median seconds per call on the GPU, `runs` being the same case on different input sets (used in turn).

    With `use_graph`, each run is captured once in a CUDA graph and the graphs are replayed."""
    from triton.testing import do_bench

    method = "triton.testing.do_bench (CUDA events, L2 flushed before each call), median"
    graph_note = None
    calls = list(runs)
    if use_graph:
        try:
            graphs = _capture_graphs(runs)
            calls = [graph.replay for graph in graphs]
            method += ", CUDA graph replay"
        except Exception as error:  # e.g. a host synchronization inside the call: capture is impossible
            torch.cuda.synchronize()
            graph_note = f"CUDA graph capture failed ({type(error).__name__}: {error}); plain launches timed"
    turn = itertools.cycle(calls)

    def rotating():
        next(turn)()

    median_ms = do_bench(rotating, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    result = {"median_s": median_ms / 1e3, "input_sets": len(calls), "method": f"{method}, {len(calls)} input "
              "set(s) rotated", "cuda_graph": use_graph and graph_note is None}
    if graph_note:
        result["note"] = graph_note
    return result
