"""Test set-up shared by every test module.

Without CUDA the Triton kernels run under the interpreter, which must be switched on *before* triton is first
imported; attn_fast imports triton lazily, so setting it here, first, is enough.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attn_fast.cpu_warmup import warm_cpu_math  # noqa: E402

# pytorch#188792: the first multi-threaded float32 tanh/exp of a process can be inaccurate.
warm_cpu_math()


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison(monkeypatch):
    """`poison(module)`: every buffer `module.empty_buffer` hands out from now on starts as NaN, so an element the
    code forgets to write shows up in the comparison. Returns the list of the buffers handed out."""
    def apply(module):
        allocated = []

        def nan_buffer(shape, dtype, device):
            buffer = torch.full(shape if isinstance(shape, tuple) else (shape,), float("nan"), dtype=dtype,
                                device=device)
            allocated.append(buffer)
            return buffer

        monkeypatch.setattr(module, "empty_buffer", nan_buffer)
        return allocated

    return apply
