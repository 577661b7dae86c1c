"""What the integration tests share: importing the real frameworks (or skipping with the install command when
they are missing) and the comparisons against them.

SpeechBrain 1.1.2 imports torchaudio when the package is imported (speechbrain/__init__ -> core ->
utils.torch_audio_backend), although neither speechbrain.nnet.attention nor speechbrain.nnet.RNN ever calls it.
PyPI's torchaudio wheels are built against one CUDA torch release each and fail to load against torch 2.13.0+cpu
(OSError from _torchaudio.so), so where no working torchaudio can be imported, `import_speechbrain` puts a
stand-in module named torchaudio in sys.modules for the duration of SpeechBrain's import only: it holds nothing
but a version string (2.11, so that SpeechBrain's backend check takes its "torchaudio 2.9+" branch and calls
nothing), and any other attribute raises. It lives here, in the tests, and is never shipped.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types

import pytest
import torch

from attn_fast.tolerances import gradient_tolerance, relative_error

#: The backends of the module-level equality tests: all that run on CPU tensors ("cpu" is skipped, with the reason,
#: where numba is not importable: tests.backend_cases.backend_device). "triton" has one small case per adapter
#: (under the interpreter without a GPU, which is slow), on the device the `triton_device` fixture picks.
MODULE_BACKENDS = ("torch", "reference", "cpu")
#: Where the real frameworks' modules (and their float64 truth) run; a swapped module may run elsewhere (Triton).
CPU = torch.device("cpu")

SPEECHBRAIN_INSTALL = 'pip install -e ".[integrations]" && pip install --no-deps speechbrain==1.1.2'
OPENNMT_INSTALL = 'pip install -e ".[integrations]" && pip install --no-deps OpenNMT-py==3.5.1'


class TorchaudioStandIn(types.ModuleType):
    """Test-only stand-in for torchaudio: a version string, nothing else."""

    __version__ = "2.11.0+attn-fast-test-stand-in"

    def __getattr__(self, name: str):
        raise AttributeError(f"torchaudio is a test stand-in here (the real one cannot load against this torch); "
                             f"SpeechBrain asked for torchaudio.{name}")


def working_torchaudio() -> bool:
    """Whether the real torchaudio imports (a wheel built for another torch fails with OSError, not ImportError)."""
    try:
        importlib.import_module("torchaudio")
    except (ImportError, OSError):
        for name in [name for name in sys.modules if name == "torchaudio" or name.startswith("torchaudio.")]:
            del sys.modules[name]  # a half-imported torchaudio must not be found by the next import
        return False
    return True


SPEECHBRAIN_MODULES = ("speechbrain.nnet.attention", "speechbrain.nnet.RNN", "speechbrain.decoders.seq2seq")


def import_speechbrain():
    """(speechbrain.nnet.attention, speechbrain.nnet.RNN, speechbrain.decoders.seq2seq), imported with the
    torchaudio stand-in if needed; skips the test when SpeechBrain is not installed."""
    if importlib.util.find_spec("speechbrain") is None:
        pytest.skip(f"SpeechBrain is not installed ({SPEECHBRAIN_INSTALL})")
    if not all(name in sys.modules for name in SPEECHBRAIN_MODULES) and not working_torchaudio():
        sys.modules["torchaudio"] = TorchaudioStandIn("torchaudio")
        try:
            for name in SPEECHBRAIN_MODULES:
                importlib.import_module(name)
        finally:
            # SpeechBrain's modules keep their reference to the stand-in; nobody else gets it from an import.
            del sys.modules["torchaudio"]
    return tuple(importlib.import_module(name) for name in SPEECHBRAIN_MODULES)


def import_opennmt():
    """onmt.modules.global_attention (and onmt.decoders.decoder); skips when OpenNMT-py is not installed."""
    if importlib.util.find_spec("onmt") is None:
        pytest.skip(f"OpenNMT-py is not installed ({OPENNMT_INSTALL})")
    return (importlib.import_module("onmt.modules.global_attention"),
            importlib.import_module("onmt.decoders.decoder"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """Relative error (attn_fast.tolerances.relative_error) within `tolerance`, naming what is compared."""
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:.1g}"


def assert_gradients_close(replaced: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                           dtype: torch.dtype) -> None:
    """Gradients by name (parameters and inputs): the same names, every one within the gradient tolerance, and
    none of them all zeros (a gradient that never flows would pass any comparison with itself)."""
    assert replaced.keys() == original.keys()
    for name, expected in original.items():
        assert expected is not None and replaced[name] is not None, f"no gradient for {name}"
        assert expected.abs().max() > 0, f"the original's gradient of {name} is all zeros: nothing is tested"
        assert_close(replaced[name], expected, gradient_tolerance(dtype), f"gradient of {name}")


def to_cpu(tensors):
    """The tensors of a (nested) tuple, list or dict, on the CPU; None stays None."""
    if isinstance(tensors, torch.Tensor):
        return tensors.cpu()
    if isinstance(tensors, dict):
        return {name: to_cpu(value) for name, value in tensors.items()}
    if isinstance(tensors, (tuple, list)):
        return type(tensors)(to_cpu(value) for value in tensors)
    return tensors


@contextlib.contextmanager
def without_tf32():
    """float32 convolutions and matrix products in full float32 on a GPU while the block runs (cuDNN takes TF32 by
    default, ~1e-3 relative error: far from the float32 tolerance), as the CPU computes them; restored after."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def random_coefficients(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Fixed random weights for a scalar loss, so that no output or gradient cancels out by symmetry."""
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
