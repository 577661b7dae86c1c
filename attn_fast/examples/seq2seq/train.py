"""Train the Seq2Seq model (single process): `attn-fast train` on the command line, `train(TrainConfig(...))` here.

    result = train(TrainConfig(max_steps=3000, out_dir="runs/dates"))      # the date task by default
    model, src_vocab, tgt_vocab, info = load_checkpoint("runs/dates/best.pt")

One run, in order:
  data        the date task (`make_date_splits(data_seed, (train_size, valid_size, 0))`) or two TSV files;
              character vocabularies built from the training pairs (stored in every checkpoint)
  model       `Seq2Seq` (decoder "parallel" or "bahdanau"), AdamW, gradient clipping by global norm
  loop        epochs of length-bucketed batches; the batch order of epoch e depends only on (seed, e), so a run
              can stop and resume anywhere inside an epoch; a tqdm bar shows the loss and the teacher-forced
              token accuracy of the epoch so far
  validation  at the end of each epoch, and when the run stops early: greedy decoding of the validation pairs,
              exact match and character accuracy
  checkpoints in `out_dir`: `best.pt` (best validation exact match so far) and `last.pt` (where the run is now),
              both written atomically (a temporary file in the same directory, then os.replace)
  stop        after `epochs` epochs, or `max_steps` optimizer steps in all (then `epochs` is ignored), or
              `time_limit` seconds of this invocation, whichever comes first

Resuming from `last.pt` restores the model, the optimizer, the position (step, epoch, batch within the epoch), the
best metric and torch's RNG state (dropout), so that it continues exactly as the uninterrupted run would have: on
CPU, N steps straight and N/2 + resume + N/2 give identical parameters. The architecture and the vocabularies come
from the checkpoint; the data, the device, the attention backend and the stopping rules from the new config.

Under `torchrun` (WORLD_SIZE > 1) the same function trains with DistributedDataParallel, gloo on CPU and nccl on
GPU: each process takes its shard of every epoch's batches, rank 0 validates and writes the checkpoints (see
`distributed.py`). A checkpoint keeps every rank's RNG state, so a resume with the same number of processes is
exact too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Sequence

import torch
from torch.nn import functional as F

from attn_fast.examples import distributed
from attn_fast.examples.seq2seq.data import Batch, CharVocab, Pair, batches, build_vocabs, exact_match, make_date_splits, read_tsv
from attn_fast.examples.seq2seq.model import Seq2Seq

__all__ = ["TrainConfig", "TrainResult", "train", "train_step", "evaluate", "character_accuracy",
           "epoch_batches", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "attn-fast-seq2seq-checkpoint/1"


@dataclass
class TrainConfig:
    """Everything a run depends on. The defaults train the date task to ~100% validation exact match in a few
    minutes on a 2-core CPU (see `attn-fast train --help`)."""

    # Data: the date task, unless both TSV files are given.
    data_tsv: str | None = None       # `source<TAB>target` training pairs
    valid_tsv: str | None = None      # `source<TAB>target` validation pairs
    train_size: int = 20000           # date task: training examples
    valid_size: int = 1000            # date task: validation examples
    data_seed: int = 0                # date task: which dates go to which split, and the examples drawn
    # Model.
    decoder: str = "parallel"         # "parallel" (one attention call for all steps) or "bahdanau"
    attention_backend: str = "auto"   # "auto", "triton", "torch", "reference"
    embed_dim: int = 64
    hidden_dim: int = 128
    attn_dim: int = 64
    dropout: float = 0.0
    # Optimization.
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    grad_clip: float = 1.0            # max global gradient norm; 0 = no clipping
    epochs: int = 5
    max_steps: int | None = None      # total optimizer steps (counting those before a resume); overrides epochs
    time_limit: float | None = None   # seconds for this invocation
    # Run.
    seed: int = 0                     # model initialization, batch order, dropout
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    out_dir: str | None = "runs/seq2seq"  # where best.pt and last.pt go; None: write no checkpoint
    resume: str | None = None         # a checkpoint (normally last.pt) to continue from
    valid_batch_size: int = 256
    quiet: bool = False               # no progress bar, no per-epoch lines (the summary line is still printed)


@dataclass
class TrainResult:
    """What `train` returns. `history` holds one dict per validation (step, epoch, train_loss, train_token_accuracy,
    valid_exact_match, valid_char_accuracy); `valid` is the last one (None if no validation ran). `model` is the
    model as training left it (the state of last.pt), in eval mode."""

    steps: int
    epoch: int                        # completed epochs
    wall_time: float                  # seconds, this invocation
    best_valid_exact_match: float | None
    stop_reason: str                  # "epochs", "max_steps" or "time_limit"
    valid: dict | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    history: list[dict] = field(default_factory=list)
    model: Seq2Seq | None = field(default=None, repr=False)
    src_vocab: CharVocab | None = field(default=None, repr=False)
    tgt_vocab: CharVocab | None = field(default=None, repr=False)


@dataclass
class RunPosition:
    """Where a run is: steps done in all, current epoch, batches of that epoch done, best metric so far (shared
    with the captioning trainer)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_valid_exact_match: float | None = None


