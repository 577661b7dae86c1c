"""The backends that the NaN/inf and API-edge tests run on: every name of `attn_fast.validation.BACKENDS` but
"auto", each on the device where it runs in this process, or skipped cleanly where it cannot run."""
import pytest
import torch

from attn_fast.validation import BACKENDS

#: Every backend a user can name ("auto" only picks one of them).
RUN_BACKENDS = [name for name in BACKENDS if name != "auto"]


def backend_device(backend: str, triton_device: torch.device) -> torch.device:
    """Where `backend` runs in this process (Triton: the GPU, else the CPU under the interpreter), or a skip with
    the reason when it cannot run here (triton or numba not importable)."""
    from attn_fast import functional

    if backend == "triton":
        reason = functional.triton_unusable_reason(triton_device)
        if reason is not None:
            pytest.skip(f"triton backend unavailable: {reason}")
        return triton_device
    unusable = getattr(functional, f"{backend}_unusable_reason", None)  # e.g. cpu_unusable_reason (numba)
    if unusable is not None:
        reason = unusable(torch.device("cpu"))
        if reason is not None:
            pytest.skip(f"{backend} backend unavailable: {reason}")
    return torch.device("cpu")
