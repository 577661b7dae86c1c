"""What every launcher of the kernels shares: the launch record, running a list of launches, the one allocation
seam of all output and scratch buffers, and the facts about where the kernels run (interpreter, SM count)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import triton

#: SM count assumed where there is no GPU to ask (the interpreter, offline compiles): an H100 SXM. Keeps the
#: heuristics' choices reproducible.
DEFAULT_SM_COUNT = 132


def is_interpreter() -> bool:
    """True when Triton runs kernels on CPU tensors with numpy (TRITON_INTERPRET=1, set before triton is imported).
    The kernels then take their portable formulas (no libdevice, no inline PTX; see kernels/tanh.py)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def require_runnable(device: torch.device) -> bool:
    """Raise unless the kernels can run on `device` (CUDA, or CPU under the interpreter); return `is_interpreter()`,
    which the launchers pass to the kernels as their INTERPRET switch."""
    interpret = is_interpreter()
    if device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device.type}); on CPU they run only under TRITON_INTERPRET=1"
        )
    return interpret


def empty_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer of the kernels comes from here (uninitialized: the kernels write every element
    they later read). Tests replace this function with one that fills NaN, to prove that claim; the launchers call
    it as `launch.empty_buffer` so that the replacement reaches them."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.cache
def _device_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; DEFAULT_SM_COUNT off CUDA (the interpreter, meta tensors)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclasses.dataclass
class KernelLaunch:
    """One kernel launch: `kernel[grid](**arguments, num_warps=..., num_stages=...)`. The static sm_90 report
    (benchmarks/static_report.py) compiles exactly these."""

    kernel: triton.JITFunction
    grid: tuple[int, ...]
    arguments: dict
    num_warps: int
    num_stages: int = 1  # software pipelining of loops Triton pipelines by itself (not the A-chunk loop)


def _shapes_only(launches: list[KernelLaunch]) -> bool:
    """True when the launches' tensors carry no data, so that running the kernels is neither possible nor needed:
    meta tensors, or fake tensors while torch.compile keeps the triton ops opaque.

    A `triton_op` runs its launcher as its own fake kernel. On CUDA `wrap_triton` turns each launch into a traced
    higher-order op that does nothing on fake tensors; under the interpreter the kernel is not wrapped and would run
    on the fake tensors and fail. Skipping is only right while `torch._functorch.config.decompose_custom_triton_ops`
    is False (the op stays one opaque node and this body only computes shapes): when it is True (torch's default)
    AOT tracing *decomposes* the op through this very body, and a skipped launch would silently drop the kernel
    from the compiled graph. So fake tensors are skipped only with that flag off (tests/backends/test_triton_ops.py
    sets it; the library never does), and otherwise fail loudly as before (issue 12, point 10)."""
    import torch._functorch.config as functorch_config
    from torch._subclasses.fake_tensor import FakeTensor

    tensors = [value for launch in launches for value in launch.arguments.values() if isinstance(value, torch.Tensor)]
    if any(tensor.device.type == "meta" for tensor in tensors):
        return True
    return (any(isinstance(tensor, FakeTensor) for tensor in tensors)
            and not functorch_config.decompose_custom_triton_ops)


def run_launches(launches: list[KernelLaunch], device: torch.device, wrap=None) -> None:
    """Launch `launches` in order on `device`. `wrap` (torch.library.wrap_triton inside a `triton_op`) wraps each
    kernel so that torch.compile can trace the launch instead of treating it as opaque. On tensors without data
    (see `_shapes_only`) nothing is launched: the outputs the launcher allocated are then shapes only."""
    if _shapes_only(launches):
        return
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for launch in launches:
            kernel = launch.kernel if wrap is None else wrap(launch.kernel)
            kernel[launch.grid](**launch.arguments, num_warps=launch.num_warps, num_stages=launch.num_stages)