# ----------------------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------------------

def load_pairs(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """(train pairs, validation pairs): from the TSV files if given, else the date task."""
    if (config.data_tsv is None) != (config.valid_tsv is None):
        raise ValueError("give both data_tsv and valid_tsv (--data-tsv, --valid-tsv), or neither for the date task")
    if config.data_tsv is not None:
        return read_tsv(config.data_tsv), read_tsv(config.valid_tsv)
    splits = make_date_splits(config.data_seed, (config.train_size, config.valid_size, 0))
    return splits.train, splits.valid


def epoch_batches(pairs: Sequence[Pair], src_vocab: CharVocab, tgt_vocab: CharVocab, batch_size: int,
                  seed: int, epoch: int) -> list[Batch]:
    """The training batches of `epoch`, shuffled and length-bucketed; a function of (seed, epoch) alone, so that a
    resumed run (or another rank) builds the same list."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(batches(pairs, src_vocab, tgt_vocab, batch_size, shuffle=True, generator=generator))


def _model_config(config: TrainConfig, src_vocab: CharVocab, tgt_vocab: CharVocab) -> dict:
    """Keyword arguments of `Seq2Seq`: what a checkpoint needs to rebuild the model."""
    return dict(src_vocab_size=len(src_vocab), tgt_vocab_size=len(tgt_vocab), embed_dim=config.embed_dim,
                hidden_dim=config.hidden_dim, attn_dim=config.attn_dim, decoder=config.decoder,
                attention_backend=config.attention_backend, dropout=config.dropout,
                pad_id=CharVocab.PAD, bos_id=CharVocab.BOS, eos_id=CharVocab.EOS)


def _build_model(model_config: dict) -> Seq2Seq:
    options = dict(model_config)
    return Seq2Seq(options.pop("src_vocab_size"), options.pop("tgt_vocab_size"), **options)


# ----------------------------------------------------------------------------------------------------------------
# One step, and validation
# ----------------------------------------------------------------------------------------------------------------

def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, grad_clip: float,
               device: torch.device) -> tuple[float, int, int]:
    """One optimizer step on `batch` (teacher forcing, mean cross-entropy over non-PAD target tokens). `model` is a
    `Seq2Seq` or the DistributedDataParallel wrapping one: the loss goes through its forward call, where DDP hooks
    the gradient averaging in. Returns (loss, correctly predicted target tokens, target tokens) of this batch."""
    src, src_lengths, tgt_in, tgt_out = (t.to(device) for t in batch)
    pad_id = getattr(model, "module", model).pad_id
    model.train()
    logits, _ = model(src, src_lengths, tgt_in)
    loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=pad_id)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    real = tgt_out != pad_id
    correct = ((logits.detach().argmax(-1) == tgt_out) & real).sum()
    return loss.item(), int(correct), int(real.sum())


def character_accuracy(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (0..1) of reference characters matched at the same position by the hypothesis (a missing
    character counts as wrong; characters beyond the reference's length are not counted)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    total = sum(len(r) for r in references)
    matched = sum(h == r for hyp, ref in zip(hypotheses, references) for h, r in zip(hyp, ref))
    return matched / max(total, 1)


@torch.no_grad()
def translate(model: Seq2Seq, sources: Sequence[str], src_vocab: CharVocab, tgt_vocab: CharVocab, *,
              batch_size: int = 256, device: torch.device | str = "cpu") -> list[str]:
    """Greedy translations of `sources`, in order. Leaves the model in the mode it found it in."""
    was_training = model.training
    model.eval()
    pairs = [(s, "") for s in sources]
    outputs = []
    for batch in batches(pairs, src_vocab, tgt_vocab, batch_size, shuffle=False, sort_by_length=False):
        decoded = model.greedy(batch.src.to(device), batch.src_lengths.to(device))
        outputs += [tgt_vocab.decode(ids) for ids in decoded.to_lists(model.eos_id)]
    model.train(was_training)
    return outputs


def evaluate(model: Seq2Seq, pairs: Sequence[Pair], src_vocab: CharVocab, tgt_vocab: CharVocab, *,
             batch_size: int = 256, device: torch.device | str = "cpu") -> dict:
    """Greedy decoding of `pairs`: {"exact_match", "char_accuracy"} (fractions, 0..1)."""
    hypotheses = translate(model, [s for s, _ in pairs], src_vocab, tgt_vocab, batch_size=batch_size,
                           device=device)
    references = [t for _, t in pairs]
    return {"exact_match": exact_match(hypotheses, references),
            "char_accuracy": character_accuracy(hypotheses, references)}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """torch.save `checkpoint` to `path` atomically: written to a temporary file in the same directory, flushed to
    disk, then renamed over `path`. A failure leaves the previous file at `path` intact and no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _make_checkpoint(model: Seq2Seq, optimizer: torch.optim.Optimizer, model_config: dict, src_vocab: CharVocab,
                     tgt_vocab: CharVocab, position: RunPosition, valid: dict | None, config: TrainConfig,
                     rank_rng_states: list[torch.Tensor]) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_config,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "src_vocab": src_vocab.to_dict(),
        "tgt_vocab": tgt_vocab.to_dict(),
        "step": position.step,
        "epoch": position.epoch,
        "batch_in_epoch": position.batch_in_epoch,
        "best_valid_exact_match": position.best_valid_exact_match,
        "valid": valid,
        "train_config": dataclasses.asdict(config),
        "world_size": len(rank_rng_states),
        # torch's CPU generator of every rank (dropout masks differ per rank), rank 0's first.
        "rng": {"torch": rank_rng_states[0], "ranks": rank_rng_states,
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }


def _read_checkpoint(path: str | os.PathLike) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an attn-fast Seq2Seq checkpoint ({CHECKPOINT_FORMAT})")
    return checkpoint


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu", *,
                    attention_backend: str | None = None) -> tuple[Seq2Seq, CharVocab, CharVocab, dict]:
    """(model in eval mode on `device`, source vocabulary, target vocabulary, info) from a checkpoint written by
    `train`. info: step, epoch, batch_in_epoch, best_valid_exact_match, valid (metrics when it was written),
    model_config, train_config. `attention_backend` overrides the stored one (e.g. "torch" for a model trained
    with "triton", loaded on a CPU)."""
    checkpoint = _read_checkpoint(path)
    model_config = dict(checkpoint["model_config"])
    if attention_backend is not None:
        model_config["attention_backend"] = attention_backend
    model = _build_model(model_config)
    model.load_state_dict(checkpoint["model"])
    info = {key: checkpoint[key] for key in ("step", "epoch", "batch_in_epoch", "best_valid_exact_match", "valid",
                                             "model_config", "train_config")}
    return (model.to(device).eval(), CharVocab.from_dict(checkpoint["src_vocab"]),
            CharVocab.from_dict(checkpoint["tgt_vocab"]), info)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def stop_reason(config, position: RunPosition, elapsed: float) -> str | None:
    """Why a run must stop now ("max_steps", "epochs", "time_limit"), or None. `config` has max_steps, epochs and
    time_limit (a TrainConfig, or the captioning trainer's config)."""
    if config.max_steps is not None:
        if position.step >= config.max_steps:
            return "max_steps"
    elif position.epoch >= config.epochs:
        return "epochs"
    if config.time_limit is not None and elapsed >= config.time_limit:
        return "time_limit"
    return None


