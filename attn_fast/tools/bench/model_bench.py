"""The Seq2Seq example model with each attention backend and both decoders: training step time, and greedy and
beam-search decoding throughput (sentences/s).

Sizes (`shapes.MODEL_CONFIGS`): "date" is the model `attn-fast train` trains by default (embed 64, hidden 128, attention
64) at the date task's lengths, for the quick run; "nmt" is an NMT-sized model (the `Seq2Seq` defaults: embed
256, hidden 512, attention 256; vocabulary 8,000; B = 32, S = T = 50, nmt_train's attention shape) for --full;
"tiny" is for CI. Batches are synthetic random token ids with random source lengths: the cost of a step does not
depend on what the tokens mean.

Training step = zero_grad, teacher-forced loss, backward, gradient clipping, AdamW step. Decoding runs an untrained
model whose EOS logit is pushed to -1e4, so every sentence is decoded to exactly `tgt_len` tokens: the work is the
same for every backend and run (an untrained model would otherwise stop at random steps). Beam search shares the
encoder memory across beams (`index`), as `Seq2Seq.beam_search` does.

Backends are those of the `AdditiveAttention` layer that run on the device (`cases.backends_for`): "reference"
(eager), "torch", on CPU the fused "cpu" kernels (when numba imports) and on CUDA "triton"; torch.compile(reference)
is an op-level comparison only (the layer has no such backend).

Correct before timed: each (backend, decoder) model's teacher-forced logits are compared with the same weights in
float64 with the reference backend (relative error <= the fp32 forward tolerance times `MODEL_TOLERANCE_FACTOR`,
since GRU and readout layers follow the attention); a model that fails is reported as failed and not timed.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from attn_fast.examples.seq2seq.model import Seq2Seq
from attn_fast.tolerances import forward_tolerance, relative_error
from attn_fast.tools.bench.shapes import MODEL_CONFIGS, ModelConfig
from attn_fast.tools.bench.timing import time_cpu

__all__ = ["MODEL_CONFIGS", "ModelConfig", "DECODERS", "run_model_bench", "bench_one", "build_model", "check_model",
           "synthetic_batch"]

PAD, BOS, EOS = 0, 1, 2
#: Errors of the attention (<= 1e-5 in fp32) grow a little through the recurrent layers and the readout.
MODEL_TOLERANCE_FACTOR = 10


DECODERS = ("bahdanau", "parallel")


def synthetic_batch(config: ModelConfig, device: torch.device, seed: int = 0):
    """src [B, S] (padded), src_lengths [B] in S/2..S (the longest = S), tgt_in [B, T] (BOS first), tgt_out [B, T]
    (EOS last), every other token uniform over the non-special ids."""
    generator = torch.Generator().manual_seed(seed)
    batch, src_len, tgt_len = config.batch, config.src_len, config.tgt_len
    src = torch.randint(3, config.vocab_size, (batch, src_len), generator=generator)
    src_lengths = torch.randint(max(1, src_len // 2), src_len + 1, (batch,), generator=generator)
    src_lengths[0] = src_len
    src[torch.arange(src_len)[None, :] >= src_lengths[:, None]] = PAD
    body = torch.randint(3, config.vocab_size, (batch, tgt_len - 1), generator=generator)
    tgt_in = torch.cat([torch.full((batch, 1), BOS), body], dim=1)
    tgt_out = torch.cat([body, torch.full((batch, 1), EOS)], dim=1)
    return tuple(tensor.to(device) for tensor in (src, src_lengths, tgt_in, tgt_out))


def build_model(config: ModelConfig, decoder: str, backend: str, device: torch.device, seed: int = 0) -> Seq2Seq:
    torch.manual_seed(seed)
    model = Seq2Seq(config.vocab_size, config.vocab_size, embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
                    attn_dim=config.attn_dim, decoder=decoder, attention_backend=backend, pad_id=PAD, bos_id=BOS,
                    eos_id=EOS)
    return model.to(device)


def check_model(model: Seq2Seq, config: ModelConfig, decoder: str, batch) -> dict:
    """Teacher-forced logits of `model` against a float64 copy with the reference backend."""
    src, src_lengths, tgt_in, _ = batch
    oracle = build_model(config, decoder, "reference", src.device)
    oracle.load_state_dict(model.state_dict())
    oracle.double().eval()
    model.eval()
    with torch.no_grad():
        logits, _ = model(src, src_lengths, tgt_in)
        expected, _ = oracle(src, src_lengths, tgt_in)
    error = relative_error(logits, expected)
    tolerance = forward_tolerance(torch.float32) * MODEL_TOLERANCE_FACTOR
    return {"logits_error": error, "tolerance": tolerance, "passed": error <= tolerance}


def _timer(device: torch.device, target_s: float):
    """A timing function: CPU wall clock, or the same with a device synchronization after each call on CUDA (a
    model step is many kernels and host work; the wall clock of the whole step is what a user waits for)."""
    def timed(run):
        if device.type == "cuda":
            def synchronized():
                run()
                torch.cuda.synchronize()
            return time_cpu(synchronized, target_s=target_s, max_repeats=20)
        return time_cpu(run, target_s=target_s, max_repeats=20)
    return timed


def train_step_workload(model: Seq2Seq, batch) -> Callable[[], None]:
    """One training step on `batch` (zero_grad, teacher-forced loss, backward, clipping, AdamW step); puts the
    model in training mode."""
    src, src_lengths, tgt_in, tgt_out = batch
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model.loss(src, src_lengths, tgt_in, tgt_out).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return train_step


def decode_workloads(model: Seq2Seq, config: ModelConfig, batch) -> dict[str, Callable[[], None]]:
    """{"greedy", "beam"}: decoding `batch` to exactly `config.tgt_len` tokens per sentence (the EOS logit of this
    model is pushed to -1e4, so the work is the same for every backend and run); puts the model in eval mode."""
    src, src_lengths = batch[0], batch[1]
    model.eval()
    with torch.no_grad():
        model.decoder.output.bias[EOS] = -1e4
    return {"greedy": lambda: model.greedy(src, src_lengths, max_len=config.tgt_len),
            "beam": lambda: model.beam_search(src, src_lengths, beam_size=config.beam_size,
                                              max_len=config.tgt_len)}


def bench_one(config: ModelConfig, decoder: str, backend: str, device: torch.device, *, target_s: float) -> dict:
    """Train step, greedy and beam for one (backend, decoder). Returns a result dict (status "ok" or "failed")."""
    result = {"decoder": decoder, "backend": backend, "status": "failed"}
    batch = synthetic_batch(config, device)
    try:
        model = build_model(config, decoder, backend, device)
        result["check"] = check_model(model, config, decoder, batch)
    except Exception as error:  # e.g. a backend unavailable on this device
        result["error"] = f"{type(error).__name__}: {error}"
        return result
    if not result["check"]["passed"]:
        result["error"] = f"logits error {result['check']['logits_error']:.2e} > {result['check']['tolerance']:.0e}"
        return result
    timed = _timer(device, target_s)
    result["train_step"] = timed(train_step_workload(model, batch))
    decoding = decode_workloads(build_model(config, decoder, backend, device), config, batch)
    result["greedy"] = timed(decoding["greedy"])
    result["beam"] = timed(decoding["beam"])
    result["greedy_sentences_per_s"] = config.batch / result["greedy"]["median_s"]
    result["beam_sentences_per_s"] = config.batch / result["beam"]["median_s"]
    result["train_tokens_per_s"] = int(config.batch * config.tgt_len / result["train_step"]["median_s"])
    result["status"] = "ok"
    return result


def run_model_bench(config: ModelConfig, backends, device: torch.device, *, decoders=DECODERS, target_s: float = 0.5,
                    progress: bool = True) -> dict:
    """Every (decoder, backend) of `config`. Returns {"config", "results": [...]} with speed-ups against the
    reference backend of the same decoder filled in."""
    started = time.perf_counter()
    pairs = [(decoder, backend) for decoder in decoders for backend in backends]
    results = []
    for decoder, backend in tqdm(pairs, desc="model", disable=not progress, leave=False):
        results.append(bench_one(config, decoder, backend, device, target_s=target_s))
    for result in results:
        eager = next((r for r in results if r["decoder"] == result["decoder"] and r["backend"] == "reference"
                      and r["status"] == "ok"), None)
        if result["status"] == "ok" and eager is not None:
            result["train_speedup_vs_eager"] = eager["train_step"]["median_s"] / result["train_step"]["median_s"]
            result["greedy_speedup_vs_eager"] = result["greedy_sentences_per_s"] / eager["greedy_sentences_per_s"]
            result["beam_speedup_vs_eager"] = result["beam_sentences_per_s"] / eager["beam_sentences_per_s"]
    return {"config": config.as_dict(), "results": results, "wall_s": time.perf_counter() - started}
