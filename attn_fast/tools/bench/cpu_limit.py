"""The CPU limit of the factorized tanh: how many elements per second this machine can push through the
per-element arithmetic of the forward's score loop, measured in the bench's own process so that every CPU row can
report its tanh elements/s as a fraction of it (issue 13).

The forward computes sum_a v[a] * tanh(q[a] + k[a]) in the factorized form tanh(q + k) = 1 - 2 / (1 + e^{2q} e^{2k})
with e^{2q} and e^{2k} computed once per query and key row (README, "Backends"). What is left per element is

    score += v * (1 / (1 + eq * ek))      one FMA, one reciprocal (a division), one FMA

(the sum of v and the factor -2 are applied once per score, outside the loop). This module times exactly that loop,
compiled by numba with the fastmath flags of the CPU backend's kernels, over contiguous float32 arrays small enough
to stay in L1 (16 keys x 256 units: 16 KiB of e^{2k}, 3 KiB of e^{2q}, v and accumulators per worker), so that it
measures the arithmetic at the machine's vector width and not the memory system. Each worker (one per thread,
`numba.prange`) sweeps the same keys many times with its own query row and accumulators; elements/s =
workers x sweeps x keys x units / seconds. It is timed with 1 thread and with the bench's thread count.

The compiled loop's assembly is read back (`inspect_asm`) and the packed division / reciprocal / FMA instructions
are counted per register width, so the JSON says whether the limit was measured at the vector width (ymm: 256-bit
AVX2, zmm: 512-bit) or fell back to narrower code.

Without numba the limit is not measured: `measure_cpu_limit` returns {"available": False, "note": ...} and the rows
carry no fraction (their elements/s are still reported).
"""
from __future__ import annotations

import re
import statistics
import time

import numpy as np
import torch

from attn_fast.backends import cpu_kernels

#: The working set of one worker: KEYS rows of e^{2k} x UNITS attention units (float32) plus one query row of e^{2q},
#: v and the per-key sums: 19 KiB, inside the smallest L1 data cache of a current x86 core (32 KiB).
KEYS, UNITS = 16, 256
#: Packed instructions looked for in the compiled loop (AT&T syntax, as LLVM prints it).
VECTOR_INSTRUCTIONS = ("vdivps", "vrcpps", "vrcp14ps", "vfmadd")
REGISTER_BITS = {"xmm": 128, "ymm": 256, "zmm": 512}

_KERNEL = None
_VECTOR_REPORT = None


def kernel_options() -> dict:
    """numba.njit options of the limit loop: the forward kernel's fastmath flags, parallel over workers."""
    return {"fastmath": set(fastmath_flags()), "parallel": True}


def fastmath_flags() -> frozenset[str]:
    """The fastmath flags of the CPU backend's forward kernel (`attn_fast.backends.cpu_kernels.FASTMATH`)."""
    return frozenset(cpu_kernels.FASTMATH)


def _compiled_kernel():
    """The numba loop, compiled once per process (and cached on disk); raises ImportError without numba."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    # The CPU backend's own check: it imports numba and selects the threading layer its kernels run on, so that
    # the limit is measured on the same thread pool.
    reason = cpu_kernels.unavailable_reason()
    if reason is not None:
        raise ImportError(reason)
    import numba

    one = np.float32(1.0)  # a float32 constant: a Python float would promote the loop to float64

    @numba.njit(**kernel_options(), cache=True)
    def factorized_tanh_arithmetic(query_exp, key_exp, v, acc, sweeps):
        """acc[w, j] += sum_a v[a] * (1 / (1 + query_exp[w, a] * key_exp[j, a])) for every key j, `sweeps` times;
        one worker w per parallel chunk. The loop of the forward's scores: a sum over the units per key, kept in
        registers (vector partial sums, which the "reassoc" flag allows), one store per key. (A first version
        accumulated per unit in memory, a load and a store per element: it ran below the forward kernel itself,
        which made the fractions exceed 100%.)"""
        workers = acc.shape[0]
        keys, units = key_exp.shape
        for worker in numba.prange(workers):
            for _ in range(sweeps):
                for key in range(keys):
                    score = np.float32(0.0)
                    for unit in range(units):
                        score += v[unit] * (one / (one + query_exp[worker, unit] * key_exp[key, unit]))
                    acc[worker, key] += score

    _KERNEL = factorized_tanh_arithmetic
    return _KERNEL


def _operands(workers: int):
    """Random operands in the range the forward sees (e^{2q}, e^{2k} > 0; v of either sign)."""
    generator = np.random.default_rng(0)
    query_exp = generator.uniform(0.25, 4.0, (workers, UNITS)).astype(np.float32)
    key_exp = generator.uniform(0.25, 4.0, (KEYS, UNITS)).astype(np.float32)
    v = generator.standard_normal(UNITS).astype(np.float32)
    return query_exp, key_exp, v, np.zeros((workers, KEYS), dtype=np.float32)


def vector_report(kernel) -> dict:
    """What the compiled loop runs on: {"instructions": {name: {"xmm"|"ymm"|"zmm": count}}, "vector_bits": the widest
    register holding packed division, reciprocal or FMA instructions (0 when the loop is scalar)}."""
    if sum(kernel.stats.cache_hits.values()):
        # Loaded from numba's on-disk cache, which keeps machine code but no assembly text (inspect_asm returns a
        # placeholder and warns): compile an uncached twin of the same function with the same options (a second
        # or two) to read it.
        import numba

        kernel = numba.njit(**kernel_options(), cache=False)(kernel.py_func)
        kernel(*_operands(1), 1)
    assembly = "\n".join(kernel.inspect_asm().values())
    instructions = {}
    for name in VECTOR_INSTRUCTIONS:
        counts = {register: len(re.findall(rf"\b{name}\w*\s+[^\n]*%{register}", assembly))
                  for register in REGISTER_BITS}
        instructions[name] = {register: count for register, count in counts.items() if count}
    widths = [REGISTER_BITS[register] for counts in instructions.values() for register in counts]
    return {"instructions": instructions, "vector_bits": max(widths, default=0)}


def _set_numba_threads(threads: int) -> int:
    """Set numba's thread count for this thread (at most its pool size); returns the count actually set."""
    import numba

    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def time_limit(threads: int, *, target_s: float = 0.3, calls: int = 5) -> dict:
    """Elements/s of the loop with `threads` numba threads: the median of `calls` calls of about `target_s / calls`
    seconds each (one worker per thread). Returns {"threads", "elements_per_s" (median), "best_elements_per_s",
    "samples_s", "elements_per_call"}."""
    import numba

    kernel = _compiled_kernel()
    previous = numba.get_num_threads()
    try:
        threads = _set_numba_threads(threads)
        query_exp, key_exp, v, acc = _operands(threads)
        elements_per_sweep = threads * KEYS * UNITS
        kernel(query_exp, key_exp, v, acc, 1)  # warm: the thread pool starts, the operands are touched
        start = time.perf_counter()
        kernel(query_exp, key_exp, v, acc, 64)
        sweep_s = (time.perf_counter() - start) / 64
        sweeps = max(1, int(target_s / calls / max(sweep_s, 1e-9)))
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            kernel(query_exp, key_exp, v, acc, sweeps)
            samples.append(time.perf_counter() - start)
    finally:
        numba.set_num_threads(previous)
    if not np.isfinite(acc).all():
        raise RuntimeError("the CPU limit loop produced a non-finite accumulator")
    elements = elements_per_sweep * sweeps
    return {"threads": threads, "elements_per_s": elements / statistics.median(samples),
            "best_elements_per_s": elements / min(samples), "samples_s": samples, "elements_per_call": elements}


