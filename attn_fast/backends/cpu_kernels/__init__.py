"""Fused CPU kernels of the "cpu" backend, compiled by numba (docs/DESIGN.md, "Fused CPU kernels").

One compiled loop per (query row, decoder step) computes every score with the sum over the attention units A held
in registers, the masked softmax and the context, where the torch backend's block loop sends each [rows, steps,
keys, A] block through memory 3-4 times (benchmarks/NOTES.md, "Fused CPU kernels: choosing the tool").

This package imports numba only when a kernel module is imported (`forward`, `backward`): `unavailable_reason()`
tells, without raising, whether it can be, so that "auto" falls back to the torch backend where numba is missing.

Numerics shared by the kernel modules:
- FASTMATH allows contraction into FMAs, reassociation (the vectorized sum over A), reciprocal rewrites and
  ignoring the sign of zero, and nothing that assumes finite values: "nnan" and "ninf" would let LLVM drop the
  comparisons and the inf arithmetic that saturated inputs (e^{2q} e^{2k} = inf gives tanh = 1 exactly) and NaN
  inputs (which must propagate to the rows that see them) rely on. LLVM keeps a true vector division for
  v / (1 + x) under "arcp" (no reciprocal estimate, which would turn 1/inf into NaN), checked by the tests.
- Threads: every launch sets numba's thread count from torch.get_num_threads() (1 for a small launch, or in a
  process forked after any launch) and holds a process-wide lock (`launching`); one-thread launches run the
  kernels' serial builds.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

#: LLVM fast-math flags of every kernel (see the module docstring for why not "fast").
FASTMATH = frozenset({"contract", "reassoc", "arcp", "nsz"})

#: numba's threading layers in order of preference, unless the user chose (NUMBA_THREADING_LAYER or
#: NUMBA_THREADING_LAYER_PRIORITY). "omp" measured 1.4-1.8x faster than numba's own "workqueue" pool for the forward
#: on 2 threads beside torch's OpenMP threads, 1.1-1.4x for forward+backward (benchmarks/NOTES.md, "Issue 13,
#: second pass"; an earlier measurement under heavy load had said the opposite). "workqueue" where numba has no
#: OpenMP (numba wants a permutation of all three names; "workqueue" always loads, so "tbb" is never reached). GNU
#: OpenMP cannot survive fork(): numba terminates a forked child that launches a parallel region after its parent
#: started the layer, so a child forked after any launch runs every kernel in its serial build (`threads_for`).
#: "workqueue" aborts the process when two launches overlap (calls from two Python threads: the GIL is released while
#: a parallel kernel runs); every launch goes through `launching()`, which serializes them, whatever the layer.
THREADING_LAYER_PRIORITY = ("omp", "workqueue", "tbb")

_LAUNCH_LOCK = threading.Lock()


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant instead of tracing an import
def unavailable_reason() -> str | None:
    """Why the fused CPU kernels cannot run in this process (one line), or None when numba imports."""
    return _probe_numba()


@functools.cache
def _probe_numba() -> str | None:
    try:
        import numba
    except ImportError as error:
        return f"numba is not importable ({error}); pip install numba"
    if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = list(THREADING_LAYER_PRIORITY)
    return None


#: A launch with fewer tanh elements than this runs on one thread: waking numba's other workers (a futex wake-up
#: each, ~50-100 us on this VM, more when a core is busy) costs more than splitting ~150 us of work saves. A
#: decode step at nmt_train (32 x 50 x 256 = 0.4 M elements) took 0.75 ms on one thread and 1.9 ms on two
#: (benchmarks/NOTES.md, "Issue 13, second pass").
ONE_THREAD_BELOW_ELEMENTS = 1 << 20


# numba starts its threading layer at the first numba.set_num_threads, which every launch calls (`launching`), a
# one-thread launch included: from then on, numba's "omp" layer terminates a forked child at its first parallel
# region ("fork() called from a process already using GNU OpenMP"), checked here with a child of a process that had
# only run serial builds.
_pool_started = False  # numba's threading layer was started in this process
_forked_after_pool_start = False  # this process was forked from one where it had been


def _after_fork_in_child() -> None:
    global _forked_after_pool_start
    _forked_after_pool_start = _forked_after_pool_start or _pool_started


os.register_at_fork(after_in_child=_after_fork_in_child)


def threads_for(elements: int | None = None) -> int:
    """The thread count of a launch of `elements` tanh elements: torch's (capped at the pool numba started with),
    or 1 below ONE_THREAD_BELOW_ELEMENTS, and always 1 in a process forked after numba's threading layer started
    (see THREADING_LAYER_PRIORITY). A one-thread launch runs the kernels' serial builds, which use no thread pool."""
    import numba

    if _forked_after_pool_start or (elements is not None and elements < ONE_THREAD_BELOW_ELEMENTS):
        return 1
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def use_torch_threads(elements: int | None = None) -> int:
    """Set numba's thread count for the next kernel launch (`threads_for`); returns it."""
    import numba

    global _pool_started
    threads = threads_for(elements)
    _pool_started = True  # set_num_threads starts the threading layer, whatever the count
    numba.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def launching(elements: int | None = None):
    """Hold around every kernel launch: one launch at a time in the process (see THREADING_LAYER_PRIORITY), with numba's
    thread count set from torch's, or 1 for a small launch of `elements` tanh elements (`use_torch_threads`);
    yields that count."""
    with _LAUNCH_LOCK:
        yield use_torch_threads(elements)
