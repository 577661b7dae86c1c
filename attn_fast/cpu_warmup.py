"""Work around a PyTorch CPU fault before any number is computed for a user or a test.

In a fresh process the *first* multi-threaded float32 `torch.tanh` / `torch.exp` call can return low-precision
results (max error ~5e-5 instead of ~3e-8; seen in 5 of 20 processes with torch 2.13.0+cpu; later calls are
exact). Upstream: pytorch#188792, a first-call dispatch race in MKL VML. One throw-away call of each op on a tensor
large enough to be split across threads takes it out of the way.
"""
from __future__ import annotations

import functools

import torch

# Above at::internal::GRAIN_SIZE (32768) elements, so that the call is split across threads like real ones.
_WARMUP_ELEMENTS = 1 << 17


@functools.cache
def warm_cpu_math() -> None:
    """Run the faulty ops once per process (cheap: about a millisecond). Idempotent."""
    sample = torch.linspace(-4.0, 4.0, _WARMUP_ELEMENTS, dtype=torch.float32)
    for op in (torch.tanh, torch.exp, torch.reciprocal):
        op(sample)
        op(sample.double())
