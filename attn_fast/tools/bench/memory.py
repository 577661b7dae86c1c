"""Peak extra memory of one call of a case, next to the [B, T, S, A] tensor that eager materializes.

GPU: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus what was allocated before the
call (inputs, weights, caches): the caching allocator's own accounting of every tensor the call created.

CPU: a fresh process per case, the method of tests/backends/rss_probe.py. Peak RSS is what the operating system charges,
whatever allocator or cache holds the memory. The processes are forked from a multiprocessing "forkserver" that
has imported torch and this package but run nothing (no thread pool or allocator cache is inherited, and forking
is safe): a fresh address space per case without paying torch's import (seconds on a loaded 2-core machine) each
time. In the child, the case runs once first, at its own shape, so that every code path, compiled kernel, thread
pool and library buffer it uses is loaded (for "compile", that call compiles the graph; MKL keeps its GEMM packing
buffers), and what that call freed is handed back to the operating system (glibc `malloc_trim(0)`); then the
kernel's peak-RSS mark VmHWM is reset (`/proc/self/clear_refs`, "5") and the growth of VmHWM over VmRSS over a
second call is the figure: what one call of a training or decoding loop adds. Without the trim, freed heap
memory stays resident and a call can reuse it unseen: the torch backend's forward at long then measured -0.3 MiB,
below its own 3.1 MiB context; without the warm-up at the case's own shape (a tiny shape was used before), one-time
buffers of paths the tiny shape never takes (MKL's packing buffers for large products, ~12 MiB at caption) were
counted as the call's. `getrusage().ru_maxrss` is not used: it is the lifetime peak of the process and cannot be
reset, so it would include building the inputs (and a forked child starts with its parent's peak). A fresh process
per case matters: memory freed by an earlier case stays resident in the allocator and a later case would reuse it
unseen.
"""
from __future__ import annotations

import gc
import multiprocessing
import pathlib
import re

import torch

from attn_fast.tools.bench.cases import CaseSpec, PreparedCase

MIB = 2**20


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    status = pathlib.Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def _reset_peak_rss() -> None:
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def cpu_rss_available() -> bool:
    """Whether this kernel lets a process reset its peak-RSS mark (Linux with /proc)."""
    try:
        _status_mib("VmHWM")
        _reset_peak_rss()
    except (OSError, AttributeError):
        return False
    return True


def measure_in_this_process(spec: CaseSpec, threads: int | None = None) -> dict:
    """The child's side on CPU: warm up, reset the peak mark, run the case once, report the growth."""
    from attn_fast.cpu_warmup import warm_cpu_math

    if threads:
        torch.set_num_threads(threads)
    warm_cpu_math()  # pytorch#188792: before any number
    prepared = PreparedCase(spec, "cpu")
    prepared.run()  # loads every path, kernel and buffer of this case ("compile": compiles it)
    prepared.last_context = None
    if prepared.with_grad:
        for tensor in prepared.leaves():
            tensor.grad = None
    gc.collect()
    trimmed = _return_free_heap()
    _reset_peak_rss()
    before = _status_mib("VmRSS")
    prepared.run()
    growth = _status_mib("VmHWM") - before
    method = "fresh process, second call of the case, growth of VmHWM over VmRSS" + (
        " after malloc_trim" if trimmed else " (malloc_trim unavailable: freed heap memory may hide part of it)")
    return {"peak_extra_mib": growth, "method": method}


def _return_free_heap() -> bool:
    """Hand the heap memory freed so far back to the operating system (glibc `malloc_trim(0)`), so that the
    measured call's allocations show in its RSS instead of reusing resident free memory. False where the C
    library has no malloc_trim (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _child(arguments: dict, threads: int | None, connection) -> None:
    """Runs in the forked child: measure and send the result (or the error) back."""
    try:
        result = measure_in_this_process(CaseSpec(**arguments), threads)
    except Exception as error:  # reported in the case's memory entry, not as a traceback
        result = {"error": f"{type(error).__name__}: {error}"}
    connection.send(result)
    connection.close()


_FORKSERVER = None


def _forkserver_context():
    """The forkserver context, with torch and this package imported in the server (once per parent process)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload([__name__])
    return _FORKSERVER


def measure_cpu(spec: CaseSpec, *, threads: int | None = None, timeout_s: float = 900) -> dict:
    """Run the case in a fresh child process and return {"peak_extra_mib", "method"} (or {"error"})."""
    context = _forkserver_context()
    receiver, sender = context.Pipe(duplex=False)
    # Not a daemon: a compiling child (torch.compile cases of --full) may start compile workers of its own.
    process = context.Process(target=_child, args=(spec.as_dict(), threads, sender), daemon=False)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            process.kill()
            return {"error": f"memory probe timed out after {timeout_s:.0f} s"}
        return receiver.recv()
    except EOFError:  # the child died without an answer, e.g. killed for memory
        process.join()
        return {"error": f"memory probe exited {process.exitcode} without a result"}
    finally:
        process.join()
        receiver.close()


def measure_cuda(prepared: PreparedCase) -> dict:
    """Peak bytes allocated during one call beyond what was allocated before it (inputs and caches)."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats(prepared.device)
    before = torch.cuda.memory_allocated(prepared.device)
    prepared.run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(prepared.device) - before
    return {"peak_extra_mib": peak / MIB, "method": "torch.cuda.max_memory_allocated delta over one call"}


def output_bytes(spec: CaseSpec) -> int:
    """What the call must hand back, whatever the backend: context [B, T, D], and with the backward the input
    gradients (query_proj [B, T, A], key_proj [B, S, A], value [B, S, D], v [A]). They are inside every backend's
    peak; the rest of the peak is the backend's working memory."""
    batch, tgt_len, src_len, attn_dim, value_dim = spec.problem.sizes
    elements = batch * tgt_len * value_dim
    if spec.mode == "forward_backward":
        elements += batch * tgt_len * attn_dim + batch * src_len * (attn_dim + value_dim) + attn_dim
    return elements * torch.empty((), dtype=spec.dtype).element_size()


def measure(spec: CaseSpec, device: torch.device, *, prepared: PreparedCase | None = None,
            threads: int | None = None) -> dict:
    """Peak extra memory of one call, plus the size of the eager [B, T, S, A] tensor for comparison."""
    result = {"tanh_tensor_mib": spec.problem.tanh_tensor_bytes(spec.dtype) / MIB,
              "outputs_mib": output_bytes(spec) / MIB}
    if device.type == "cuda":
        result.update(measure_cuda(prepared if prepared is not None else PreparedCase(spec, device)))
    elif not cpu_rss_available():
        result["error"] = "peak RSS cannot be reset on this system (needs Linux /proc/self/clear_refs)"
    else:
        result.update(measure_cpu(spec, threads=threads))
    return result
