"""The capability gate (issue 12): "auto" takes the Triton kernels only on sm_80+ GPUs, an explicit
backend="triton" on an older GPU raises a ValueError naming the capability, and `attn-fast verify` says in one line
why Triton is not used. Checked on CPU: torch.cuda.is_available / get_device_capability are monkeypatched and only
torch.device("cuda") objects are used (no CUDA tensor is ever made)."""
from __future__ import annotations

import pytest
import torch

from attn_fast import functional
from attn_fast.tools import verify

pytest.importorskip("triton")

CUDA = torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """gpu(major, minor): pretend a CUDA GPU of that compute capability is present."""
    def pretend(major: int, minor: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return pretend


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (10, 0)])
def test_auto_takes_triton_on_sm80_and_newer(gpu, capability):
    gpu(*capability)
    assert functional.triton_unusable_reason(CUDA) is None
    assert functional.triton_usable(CUDA)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert functional.resolve_backend("auto", CUDA, dtype) == "triton"
    assert functional.resolve_backend("triton", CUDA, torch.float16) == "triton"
    assert functional.resolve_backend("auto", CUDA, torch.float64) == "torch"
    assert verify.interpreter_note(CUDA) is None
    assert "triton" in verify.available_backends(CUDA)


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (6, 1)])
def test_auto_takes_torch_below_sm80_and_explicit_triton_says_why(gpu, capability):
    gpu(*capability)
    assert not functional.triton_usable(CUDA)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert functional.resolve_backend("auto", CUDA, dtype) == "torch"
    name = f"{capability[0]}.{capability[1]}"
    with pytest.raises(ValueError, match=rf"compute capability {name}.*8\.0 or newer"):
        functional.resolve_backend("triton", CUDA, torch.float16)
    assert verify.available_backends(CUDA) == ["reference", "torch"]
    note = verify.interpreter_note(CUDA)
    assert note is not None and "\n" not in note
    assert f"compute capability {name}" in note and "torch backend" in note


def test_no_cuda_is_a_reason_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert functional.triton_unusable_reason(CUDA) == "CUDA is not available"
    assert functional.resolve_backend("auto", CUDA, torch.float32) == "torch"


def test_cpu_follows_the_interpreter(monkeypatch):
    from attn_fast.kernels import launch

    cpu = torch.device("cpu")
    assert functional.resolve_backend("auto", cpu, torch.float32) != "triton"  # never Triton on CPU under "auto"
    monkeypatch.setattr(launch, "is_interpreter", lambda: False)
    assert "TRITON_INTERPRET" in functional.triton_unusable_reason(cpu)
    assert "TRITON_INTERPRET=1" in verify.interpreter_note(cpu)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        functional.resolve_backend("triton", cpu, torch.float32)
    monkeypatch.setattr(launch, "is_interpreter", lambda: True)
    assert functional.triton_usable(cpu)
    assert verify.interpreter_note(cpu) is None
