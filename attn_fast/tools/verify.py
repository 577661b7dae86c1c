"""`attn-fast verify`: every available backend against the float64 reference, forward and gradients, on a grid
of shapes, dtypes and masks; a table of errors and tolerances, and a failure count for the exit code."""
from __future__ import annotations

import dataclasses
import functools
import sys
import warnings

import torch

from attn_fast.functional import additive_attention, cpu_unusable_reason, triton_unusable_reason, triton_usable
from attn_fast.tolerances import forward_tolerance, gradient_tolerance
from attn_fast.tools.testing import errors_against_reference, random_case


@dataclasses.dataclass(frozen=True)
class VerifyCase:
    """A named problem: sizes (B, T, S, A, D) and the keyword arguments of `random_case`."""

    name: str
    sizes: tuple[int, int, int, int, int]
    options: dict = dataclasses.field(default_factory=dict)


CASES = (
    VerifyCase("decode_step", (4, 1, 37, 24, 16), dict(mask="lengths")),
    VerifyCase("single_key", (3, 5, 1, 8, 8)),
    VerifyCase("odd_sizes_mixed_masks", (5, 7, 13, 17, 11), dict(mask="mixed", fully_masked_rows=True)),
    VerifyCase("per_query_mask_strided", (2, 9, 10, 12, 7), dict(mask="padding_per_query", noncontiguous=True)),
    VerifyCase("causal", (2, 12, 12, 16, 8), dict(mask="causal", fully_masked_rows=True)),
    VerifyCase("beam_location", (2, 1, 19, 16, 12), dict(mask="padding", beam=3, extra_key_term=True)),
    VerifyCase("saturated", (2, 6, 9, 10, 5), dict(mask="lengths", saturate=3e3)),
)
CPU_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class VerifyResult:
    backend: str
    case: str
    dtype: torch.dtype
    forward_error: float
    gradient_error: float

    @property
    def passed(self) -> bool:
        return (self.forward_error <= forward_tolerance(self.dtype)
                and self.gradient_error <= gradient_tolerance(self.dtype))


def available_backends(device: torch.device) -> list[str]:
    """Backends that run on `device`: the fused "cpu" kernels on CPU where numba imports; Triton on CUDA, or on
    CPU only under TRITON_INTERPRET=1 (slow)."""
    backends = ["reference", "torch"]
    if cpu_unusable_reason(device) is None and device.type == "cpu":
        backends.append("cpu")
    if triton_usable(device):
        backends.append("triton")
    return backends


def verify_one(backend: str, case: VerifyCase, dtype: torch.dtype, device: torch.device, seed: int) -> VerifyResult:
    problem = random_case(*case.sizes, **case.options, device=device, seed=seed)
    run = functools.partial(additive_attention, backend=backend)
    errors = errors_against_reference(problem, dtype, run, seed=seed)
    gradients = [error for name, error in errors.items() if name.startswith("grad_")]
    return VerifyResult(backend, case.name, dtype, max(errors["context"], errors["weights"]), max(gradients))


def run_verify(device: torch.device, backends: list[str], dtypes, seed: int = 0, out=None) -> int:
    """Print the table (to `out`, default stdout); return the number of failed rows."""
    out = sys.stdout if out is None else out
    header = (f"{'backend':<10} {'case':<24} {'dtype':<9} {'fwd error':>10} {'fwd tol':>8} {'grad error':>10} "
              f"{'grad tol':>8}  result")
    print(f"attn-fast verify on {device} (torch {torch.__version__}); errors are ||out - ref|| / ||ref|| against "
          "the float64 reference", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    failures = 0
    for backend in backends:
        for dtype in dtypes:
            if backend == "triton" and dtype == torch.float64:
                continue  # the kernels take fp32/fp16/bf16
            for case in CASES:
                try:
                    with warnings.catch_warnings():
                        # The Triton interpreter (numpy) warns on the intended +-inf of saturated tanh forms.
                        warnings.filterwarnings("ignore", "(overflow|divide by zero) encountered", RuntimeWarning)
                        result = verify_one(backend, case, dtype, device, seed)
                    passed = result.passed
                    row = (f"{result.forward_error:>10.2e} {forward_tolerance(dtype):>8.0e} "
                           f"{result.gradient_error:>10.2e} {gradient_tolerance(dtype):>8.0e}  "
                           f"{'ok' if passed else 'FAIL'}")
                except Exception as error:  # a crash is a failure of that row, reported, not a traceback
                    passed = False
                    row = f"{'':>40}  FAIL ({type(error).__name__}: {error})"
                failures += not passed
                print(f"{backend:<10} {case.name:<24} {str(dtype).removeprefix('torch.'):<9} {row}", file=out,
                      flush=True)
    print(f"{failures} failed" if failures else "all passed", file=out)
    return failures


def parse_dtypes(names: list[str] | None, device: torch.device):
    if not names:
        return CPU_DTYPES if device.type == "cpu" else GPU_DTYPES
    return tuple(getattr(torch, name) for name in names)


def interpreter_note(device: torch.device) -> str | None:
    """One line saying why the Triton backend is not in the table (None when it can run on `device`)."""
    reason = triton_unusable_reason(device)
    if reason is None:
        return None
    if device.type == "cpu":
        return "(Triton kernels are checked on CUDA, or on CPU with TRITON_INTERPRET=1 set: slow, for testing)"
    return f"(Triton backend not used on {device}: {reason}; \"auto\" takes the torch backend there)"
