"""Train the captioning model: `attn-fast train --task captions` on the command line, `train(CaptionTrainConfig())`
here.

    result = train(CaptionTrainConfig(out_dir="runs/captions"))
    model, vocab, info = load_checkpoint("runs/captions/best.pt")
    captions, decoded = caption_images(model, images, vocab)           # decoded.attention [B, L_out, grid²]
    scores = evaluate(model, test_scenes, vocab)                        # exact match, BLEU, grounding vs chance

One run: the scene splits of `data_seed` (train and valid), `Captioner`, AdamW with gradient clipping, epochs of
shuffled batches whose order depends only on (seed, epoch), a tqdm bar (loss, token accuracy), validation after
each epoch and when the run stops early (greedy decoding: exact match, BLEU, grounding), `best.pt` (best validation
exact match) and `last.pt` written atomically with `seq2seq.train.save_checkpoint`. The run stops after `epochs`
epochs, `max_steps` optimizer steps in all (then `epochs` is ignored) or `time_limit` seconds of this invocation.
Resuming from `last.pt` restores model, optimizer, position and torch's RNG state, so that it continues as the
uninterrupted run would have; the architecture comes from the checkpoint, everything else from the new config.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Sequence

import torch

from attn_fast.examples.seq2seq.train import RunPosition, save_checkpoint, stop_reason
from attn_fast.examples.captioning.data import CaptionBatch, Scene, WordVocab, batches, make_scene_splits, render_images
from attn_fast.examples.captioning.metrics import bleu, exact_match, grounding_score
from attn_fast.examples.captioning.model import Captioner

__all__ = ["CaptionTrainConfig", "CaptionTrainResult", "train", "train_step", "caption_images", "evaluate",
           "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "attn-fast-captioning-checkpoint/1"
MAX_CAPTION_WORDS = 20  # decoding limit; the grammar's longest caption has 13 words


@dataclass
class CaptionTrainConfig:
    """Everything a captioning run depends on. The defaults reach high validation exact match in a few minutes on a
    2-core CPU (see `attn-fast train --task captions --help`). Names shared with `seq2seq.train.TrainConfig` mean
    the same thing."""

    # Data.
    train_size: int = 20000
    valid_size: int = 1000
    data_seed: int = 0                # which scenes are drawn and which split each goes to
    image_size: int = 64              # a multiple of 8; the grid is image_size / 8 cells a side
    # Model.
    attention_backend: str = "auto"   # "auto", "triton", "torch", "reference"
    embed_dim: int = 64
    hidden_dim: int = 128
    attn_dim: int = 64
    channels: int = 64                # annotation size C (CNN width)
    initial_state: str = "zeros"      # decoder's h_0, c_0: "zeros" or "mean" (the paper's; see model.py)
    dropout: float = 0.0
    attention_reg: float = 0.01       # λ of the doubly stochastic regularization (0: off)
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
    out_dir: str | None = "runs/captions"  # where best.pt and last.pt go; None: write no checkpoint
    resume: str | None = None         # a checkpoint (normally last.pt) to continue from
    valid_batch_size: int = 256
    quiet: bool = False               # no progress bar, no per-epoch lines (the summary line is still printed)


@dataclass
class CaptionTrainResult:
    """What `train` returns. `history` holds one dict per validation (step, epoch, train_loss,
    train_token_accuracy and the `evaluate` scores prefixed valid_); `model` is in the state of last.pt, eval
    mode."""

    steps: int
    epoch: int
    wall_time: float
    best_valid_exact_match: float | None
    stop_reason: str                  # "epochs", "max_steps" or "time_limit"
    valid: dict | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    history: list[dict] = field(default_factory=list)
    model: Captioner | None = field(default=None, repr=False)
    vocab: WordVocab | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------------------
# Steps, decoding, evaluation
# ----------------------------------------------------------------------------------------------------------------

def train_step(model: Captioner, optimizer: torch.optim.Optimizer, batch: CaptionBatch, *, attention_reg: float,
               grad_clip: float, device: torch.device) -> tuple[float, int, int]:
    """One optimizer step (teacher forcing). Returns (cross-entropy, correctly predicted tokens, tokens)."""
    images, tgt_in, tgt_out = (t.to(device) for t in batch)
    model.train()
    loss, cross_entropy, logits = model.loss(images, tgt_in, tgt_out, attention_reg=attention_reg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    real = tgt_out != model.pad_id
    correct = ((logits.detach().argmax(-1) == tgt_out) & real).sum()
    return cross_entropy.item(), int(correct), int(real.sum())


@torch.no_grad()
def caption_images(model: Captioner, images: torch.Tensor, vocab: WordVocab, *, beam_size: int = 1,
                   max_len: int = MAX_CAPTION_WORDS):
    """Captions of images [B, 3, H, W] (on the model's device) and the `Decoded` they came from (attention
    [B, L_out, grid²]: the step that emitted each word). Greedy for beam_size 1. Leaves the model's mode as it
    found it."""
    was_training = model.training
    model.eval()
    decoded = (model.beam_search(images, beam_size, max_len) if beam_size > 1 else model.greedy(images, max_len))
    model.train(was_training)
    return [vocab.decode(ids) for ids in decoded.to_lists(model.eos_id)], decoded


def evaluate(model: Captioner, scenes: Sequence[Scene], vocab: WordVocab, *, batch_size: int = 256,
             device: torch.device | str = "cpu", beam_size: int = 1) -> dict:
    """Decode `scenes`: {"exact_match" (0..1), "bleu" (sacrebleu corpus BLEU, 0..100), "grounding", "chance",
    "matched", "unmatched" (shape words, see `metrics.grounding_score`), "colour_grounding", "colour_chance" (the
    same for colour words)}."""
    hypotheses, words, attention = [], [], []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        captions, decoded = caption_images(model, render_images(chunk).to(device), vocab, beam_size=beam_size)
        hypotheses += captions
        words += [c.split() for c in captions]
        attention += list(decoded.attention.cpu())
    references = [s.caption for s in scenes]
    colours = grounding_score(words, attention, scenes, model.grid, words="colours")
    return {"exact_match": exact_match(hypotheses, references), "bleu": bleu(hypotheses, references),
            **grounding_score(words, attention, scenes, model.grid),
            "colour_grounding": colours["grounding"], "colour_chance": colours["chance"]}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def _model_config(config: CaptionTrainConfig, vocab: WordVocab) -> dict:
    """Keyword arguments of `Captioner`: what a checkpoint needs to rebuild the model."""
    return dict(vocab_size=len(vocab), embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
                attn_dim=config.attn_dim, channels=config.channels, image_size=config.image_size,
                attention_backend=config.attention_backend, initial_state=config.initial_state,
                dropout=config.dropout, pad_id=WordVocab.PAD,
                bos_id=WordVocab.BOS, eos_id=WordVocab.EOS)


def _read_checkpoint(path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an attn-fast captioning checkpoint ({CHECKPOINT_FORMAT})")
    return checkpoint


def load_checkpoint(path, device: torch.device | str = "cpu", *,
                    attention_backend: str | None = None) -> tuple[Captioner, WordVocab, dict]:
    """(model in eval mode on `device`, vocabulary, info) from a checkpoint written by `train`. info: step, epoch,
    batch_in_epoch, best_valid_exact_match, valid, model_config, train_config. `attention_backend` overrides the
    stored one (e.g. "torch" for a model trained on a GPU with "triton", loaded on a CPU)."""
    checkpoint = _read_checkpoint(path)
    model_config = dict(checkpoint["model_config"])
    if attention_backend is not None:
        model_config["attention_backend"] = attention_backend
    model = Captioner(**model_config)
    model.load_state_dict(checkpoint["model"])
    info = {key: checkpoint[key] for key in ("step", "epoch", "batch_in_epoch", "best_valid_exact_match", "valid",
                                             "model_config", "train_config")}
    return model.to(device).eval(), WordVocab.from_dict(checkpoint["vocab"]), info


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def train(config: CaptionTrainConfig) -> CaptionTrainResult:
    """Train a `Captioner` as `config` says (see the module docstring); prints a summary line."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    splits = make_scene_splits(config.data_seed, (config.train_size, config.valid_size, 0), config.image_size)
    if not splits.train or not splits.valid:
        raise ValueError(f"need training and validation scenes, got {config.train_size} and {config.valid_size}")

    checkpoint = _read_checkpoint(config.resume) if config.resume else None
    if checkpoint is None:
        vocab = WordVocab()
        model_config = _model_config(config, vocab)
    else:  # the architecture is the checkpoint's; the backend is a runtime choice
        vocab = WordVocab.from_dict(checkpoint["vocab"])
        model_config = dict(checkpoint["model_config"], attention_backend=config.attention_backend)
    model = Captioner(**model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    position = RunPosition()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        position = RunPosition(checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"],
                             checkpoint["best_valid_exact_match"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])

    log = (lambda *args: None) if config.quiet else print
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    best_path = last_path = None
    if checkpoint is not None and out_dir is not None and (out_dir / "best.pt").exists():
        best_path = str(out_dir / "best.pt")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"train: {len(splits.train)} training / {len(splits.valid)} validation scenes, vocabulary {len(vocab)}, "
        f"{n_params / 1e6:.2f}M parameters, grid {model.grid}x{model.grid}, device {device}"
        + (f", resuming at step {position.step}" if checkpoint is not None else ""))

    history, valid = [], None
    while (stop := stop_reason(config, position, time.perf_counter() - start)) is None:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + position.epoch)
        epoch_length = math.ceil(len(splits.train) / config.batch_size)
        epoch_batches = batches(splits.train, vocab, config.batch_size, generator=generator)
        loss_sum, correct, tokens, steps_here = 0.0, 0, 0, 0
        bar = tqdm(total=epoch_length, initial=position.batch_in_epoch, desc=f"epoch {position.epoch + 1}",
                   disable=True if config.quiet else None, leave=False, file=sys.stderr)
        for batch in islice(epoch_batches, position.batch_in_epoch, None):
            loss, batch_correct, batch_tokens = train_step(model, optimizer, batch, attention_reg=config.attention_reg,
                                                           grad_clip=config.grad_clip, device=device)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {position.step + 1}")
            position.step += 1
            position.batch_in_epoch += 1
            loss_sum, correct, tokens, steps_here = (loss_sum + loss, correct + batch_correct,
                                                     tokens + batch_tokens, steps_here + 1)
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / steps_here:.4f}", tok_acc=f"{correct / max(tokens, 1):.4f}",
                            refresh=False)
            if stop_reason(config, position, time.perf_counter() - start) is not None:
                break
        bar.close()
        if position.batch_in_epoch >= epoch_length:
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0

        valid = evaluate(model, splits.valid, vocab, batch_size=config.valid_batch_size, device=device)
        improved = (position.best_valid_exact_match is None
                    or valid["exact_match"] > position.best_valid_exact_match)
        if improved:
            position.best_valid_exact_match = valid["exact_match"]
        history.append({"step": position.step, "epoch": position.epoch, "train_loss": loss_sum / max(steps_here, 1),
                        "train_token_accuracy": correct / max(tokens, 1),
                        **{f"valid_{key}": value for key, value in valid.items()}})
        if out_dir is not None:
            state = {"format": CHECKPOINT_FORMAT, "model_config": model_config, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "vocab": vocab.to_dict(), "step": position.step,
                     "epoch": position.epoch, "batch_in_epoch": position.batch_in_epoch,
                     "best_valid_exact_match": position.best_valid_exact_match, "valid": valid,
                     "train_config": dataclasses.asdict(config),
                     "rng": {"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
            if improved:
                best_path = str(out_dir / "best.pt")
                save_checkpoint(state, best_path)
            last_path = str(out_dir / "last.pt")
            save_checkpoint(state, last_path)
        epochs_done = position.epoch + position.batch_in_epoch / epoch_length
        log(f"step {position.step}, epoch {epochs_done:.2f}: train loss {history[-1]['train_loss']:.4f} "
            f"token acc {history[-1]['train_token_accuracy']:.4f} | valid exact match {valid['exact_match']:.4f} "
            f"BLEU {valid['bleu']:.1f} grounding {valid['grounding']:.3f} (chance {valid['chance']:.3f})"
            + (" (best)" if improved else ""))

    wall_time = time.perf_counter() - start
    best = position.best_valid_exact_match
    print(f"train: {position.step} steps, {position.epoch} epochs, {wall_time:.1f} s, best valid exact match "
          + (f"{best:.4f}" if best is not None else "n/a") + f" (stopped: {stop})"
          + (f", best checkpoint {best_path}" if best_path else ""))
    return CaptionTrainResult(steps=position.step, epoch=position.epoch, wall_time=wall_time,
                              best_valid_exact_match=best, stop_reason=stop, valid=valid, best_checkpoint=best_path,
                              last_checkpoint=last_path, history=history, model=model.eval(), vocab=vocab)
