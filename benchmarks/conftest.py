"""pytest-benchmark suites of attn-fast (op and Seq2Seq model), over the same case definitions as `attn-fast bench`:

    python -m pytest benchmarks --benchmark-only -q                 the quick selection
    python -m pytest benchmarks --benchmark-only -q --bench-full    every named shape, dtype and the NMT-size model

The repository's test command (`python -m pytest -q`, testpaths = tests) does not collect this folder. Triton is
benchmarked on CUDA only; this process never turns the Triton interpreter on.
"""
import pytest
import torch

from attn_fast.cpu_warmup import warm_cpu_math

# pytorch#188792: the first multi-threaded float32 tanh/exp of a process can be inaccurate.
warm_cpu_math()


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="attn-fast: the full benchmark set (all named shapes and dtypes, NMT-size model)")


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
