"""Train the Seq2Seq model: `attn-fast train` on the command line, `train(TrainConfig(...))` here.

    result = train(TrainConfig(max_steps=3000, out_dir="runs/dates"))      # the date task by default
    model, src_vocab, tgt_vocab, info = load_checkpoint("runs/dates/best.pt")
    translate(model, ["25 июня 2009 г."], src_vocab, tgt_vocab)            # ["2009-06-25"]

The loop, the checkpoints, exact resume, the stopping rules and multi-process training (torchrun) are the
examples' shared ones (`attn_fast.examples.training`). What is the Seq2Seq's (`Seq2SeqTask`):
  data        the date task (`make_date_splits(data_seed, (train_size, valid_size, 0))`) or two TSV files;
              character vocabularies built from the training pairs (stored in every checkpoint, restored on resume)
  model       `Seq2Seq` (decoder "parallel" or "bahdanau")
  batches     length-bucketed and shuffled per epoch (`epoch_batches`)
  loss        teacher forcing, mean cross-entropy over the non-PAD target tokens
  validation  greedy decoding of the validation pairs: exact match and character accuracy
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn import functional as F

from attn_fast.examples import checkpoints
from attn_fast.examples.checkpoints import CHECKPOINT_TASKS, restore_model, run_info
from attn_fast.examples.errors import UserError
from attn_fast.examples.metrics import character_accuracy, exact_match
from attn_fast.examples.seq2seq.data import Batch, CharVocab, Pair, batches, build_vocabs, make_date_splits, read_tsv
from attn_fast.examples.seq2seq.model import DECODERS, Seq2Seq
from attn_fast.examples.training import (
    BatchLoss,
    RunConfig,
    RunResult,
    check_device,
    claim_out_dir,
    epoch_generator,
    resumed_config,
    run_training,
)

__all__ = ["TrainConfig", "TrainResult", "Seq2SeqTask", "train", "evaluate", "translate", "decode_sources",
           "Translation", "epoch_batches", "load_checkpoint", "CHECKPOINT_FORMAT"]

TASK_NAME = "train"  # the command that writes its checkpoints (`checkpoints.CHECKPOINT_TASKS`)
CHECKPOINT_FORMAT = CHECKPOINT_TASKS[TASK_NAME].format


@dataclass
class TrainConfig(RunConfig):
    """Everything a Seq2Seq run depends on: `RunConfig`'s fields (data sizes and seed of the date task, model
    sizes, optimization, run) and the ones below. The defaults train the date task to ~100% validation exact match
    in a few minutes on a 2-core CPU (see `attn-fast train --help`)."""

    # Data: the date task, unless both TSV files are given (then train_size, valid_size and data_seed are unused).
    data_tsv: str | None = None       # `source<TAB>target` training pairs
    valid_tsv: str | None = None      # `source<TAB>target` validation pairs
    # Model.
    decoder: str = "parallel"         # "parallel" (one attention call for all steps) or "bahdanau"
    # Run.
    out_dir: str | None = "runs/seq2seq"  # where best.pt and last.pt go; None: write no checkpoint

    def validate(self, *, files: bool = False) -> None:
        """`RunConfig.validate`, and the decoder, and the TSV files (given both or neither; with `files`, files
        that exist)."""
        super().validate(files=files)
        if self.decoder not in DECODERS:
            raise UserError(f"--decoder must be one of {', '.join(DECODERS)}; got {self.decoder!r}")
        if (self.data_tsv is None) != (self.valid_tsv is None):
            raise UserError("give both --data-tsv and --valid-tsv, or neither (the date task)")
        for flag, path in (("--data-tsv", self.data_tsv), ("--valid-tsv", self.valid_tsv)):
            if files and path is not None and not Path(path).is_file():
                raise UserError(f"{flag} {path}: no such file")


@dataclass
class TrainResult(RunResult):
    """What `train` returns: `RunResult` (steps, stop reason, validation history with valid_exact_match and
    valid_char_accuracy, the checkpoints' paths, the model in eval mode) and the run's vocabularies."""

    model: Seq2Seq | None = field(default=None, repr=False)
    src_vocab: CharVocab | None = field(default=None, repr=False)
    tgt_vocab: CharVocab | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------------------

def load_pairs(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """(train pairs, validation pairs): from the TSV files if given, else the date task."""
    if config.data_tsv is not None:
        return read_tsv(config.data_tsv), read_tsv(config.valid_tsv)
    splits = make_date_splits(config.data_seed, (config.train_size, config.valid_size, 0))
    return splits.train, splits.valid


def epoch_batches(pairs: Sequence[Pair], src_vocab: CharVocab, tgt_vocab: CharVocab, batch_size: int,
                  seed: int, epoch: int) -> list[Batch]:
    """The training batches of `epoch`, shuffled and length-bucketed; a function of (seed, epoch) alone, so that a
    resumed run (or another rank) builds the same list."""
    return list(batches(pairs, src_vocab, tgt_vocab, batch_size, shuffle=True,
                        generator=epoch_generator(seed, epoch)))


def build_model(model_config: dict) -> Seq2Seq:
    """The `Seq2Seq` of a checkpoint's model config (its keyword arguments, vocabulary sizes included)."""
    options = dict(model_config)
    return Seq2Seq(options.pop("src_vocab_size"), options.pop("tgt_vocab_size"), **options)


class Seq2SeqTask:
    """The Seq2Seq's part of a run (an `attn_fast.examples.training.Task`): the pairs of `config`, and the
    vocabularies built from the training pairs or, when resuming, the checkpoint's."""

    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, config: TrainConfig, checkpoint: dict | None = None):
        self.config = config
        self.train_pairs, self.valid_pairs = load_pairs(config)
        if not self.train_pairs or not self.valid_pairs:
            raise UserError(f"need training and validation pairs, got {len(self.train_pairs)} and "
                            f"{len(self.valid_pairs)}")
        if checkpoint is None:
            self.src_vocab, self.tgt_vocab = build_vocabs(self.train_pairs)
        else:
            self.src_vocab, self.tgt_vocab = (CharVocab.from_dict(checkpoint[k]) for k in ("src_vocab", "tgt_vocab"))

    def describe_data(self) -> str:
        return (f"{len(self.train_pairs)} training / {len(self.valid_pairs)} validation pairs, vocabularies "
                f"{len(self.src_vocab)} / {len(self.tgt_vocab)}")

    def model_config(self) -> dict:
        config = self.config
        return dict(src_vocab_size=len(self.src_vocab), tgt_vocab_size=len(self.tgt_vocab),
                    embed_dim=config.embed_dim, hidden_dim=config.hidden_dim, attn_dim=config.attn_dim,
                    decoder=config.decoder, attention_backend=config.attention_backend, dropout=config.dropout,
                    pad_id=CharVocab.PAD, bos_id=CharVocab.BOS, eos_id=CharVocab.EOS)

    def build_model(self, model_config: dict) -> Seq2Seq:
        return build_model(model_config)

    def describe_model(self, model: Seq2Seq, model_config: dict) -> str:
        return f"decoder {model_config['decoder']}"

    def epoch_batches(self, epoch: int) -> list[Batch]:
        return epoch_batches(self.train_pairs, self.src_vocab, self.tgt_vocab, self.config.batch_size,
                             self.config.seed, epoch)

    def batch_loss(self, model: torch.nn.Module, batch: Batch, device: torch.device) -> BatchLoss:
        src, src_lengths, tgt_in, tgt_out = (t.to(device) for t in batch)
        logits, _ = model(src, src_lengths, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=CharVocab.PAD)
        return BatchLoss(objective=loss, cross_entropy=loss, logits=logits, targets=tgt_out)

    def validate(self, model: Seq2Seq, device: torch.device) -> dict:
        return evaluate(model, self.valid_pairs, self.src_vocab, self.tgt_vocab,
                        batch_size=self.config.valid_batch_size, device=device)

    def describe_scores(self, valid: dict) -> str:
        return f"char acc {valid['char_accuracy']:.4f}"

    def vocab_state(self) -> dict:
        return {"src_vocab": self.src_vocab.to_dict(), "tgt_vocab": self.tgt_vocab.to_dict()}


