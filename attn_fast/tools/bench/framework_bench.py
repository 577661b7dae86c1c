"""A real framework's model before and after `swap_attention`: SpeechBrain's AttentionalRNNDecoder (the decoder of
its attention seq2seq ASR recipes), as shipped ("speechbrain", eager attention) and with its attention swapped for
each attn-fast backend that runs on the device ("torch", "cpu" on CPU when numba imports, "triton" on CUDA).

    python -m attn_fast.tools.bench.framework_bench [--config quick|asr|tiny] [--attn content location]

Workloads, for each attention type ("content": ContentBasedAttention, "location": LocationAwareAttention):
    train_step  embedding -> decoder (teacher-forced over tgt_len steps; SpeechBrain's decoder calls the attention
                once per step) -> output layer -> cross-entropy, backward into every parameter and into the encoder
                states (their gradient is what trains an encoder), AdamW step;
    greedy      SpeechBrain's S2SRNNGreedySearcher, step by step, no autograd;
    beam        SpeechBrain's S2SRNNBeamSearcher (which reorders the location attention's prev_attn per step).
Decoding runs an untrained model whose EOS logit is pushed to -1e4, so that every utterance is decoded for exactly
tgt_len steps (max_decode_ratio = tgt_len / src_len): the work is the same for every variant and run.

Sizes (`FRAMEWORK_CONFIGS`): "asr" is SpeechBrain's LibriSpeech/TIMIT seq2seq recipe size (encoder 512, GRU
decoder 1024, attention 1024, 10 location channels of width 201) at 200 encoder frames (about 8 s of audio after
the CRDNN's 4x time pooling) and 40 output tokens, B = 8; "quick" halves the widths and lengths for a run of a
few minutes on a 2-core CPU; "tiny" is for tests.

Correct before timed: each swapped decoder's teacher-forced outputs are compared with the eager one's on the same
weights and inputs (relative error within the fp32 forward tolerance times MODEL_TOLERANCE_FACTOR, as the Seq2Seq
model bench allows through its recurrent layers); a variant that fails is reported as failed and not timed.

SpeechBrain 1.1.2 imports torchaudio when it is imported; where none can be imported (PyPI's torchaudio wheels
are built for one CUDA torch release each and do not load against a CPU torch), the section reports that
SpeechBrain is not importable and times nothing.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import pathlib
import time

import torch
from torch import nn

from attn_fast.integrations import swap_attention
from attn_fast.tolerances import forward_tolerance, relative_error
from attn_fast.tools.bench.cases import backends_for
from attn_fast.tools.bench.timing import time_cpu

__all__ = ["FRAMEWORK_CONFIGS", "FrameworkConfig", "import_speechbrain", "run_framework_bench", "framework_table"]

#: As the Seq2Seq model bench (model_bench.MODEL_TOLERANCE_FACTOR): attention errors grow a little through the GRU
#: and the output layer.
MODEL_TOLERANCE_FACTOR = 10
ATTN_TYPES = ("content", "location")
BOS, EOS = 0, 1
EAGER = "speechbrain"


@dataclasses.dataclass(frozen=True)
class FrameworkConfig:
    """One size of the SpeechBrain decoder bench. src_len: encoder frames; tgt_len: output tokens (decoder steps);
    channels / kernel_size: LocationAwareAttention's (its convolution is 2 * kernel_size + 1 wide)."""

    name: str
    batch: int
    src_len: int
    tgt_len: int
    enc_dim: int
    hidden: int
    attn_dim: int
    emb_dim: int
    vocab: int
    channels: int
    kernel_size: int
    beam_size: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FRAMEWORK_CONFIGS = {
    "tiny": FrameworkConfig("tiny", batch=2, src_len=12, tgt_len=4, enc_dim=8, hidden=8, attn_dim=8, emb_dim=4,
                            vocab=10, channels=2, kernel_size=2, beam_size=2),
    "quick": FrameworkConfig("quick", batch=8, src_len=100, tgt_len=20, enc_dim=256, hidden=512, attn_dim=512,
                             emb_dim=128, vocab=1000, channels=10, kernel_size=50, beam_size=4),
    "asr": FrameworkConfig("asr", batch=8, src_len=200, tgt_len=40, enc_dim=512, hidden=1024, attn_dim=1024,
                           emb_dim=128, vocab=5000, channels=10, kernel_size=100, beam_size=4),
}


