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