# ----------------------------------------------------------------------------------------------------------------
# Training, checkpoints
# ----------------------------------------------------------------------------------------------------------------

def train(config: TrainConfig) -> TrainResult:
    """Train a Seq2Seq model as `config` says (see the module docstring); returns a `TrainResult` and prints a
    summary line. Under torchrun every process calls this; each returns its own (identical) model. A bad config
    value, a missing file, a foreign or damaged --resume checkpoint, an output directory in use or holding another
    run: a `UserError` before any work."""
    config.validate(files=True)
    checkpoint = checkpoints.load_checkpoint(config.resume, TASK_NAME, for_resume=True) if config.resume else None
    config = resumed_config(config, checkpoint)
    with claim_out_dir(config):
        task = Seq2SeqTask(config, checkpoint)
        run = run_training(config, task, checkpoint)
    return TrainResult(**vars(run), src_vocab=task.src_vocab, tgt_vocab=task.tgt_vocab)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu", *,
                    attention_backend: str | None = None) -> tuple[Seq2Seq, CharVocab, CharVocab, dict]:
    """(model in eval mode on `device`, source vocabulary, target vocabulary, info) from a checkpoint written by
    `train`. info: step, epoch, batch_in_epoch, best_valid_exact_match, valid (metrics when it was written),
    model_config, train_config. `attention_backend` overrides the stored one (e.g. "torch" for a model trained
    with "triton", loaded on a CPU). A file that is not such a checkpoint, or a device this machine lacks, is a
    `UserError`."""
    check_device(device)
    checkpoint = checkpoints.load_checkpoint(path, TASK_NAME)
    model = restore_model(checkpoint, build_model, device, attention_backend, path=path)
    return (model, CharVocab.from_dict(checkpoint["src_vocab"]), CharVocab.from_dict(checkpoint["tgt_vocab"]),
            run_info(checkpoint))