def measure_cpu_limit(thread_counts=None, *, target_s: float = 0.3) -> dict:
    """The CPU limit at each thread count (default: 1 and `torch.get_num_threads()`).

    Returns {"available": True, "fastmath": [...], "vector_bits", "instructions", "compile_s", "by_threads":
    {"1": {...}, "2": {...}}, "method"}, or {"available": False, "note": one line} when numba is missing or the
    loop cannot be compiled (the bench then omits the fractions)."""
    thread_counts = sorted(set(thread_counts or (1, torch.get_num_threads())))
    try:
        start = time.perf_counter()
        kernel = _compiled_kernel()
        by_threads = {str(threads): time_limit(threads, target_s=target_s) for threads in thread_counts}
        compile_and_time_s = time.perf_counter() - start
        global _VECTOR_REPORT
        if _VECTOR_REPORT is None:  # the same compiled loop for the whole process: read its assembly once
            _VECTOR_REPORT = vector_report(kernel)
        vector = _VECTOR_REPORT
    except ImportError as error:
        return {"available": False, "note": f"CPU limit not measured: numba is not importable ({error}); "
                                            "`pip install numba` to measure it"}
    except Exception as error:  # e.g. a numba / LLVM failure: the bench still runs, without the fractions
        return {"available": False, "note": f"CPU limit not measured: {type(error).__name__}: {error}"}
    return {"available": True, "fastmath": sorted(fastmath_flags()), **vector, "by_threads": by_threads,
            "compile_and_time_s": compile_and_time_s,
            "method": f"numba loop score += v * (1 / (1 + eq * ek)) (FMA, division, FMA per element) over float32 "
                      f"[{KEYS} keys x {UNITS} units] per worker (L1-resident), one worker per thread, median of 5 "
                      f"calls; elements/s = workers x sweeps x keys x units / s"}


def limit_for(limit: dict | None, threads: int) -> float | None:
    """The measured limit (median elements/s) at `threads`, or None when it was not measured at that count."""
    if not limit or not limit.get("available"):
        return None
    entry = limit["by_threads"].get(str(threads))
    return entry["elements_per_s"] if entry else None


def scaling(limit: dict | None) -> float | None:
    """The limit's speed-up from 1 thread to the largest count measured (how parallel this machine's cores are
    right now: ~2 on two idle cores, less when other work shares them)."""
    if not limit or not limit.get("available") or len(limit["by_threads"]) < 2:
        return None
    by_threads = limit["by_threads"]
    most = max(by_threads, key=int)
    return by_threads[most]["elements_per_s"] / by_threads["1"]["elements_per_s"] if "1" in by_threads else None


def throughput(tanh_evaluations: int, median_s: float, threads: int, limit: dict | None) -> dict:
    """One CPU row's tanh elements/s and its fraction of the limit measured at the row's thread count.

    `tanh_evaluations` as `roofline.visible_tanh_evaluations` counts them: T*A per visible key of each batch row for
    a forward or a step, twice that for a forward + backward (the backward recomputes each tanh once; its
    per-element work is more than the limit's
    FMA + division + FMA, so its fraction is not expected to reach the forward's). Returns {"tanh_evaluations",
    "elements_per_s", "threads", "limit_elements_per_s", "cpu_limit_fraction"}, the last two None when the limit
    was not measured (no numba) or not at this thread count."""
    rate = tanh_evaluations / median_s if median_s > 0 else None
    ceiling = limit_for(limit, threads)
    return {"tanh_evaluations": tanh_evaluations, "elements_per_s": rate, "threads": threads,
            "limit_elements_per_s": ceiling,
            "cpu_limit_fraction": None if ceiling is None or rate is None else rate / ceiling}
