"""pytest-benchmark suite of the Seq2Seq model: training step, greedy decoding and beam search, per attention
backend and decoder (`attn_fast.tools.bench.model_bench`; the "date"-size model by default, "nmt" with --bench-full),
every layer backend that runs here (the fused "cpu" one included).
Each model's teacher-forced logits are checked against float64 with the reference backend before it is timed."""
import pytest
import torch

from attn_fast.tools.bench.cases import backends_for
from attn_fast.tools.bench.model_bench import (
    DECODERS,
    MODEL_CONFIGS,
    build_model,
    check_model,
    decode_workloads,
    synthetic_batch,
    train_step_workload,
)


def _backends():
    """The layer's backends that run on this machine's bench device (the fused "cpu" one on CPU when numba imports,
    Triton on a usable GPU); torch.compile(reference) is an op-level baseline only."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [backend for backend in backends_for(device) if backend != "compile"]


@pytest.fixture
def config(request):
    return MODEL_CONFIGS["nmt" if request.config.getoption("--bench-full") else "date"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("task", ["train_step", "greedy", "beam"])
def test_model(benchmark, config, bench_device, task, decoder, backend):
    batch = synthetic_batch(config, bench_device)
    model = build_model(config, decoder, backend, bench_device)
    check = check_model(model, config, decoder, batch)
    assert check["passed"], f"incorrect, not benchmarked: {check}"
    if task == "train_step":
        work = train_step_workload(model, batch)
    else:
        work = decode_workloads(model, config, batch)[task]

    def run():
        work()
        if bench_device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"seq2seq {config.name} {task} {decoder}"
    benchmark.extra_info.update(config=config.as_dict(), sentences_per_call=config.batch,
                                threads=torch.get_num_threads(), logits_error=check["logits_error"])
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
