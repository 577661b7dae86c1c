"""pytest-benchmark suite of the Seq2Seq model: training step, greedy decoding and beam search, per attention
backend and decoder (`attn_fast.bench.model_bench`; the "date"-size model by default, "nmt" with --bench-full).
Each model's teacher-forced logits are checked against float64 with the reference backend before it is timed."""
import pytest
import torch

from attn_fast.bench.model_bench import DECODERS, EOS, MODEL_CONFIGS, build_model, check_model, synthetic_batch


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
    src, src_lengths, tgt_in, tgt_out = batch
    model = build_model(config, decoder, backend, bench_device)
    check = check_model(model, config, decoder, batch)
    assert check["passed"], f"incorrect, not benchmarked: {check}"
    if task == "train_step":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def work():
            optimizer.zero_grad(set_to_none=True)
            model.loss(src, src_lengths, tgt_in, tgt_out).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    else:
        with torch.no_grad():
            model.decoder.output.bias[EOS] = -1e4  # every sentence decodes exactly tgt_len tokens
        if task == "greedy":
            def work():
                model.greedy(src, src_lengths, max_len=config.tgt_len)
        else:
            def work():
                model.beam_search(src, src_lengths, beam_size=config.beam_size, max_len=config.tgt_len)

    def run():
        work()
        if bench_device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"seq2seq {config.name} {task} {decoder}"
    benchmark.extra_info.update(config=config.as_dict(), sentences_per_call=config.batch,
                                threads=torch.get_num_threads(), logits_error=check["logits_error"])
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