def train(config: TrainConfig) -> TrainResult:
    """Train a Seq2Seq model as `config` says (see the module docstring); returns a `TrainResult` and prints a
    summary line. Under torchrun every process calls this; each returns its own (identical) model."""
    context, device = distributed.setup(config.device)
    try:
        return _train(config, context, device)
    finally:
        distributed.teardown(context)


def _train(config: TrainConfig, context: distributed.Distributed, device: torch.device) -> TrainResult:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    train_pairs, valid_pairs = load_pairs(config)
    if not train_pairs or not valid_pairs:
        raise ValueError(f"need training and validation pairs, got {len(train_pairs)} and {len(valid_pairs)}")

    checkpoint = _read_checkpoint(config.resume) if config.resume else None
    if checkpoint is None:
        src_vocab, tgt_vocab = build_vocabs(train_pairs)
        model_config = _model_config(config, src_vocab, tgt_vocab)
    else:  # architecture and vocabularies are the checkpoint's; the backend is a runtime choice
        src_vocab, tgt_vocab = (CharVocab.from_dict(checkpoint[k]) for k in ("src_vocab", "tgt_vocab"))
        model_config = dict(checkpoint["model_config"], attention_backend=config.attention_backend)
    model = _build_model(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    position = RunPosition()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        position = RunPosition(checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"],
                             checkpoint["best_valid_exact_match"])
        _restore_rng(checkpoint, context, position)
    elif context.enabled:  # same initial weights everywhere (DDP copies rank 0's anyway), different dropout masks
        torch.manual_seed(config.seed * 1_000_003 + context.rank)
    trained = distributed.wrap(model, context, device)

    log = print if context.is_main and not config.quiet else (lambda *args: None)
    out_dir = Path(config.out_dir) if config.out_dir is not None and context.is_main else None
    best_path = last_path = None
    if checkpoint is not None and out_dir is not None and (out_dir / "best.pt").exists():
        best_path = str(out_dir / "best.pt")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"train: {len(train_pairs)} training / {len(valid_pairs)} validation pairs, vocabularies "
        f"{len(src_vocab)} / {len(tgt_vocab)}, {n_params / 1e6:.2f}M parameters, decoder {model_config['decoder']}, "
        f"device {device}" + (f", {context.world_size} processes" if context.enabled else "")
        + (f", resuming at step {position.step}" if checkpoint is not None else ""))

    def agreed_stop() -> str | None:  # every rank must leave the loop at the same step (time limits differ)
        return distributed.from_main(stop_reason(config, position, time.perf_counter() - start), context)

    history, valid = [], None
    while (stop := agreed_stop()) is None:
        # The rest of the current epoch (all of it, unless resuming in its middle): this rank's shard.
        epoch_list = distributed.shard(
            epoch_batches(train_pairs, src_vocab, tgt_vocab, config.batch_size, config.seed, position.epoch),
            context)
        loss_sum, correct, tokens, steps_here = 0.0, 0, 0, 0
        bar = tqdm(total=len(epoch_list), initial=position.batch_in_epoch, desc=f"epoch {position.epoch + 1}",
                   disable=True if config.quiet or not context.is_main else None, leave=False, file=sys.stderr)
        for batch in islice(epoch_list, position.batch_in_epoch, None):
            loss, batch_correct, batch_tokens = train_step(trained, optimizer, batch, config.grad_clip, device)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {position.step + 1}")
            position.step += 1
            position.batch_in_epoch += 1
            loss_sum += loss
            correct += batch_correct
            tokens += batch_tokens
            steps_here += 1
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / steps_here:.4f}", tok_acc=f"{correct / max(tokens, 1):.4f}",
                            refresh=False)
            if distributed.any_rank(stop_reason(config, position, time.perf_counter() - start) is not None,
                                    context):
                break
        bar.close()
        if position.batch_in_epoch >= len(epoch_list):
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0

        # Rank 0 validates, then checkpoints: best.pt when the exact match improved, last.pt always. The training
        # figures of the log line are rank 0's batches.
        rank_rng_states = distributed.gather_to_main(torch.get_rng_state(), context)
        if context.is_main:
            valid = evaluate(model, valid_pairs, src_vocab, tgt_vocab, batch_size=config.valid_batch_size,
                             device=device)
        valid = distributed.from_main(valid, context)
        improved = (position.best_valid_exact_match is None
                    or valid["exact_match"] > position.best_valid_exact_match)
        if improved:
            position.best_valid_exact_match = valid["exact_match"]
        history.append({"step": position.step, "epoch": position.epoch,
                        "train_loss": loss_sum / max(steps_here, 1),
                        "train_token_accuracy": correct / max(tokens, 1),
                        "valid_exact_match": valid["exact_match"], "valid_char_accuracy": valid["char_accuracy"]})
        if out_dir is not None:
            state = _make_checkpoint(model, optimizer, model_config, src_vocab, tgt_vocab, position, valid, config,
                                     rank_rng_states)
            if improved:
                best_path = str(out_dir / "best.pt")
                save_checkpoint(state, best_path)
            last_path = str(out_dir / "last.pt")
            save_checkpoint(state, last_path)
        epochs_done = position.epoch + position.batch_in_epoch / max(len(epoch_list), 1)
        log(f"step {position.step}, epoch {epochs_done:.2f}: train loss {history[-1]['train_loss']:.4f} "
            f"token acc {history[-1]['train_token_accuracy']:.4f} | valid exact match {valid['exact_match']:.4f} "
            f"char acc {valid['char_accuracy']:.4f}" + (" (best)" if improved else ""))

    wall_time = time.perf_counter() - start
    best = position.best_valid_exact_match
    if context.is_main:
        print(f"train: {position.step} steps, {position.epoch} epochs, {wall_time:.1f} s, best valid exact match "
              + (f"{best:.4f}" if best is not None else "n/a") + f" (stopped: {stop})"
              + (f", best checkpoint {best_path}" if best_path else ""))
    return TrainResult(steps=position.step, epoch=position.epoch, wall_time=wall_time,
                       best_valid_exact_match=best, stop_reason=stop, valid=valid, best_checkpoint=best_path,
                       last_checkpoint=last_path, history=history, model=model.eval(), src_vocab=src_vocab,
                       tgt_vocab=tgt_vocab)


def _restore_rng(checkpoint: dict, context: distributed.Distributed, position: RunPosition) -> None:
    """Put back the dropout RNG of the run that wrote `checkpoint` (this rank's, when it ran with as many
    processes). A resume in the middle of an epoch needs the same number of processes: the shards would differ."""
    saved_world_size = checkpoint.get("world_size", 1)
    if saved_world_size != context.world_size and position.batch_in_epoch != 0:
        raise ValueError(f"the checkpoint stopped inside an epoch of a run with {saved_world_size} process(es); "
                         f"resume it with the same number of processes (this run has {context.world_size})")
    rank_states = checkpoint["rng"].get("ranks") or [checkpoint["rng"]["torch"]]
    if len(rank_states) == context.world_size:
        torch.set_rng_state(rank_states[context.rank])
    else:  # a different process count from an epoch boundary: fresh, distinct dropout streams
        torch.manual_seed(position.step * 1_000_003 + context.rank)
    if checkpoint["rng"]["cuda"] is not None and torch.cuda.is_available() and not context.enabled:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
