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


#: Where the Triton kernels run in this process: the GPU when there is one, else the CPU under the interpreter.
TRITON_DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture
def triton_device() -> torch.device:
    """The device every Triton test builds its tensors on (see TRITON_DEVICE): one choice for the whole suite."""
    return TRITON_DEVICE


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` check what only a GPU can (tanh.approx and tensor-core numerics, CUDA graphs, timings):
    skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def cli_processes(tmp_path_factory):
    """Runs `python -m attn_fast.tools.cli ARGS` commands, each in a process of its own forked from one server that
    imported the CLI once (tests/cli_process.py): `cli_processes.run(*args, cwd=..., **environment)`."""
    from tests.cli_process import CliProcesses

    processes = CliProcesses(tmp_path_factory.mktemp("cli-server"))
    yield processes
    processes.close()


@pytest.fixture(scope="session")
def tiny_seq2seq_checkpoint(tmp_path_factory):
    """last.pt of a tiny 8-step `attn-fast train` run (torch backend, CPU), trained once for the session: the
    checkpoint that the translate and evaluate tests of tests/examples only read."""
    from attn_fast.tools.cli import main

    out_dir = tmp_path_factory.mktemp("run")
    argv = ["train", "--train-size", "300", "--valid-size", "20", "--embed-dim", "8", "--hidden-dim", "16",
            "--attn-dim", "8", "--batch-size", "16", "--max-steps", "8", "--attention-backend", "torch",
            "--device", "cpu", "--out-dir", str(out_dir), "--quiet"]
    assert main(argv) == 0
    return out_dir / "last.pt"


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