def import_speechbrain():
    """(speechbrain.nnet.RNN, speechbrain.nnet.linear, speechbrain.decoders.seq2seq), or the one-line reason they
    cannot be imported here."""
    try:
        return tuple(importlib.import_module(name) for name in
                     ("speechbrain.nnet.RNN", "speechbrain.nnet.linear", "speechbrain.decoders.seq2seq"))
    except (ImportError, OSError) as error:  # OSError: a torchaudio built for another torch
        if "torchaudio" in str(error):
            return (f"SpeechBrain imports torchaudio, which does not import here ({type(error).__name__}: {error}); "
                    f"it needs the torchaudio build of this torch ({torch.__version__})")
        return (f"SpeechBrain is not importable ({type(error).__name__}: {error}); "
                f'pip install -e ".[integrations]" && pip install --no-deps speechbrain==1.1.2')


def framework_versions() -> dict:
    """Installed versions of the toolkit and of the bench's other moving parts (None when not installed)."""
    versions = {}
    for package in ("speechbrain", "numba"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def build_parts(speechbrain, config: FrameworkConfig, attn_type: str, device: torch.device, seed: int = 0) -> dict:
    """The embedding, SpeechBrain's decoder and SpeechBrain's output Linear, random weights from `seed`."""
    rnn, linear, _ = speechbrain
    torch.manual_seed(seed)
    location = {"channels": config.channels, "kernel_size": config.kernel_size} if attn_type == "location" else {}
    decoder = rnn.AttentionalRNNDecoder("gru", attn_type, config.hidden, config.attn_dim, 1, enc_dim=config.enc_dim,
                                        input_size=config.emb_dim, **location)
    parts = {"embedding": nn.Embedding(config.vocab, config.emb_dim), "decoder": decoder,
             "output": linear.Linear(n_neurons=config.vocab, input_size=config.hidden)}
    return {name: part.to(device) for name, part in parts.items()}


def synthetic_batch(config: FrameworkConfig, device: torch.device, seed: int = 0) -> dict:
    """Encoder states [B, S, enc_dim] (a leaf with gradients: an encoder would be trained through them),
    relative lengths [B] in [0.5, 1] (the first 1, as SpeechBrain's padded batches have), tokens [B, T + 1]."""
    generator = torch.Generator().manual_seed(seed)
    wav_len = 0.5 + 0.5 * torch.rand(config.batch, generator=generator)
    wav_len[0] = 1.0
    tokens = torch.randint(2, config.vocab, (config.batch, config.tgt_len + 1), generator=generator)
    tokens[:, 0] = BOS
    enc_states = torch.randn(config.batch, config.src_len, config.enc_dim, generator=generator)
    return {"enc_states": enc_states.to(device).requires_grad_(), "wav_len": wav_len.to(device),
            "tokens": tokens.to(device)}


def teacher_forced(parts: dict, batch: dict) -> torch.Tensor:
    """Logits [B, T, vocab] of the teacher-forced decoder."""
    inputs = parts["embedding"](batch["tokens"][:, :-1])
    outputs, _ = parts["decoder"](inputs, batch["enc_states"], batch["wav_len"])
    return parts["output"](outputs)


def check(parts: dict, eager_parts: dict, batch: dict) -> dict:
    """Teacher-forced logits of a swapped decoder against the eager one with the same weights."""
    with torch.no_grad():
        error = relative_error(teacher_forced(parts, batch), teacher_forced(eager_parts, batch))
    tolerance = forward_tolerance(torch.float32) * MODEL_TOLERANCE_FACTOR
    return {"logits_error": error, "tolerance": tolerance, "passed": error <= tolerance}


def train_step_workload(parts: dict, batch: dict):
    """zero_grad, teacher-forced cross-entropy, backward (into the encoder states too), AdamW step."""
    parameters = [p for part in parts.values() for p in part.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    for part in parts.values():
        part.train()
    targets = batch["tokens"][:, 1:]

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        batch["enc_states"].grad = None
        logits = teacher_forced(parts, batch)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
    return train_step


def decode_workloads(speechbrain, parts: dict, config: FrameworkConfig, batch: dict) -> dict:
    """{"greedy", "beam"}: SpeechBrain's own searchers over the decoder, exactly tgt_len steps each."""
    seq2seq = speechbrain[2]
    for part in parts.values():
        part.eval()
    with torch.no_grad():
        parts["output"].w.bias[EOS] = -1e4  # never ends early: the same work for every variant
    ratio = config.tgt_len / config.src_len
    common = {"bos_index": BOS, "eos_index": EOS, "min_decode_ratio": 0.0, "max_decode_ratio": ratio}
    greedy = seq2seq.S2SRNNGreedySearcher(parts["embedding"], parts["decoder"], parts["output"], **common)
    beam = seq2seq.S2SRNNBeamSearcher(parts["embedding"], parts["decoder"], parts["output"],
                                      beam_size=config.beam_size, **common)
    enc_states = batch["enc_states"].detach()

    def run(searcher):
        def decode():
            with torch.no_grad():
                searcher(enc_states, batch["wav_len"])
        return decode
    return {"greedy": run(greedy), "beam": run(beam)}


def timer(device: torch.device, target_s: float):
    """CPU wall clock; on CUDA the same with a synchronization after each call (a decoder step is many small
    kernels plus host work: the wall clock of the whole step is what a user waits for)."""
    def timed(run):
        if device.type == "cuda":
            def synchronized():
                run()
                torch.cuda.synchronize()
            return time_cpu(synchronized, target_s=target_s, max_repeats=10)
        return time_cpu(run, target_s=target_s, max_repeats=10)
    return timed


def bench_variant(speechbrain, config: FrameworkConfig, attn_type: str, variant: str, device: torch.device, *,
                  target_s: float) -> dict:
    """Train step, greedy and beam for the eager decoder (variant "speechbrain") or one swapped to `variant`."""
    result = {"attn_type": attn_type, "variant": variant, "status": "failed"}
    batch = synthetic_batch(config, device)
    eager_parts = build_parts(speechbrain, config, attn_type, device)

    def variant_parts() -> dict:
        """A copy of the eager parts, the decoder's attention swapped unless the variant is the eager one."""
        parts = copy.deepcopy(eager_parts)
        if variant != EAGER:
            report = swap_attention(parts["decoder"], backend=variant, strict=True)
            result["swapped"] = [f"{entry.path}: {entry.original} -> {entry.replacement}" for entry in report.swapped]
        return parts

    try:
        parts = variant_parts()
        if variant != EAGER:
            result["check"] = check(parts, eager_parts, batch)
            if not result["check"]["passed"]:
                result["error"] = (f"logits error {result['check']['logits_error']:.2e} > "
                                   f"{result['check']['tolerance']:.0e}")
                return result
        timed = timer(device, target_s)
        result["train_step"] = timed(train_step_workload(parts, batch))
        decoding = decode_workloads(speechbrain, variant_parts(), config, batch)  # untrained weights, as eager's
        result["greedy"] = timed(decoding["greedy"])
        result["beam"] = timed(decoding["beam"])
    except Exception as error:  # e.g. a backend that cannot run these inputs: reported, the others still run
        result["error"] = f"{type(error).__name__}: {error}"
        return result
    result["status"] = "ok"
    return result


def run_framework_bench(device: torch.device | str = "cpu", *, config: str = "quick", attn_types=ATTN_TYPES,
                        backends=None, target_s: float = 1.0) -> dict:
    """SpeechBrain's decoder, eager and swapped to each of `backends` (default: attn-fast's backends that run on
    the device), for each attention type. Returns {"status", "config", "results", "wall_s"} with each swapped
    row's speed-up against the eager row of its attention type; status "skipped" (with "reason") when
    SpeechBrain is not importable."""
    started = time.perf_counter()
    device = torch.device(device)
    speechbrain = import_speechbrain()
    if isinstance(speechbrain, str):
        return {"status": "skipped", "reason": speechbrain}
    sizes = FRAMEWORK_CONFIGS[config]
    if backends is None:
        backends = [backend for backend in backends_for(device) if backend not in ("reference", "compile")]
    results = [bench_variant(speechbrain, sizes, attn_type, variant, device, target_s=target_s)
               for attn_type in attn_types for variant in (EAGER, *backends)]
    for result in results:
        eager = next((row for row in results if row["attn_type"] == result["attn_type"]
                      and row["variant"] == EAGER and row["status"] == "ok"), None)
        if result["status"] == "ok" and eager is not None:
            for workload in ("train_step", "greedy", "beam"):
                result[f"{workload}_speedup"] = eager[workload]["median_s"] / result[workload]["median_s"]
    return {"status": "ok", "config": sizes.as_dict(), "threads": torch.get_num_threads(), "device": str(device),
            "results": results, "wall_s": time.perf_counter() - started}


def framework_table(result: dict) -> str:
    """The section as text: one row per (attention type, variant), median times and speed-ups against eager."""
    if result["status"] != "ok":
        return f"SpeechBrain decoder before/after swap_attention: skipped ({result['reason']})"
    config = result["config"]
    lines = [f"SpeechBrain AttentionalRNNDecoder before/after swap_attention ({config['name']}: B={config['batch']} "
             f"S={config['src_len']} T={config['tgt_len']} enc={config['enc_dim']} hidden={config['hidden']} "
             f"attn={config['attn_dim']} beam={config['beam_size']}; {result['device']}, {result['threads']} "
             f"thread(s); median s, x = speed-up vs speechbrain)",
             f"{'attention':<10} {'variant':<12} {'train step':>16} {'greedy':>16} {'beam':>16}  check"]
    for row in result["results"]:
        if row["status"] != "ok":
            lines.append(f"{row['attn_type']:<10} {row['variant']:<12} failed: {row['error']}")
            continue
        cells = []
        for workload in ("train_step", "greedy", "beam"):
            speedup = row.get(f"{workload}_speedup")
            cells.append(f"{row[workload]['median_s']:.3f}" + (f" ({speedup:.2f}x)" if speedup else ""))
        check_cell = f"logits err {row['check']['logits_error']:.1e}" if "check" in row else "eager"
        lines.append(f"{row['attn_type']:<10} {row['variant']:<12} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}  "
                     f"{check_cell}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(FRAMEWORK_CONFIGS), default="quick")
    parser.add_argument("--attn", nargs="+", choices=ATTN_TYPES, default=list(ATTN_TYPES))
    parser.add_argument("--backends", nargs="+", default=None, help="attn-fast backends to swap to")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--target-s", type=float, default=1.0, help="seconds of samples per timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's setting)")
    parser.add_argument("--json", metavar="PATH", help="also write the result, every raw sample included, here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_framework_bench(args.device, config=args.config, attn_types=args.attn, backends=args.backends,
                                 target_s=args.target_s)
    result["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    result["versions"] = {"torch": torch.__version__, **framework_versions()}
    print(framework_table(result))
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"written: {path}")
    return 0 if result["status"] != "ok" or all(row["status"] == "ok" for row in result["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
