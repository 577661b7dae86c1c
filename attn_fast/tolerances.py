"""The one place where the accepted errors per dtype are written.

Error measure: relative Frobenius error ||out - ref|| / ||ref|| against the float64 reference run on the same
(already rounded) inputs. Gradients accumulate more rounding (a second pass over the tanh tensor, sums over T or
S), so they get their own column.
"""
from __future__ import annotations

import torch

#: dtype -> (forward tolerance, gradient tolerance)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 5e-5),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}


def forward_tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype][0]


def gradient_tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype][1]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; 0 when both are all zeros, inf on any NaN."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    difference = float(torch.linalg.vector_norm(actual - expected))
    scale = float(torch.linalg.vector_norm(expected))
    if scale == 0.0:
        return difference
    return difference / scale
