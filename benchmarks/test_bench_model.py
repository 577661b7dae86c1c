"""pytest-benchmark suite of the Seq2Seq model: training step, greedy decoding and beam search, per attention
backend and decoder (`attn_fast.tools.bench.model_bench`; the "date"-size model by default, "nmt" with --bench-full).
Each model's teacher-forced logits are checked against float64 with the reference backend before it is timed."""
import pytest
import torch

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
    backends = ["reference", "torch"]
    if torch.cuda.is_available():
        from attn_fast.functional import triton_usable

        if triton_usable(torch.device("cuda")):
            backends.append("triton")
    return backends


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