# ----------------------------------------------------------------------------------------------------------------
# Decoding and scores
# ----------------------------------------------------------------------------------------------------------------

class Translation(NamedTuple):
    """One decoded source."""

    output: str                       # the target text (EOS and padding removed)
    attention: torch.Tensor | None    # [L, S'] on the model's device: the weights of each decoded step (EOS's
                                      # included) over the source characters, zero-padded to the batch's sizes;
                                      # None unless decoded with need_attention=True


@torch.no_grad()
def decode_sources(model: Seq2Seq, sources: Sequence[str], src_vocab: CharVocab, tgt_vocab: CharVocab, *,
                   beam_size: int = 1, batch_size: int = 256, device: torch.device | str = "cpu",
                   need_attention: bool = False) -> list[Translation]:
    """Translations of `sources`, in order, decoded `batch_size` at a time: greedy for beam_size 1, else beam
    search. Each keeps its attention (for a heatmap) only with `need_attention`: that history is [L, S] per
    source with L up to 2 S + 10, quadratic in the source length, while decoding without it grows linearly.
    Leaves the model in the mode it found it in."""
    was_training = model.training
    model.eval()
    pairs = [(s, "") for s in sources]
    translations = []
    for batch in batches(pairs, src_vocab, tgt_vocab, batch_size, shuffle=False, sort_by_length=False):
        src, src_lengths = batch.src.to(device), batch.src_lengths.to(device)
        decoded = (model.beam_search(src, src_lengths, beam_size=beam_size, need_attention=need_attention)
                   if beam_size > 1 else model.greedy(src, src_lengths, need_attention=need_attention))
        attentions = decoded.attention if need_attention else [None] * len(decoded.lengths)
        translations += [Translation(tgt_vocab.decode(ids), attention)
                         for ids, attention in zip(decoded.to_lists(model.eos_id), attentions)]
    model.train(was_training)
    return translations


def translate(model: Seq2Seq, sources: Sequence[str], src_vocab: CharVocab, tgt_vocab: CharVocab, *,
              beam_size: int = 1, batch_size: int = 256, device: torch.device | str = "cpu") -> list[str]:
    """The translations of `sources`, in order (greedy for beam_size 1; see `decode_sources`)."""
    return [t.output for t in decode_sources(model, sources, src_vocab, tgt_vocab, beam_size=beam_size,
                                             batch_size=batch_size, device=device)]


def evaluate(model: Seq2Seq, pairs: Sequence[Pair], src_vocab: CharVocab, tgt_vocab: CharVocab, *,
             batch_size: int = 256, device: torch.device | str = "cpu") -> dict:
    """Greedy decoding of `pairs`: {"exact_match", "char_accuracy"} (fractions, 0..1)."""
    hypotheses = translate(model, [s for s, _ in pairs], src_vocab, tgt_vocab, batch_size=batch_size,
                           device=device)
    references = [t for _, t in pairs]
    return {"exact_match": exact_match(hypotheses, references),
            "char_accuracy": character_accuracy(hypotheses, references)}
