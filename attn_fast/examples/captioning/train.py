"""Train the captioning model: `attn-fast train-captions` on the command line, `train(CaptionTrainConfig())` here.

    result = train(CaptionTrainConfig(out_dir="runs/captions"))
    model, vocab, info = load_checkpoint("runs/captions/best.pt")
    captions, decoded = caption_images(model, images, vocab)           # decoded.attention [B, L_out, grid²]
    scores = evaluate(model, test_scenes, vocab)                        # exact match, BLEU, grounding vs chance

The loop, the checkpoints, exact resume, the stopping rules and multi-process training (torchrun) are the
examples' shared ones (`attn_fast.examples.training`). What is the captioner's (`CaptionTask`):
  data        the scene splits of `data_seed` (train and valid) at `image_size`; the grammar's fixed vocabulary
  model       `Captioner`
  batches     shuffled per epoch; each batch's images are rendered when it is trained on
  loss        teacher forcing: mean cross-entropy plus attention_reg · the doubly stochastic penalty (the
              cross-entropy alone is reported)
  validation  greedy decoding of the validation scenes: exact match, BLEU, grounding against chance
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attn_fast.examples import checkpoints
from attn_fast.examples.captioning.data import (
    MIN_IMAGE_SIZE,
    Scene,
    WordVocab,
    batch_scenes,
    make_batch,
    make_scene_splits,
    render_images,
)
from attn_fast.examples.captioning.metrics import grounding_score
from attn_fast.examples.captioning.model import INITIAL_STATES, Captioner, ImageEncoder, caption_loss
from attn_fast.examples.checkpoints import CHECKPOINT_TASKS, restore_model, run_info
from attn_fast.examples.errors import UserError
from attn_fast.examples.metrics import bleu, exact_match
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

__all__ = ["CaptionTrainConfig", "CaptionTrainResult", "CaptionTask", "train", "caption_images", "evaluate",
           "load_checkpoint", "CHECKPOINT_FORMAT"]

TASK_NAME = "train-captions"  # the command that writes its checkpoints (`checkpoints.CHECKPOINT_TASKS`)
CHECKPOINT_FORMAT = CHECKPOINT_TASKS[TASK_NAME].format
MAX_CAPTION_WORDS = 20  # decoding limit; the grammar's longest caption has 13 words


@dataclass
class CaptionTrainConfig(RunConfig):
    """Everything a captioning run depends on: `RunConfig`'s fields (scene counts and seed, model sizes,
    optimization, run) and the ones below. The defaults reach high validation exact match in a few minutes on a
    2-core CPU (see `attn-fast train-captions --help`)."""

    # Data.
    image_size: int = 64              # a multiple of 8, at least 48; the grid is image_size / 8 cells a side
    # Model.
    channels: int = 64                # annotation size C (CNN width)
    initial_state: str = "zeros"      # decoder's h_0, c_0: "zeros" or "mean" (the paper's; see model.py)
    attention_reg: float = 0.01       # λ of the doubly stochastic regularization (0: off)
    # Run.
    out_dir: str | None = "runs/captions"  # where best.pt and last.pt go; None: write no checkpoint

    def validate(self, *, files: bool = False) -> None:
        """`RunConfig.validate`, and the image size (a whole grid of 8-pixel cells, room for three shapes), the
        CNN width, the initial state and the regularization weight."""
        super().validate(files=files)
        stride = ImageEncoder.STRIDE
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size % stride or size < MIN_IMAGE_SIZE:
            raise UserError(f"--image-size must be a multiple of {stride} and at least {MIN_IMAGE_SIZE} (room for "
                            f"three shapes), got {size!r}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 2:
            # the first conv layer is channels // 2 wide
            raise UserError(f"--channels must be an integer >= 2, got {self.channels!r}")
        if self.initial_state not in INITIAL_STATES:
            raise UserError(f"--initial-state must be one of {', '.join(INITIAL_STATES)}; got {self.initial_state!r}")
        reg = self.attention_reg
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg) or reg < 0:
            raise UserError(f"--attention-reg must be a number >= 0 (0: off), got {reg!r}")


@dataclass
class CaptionTrainResult(RunResult):
    """What `train` returns: `RunResult` (steps, stop reason, validation history with the `evaluate` scores
    prefixed valid_, the checkpoints' paths, the model in eval mode) and the vocabulary."""

    model: Captioner | None = field(default=None, repr=False)
    vocab: WordVocab | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------------------
# The captioner's part of a run
# ----------------------------------------------------------------------------------------------------------------

def build_model(model_config: dict) -> Captioner:
    """The `Captioner` of a checkpoint's model config (its keyword arguments)."""
    return Captioner(**model_config)


class CaptionTask:
    """The captioner's part of a run (an `attn_fast.examples.training.Task`): the scenes of `config`, and the
    vocabulary (the checkpoint's when resuming). A batch is the list of its scenes until it is trained on."""

    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, config: CaptionTrainConfig, checkpoint: dict | None = None):
        self.config = config
        splits = make_scene_splits(config.data_seed, (config.train_size, config.valid_size, 0), config.image_size)
        if not splits.train or not splits.valid:
            raise UserError(f"need training and validation scenes, got {config.train_size} and "
                             f"{config.valid_size}")
        self.train_scenes, self.valid_scenes = splits.train, splits.valid
        self.vocab = WordVocab() if checkpoint is None else WordVocab.from_dict(checkpoint["vocab"])

    def describe_data(self) -> str:
        return (f"{len(self.train_scenes)} training / {len(self.valid_scenes)} validation scenes, vocabulary "
                f"{len(self.vocab)}")

    def model_config(self) -> dict:
        config = self.config
        return dict(vocab_size=len(self.vocab), embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
                    attn_dim=config.attn_dim, channels=config.channels, image_size=config.image_size,
                    attention_backend=config.attention_backend, initial_state=config.initial_state,
                    dropout=config.dropout, pad_id=WordVocab.PAD, bos_id=WordVocab.BOS, eos_id=WordVocab.EOS)

    def build_model(self, model_config: dict) -> Captioner:
        return build_model(model_config)

    def describe_model(self, model: Captioner, model_config: dict) -> str:
        return f"grid {model.grid}x{model.grid}"

    def epoch_batches(self, epoch: int) -> list[list[Scene]]:
        # Scenes, not rendered images: a whole epoch of images would take ~1 GB at the default sizes.
        return batch_scenes(self.train_scenes, self.config.batch_size,
                            generator=epoch_generator(self.config.seed, epoch))

    def batch_loss(self, model: torch.nn.Module, batch: list[Scene], device: torch.device) -> BatchLoss:
        images, tgt_in, tgt_out = (t.to(device) for t in make_batch(batch, self.vocab))
        attention_reg = self.config.attention_reg
        logits, weights = model(images, tgt_in, need_weights=attention_reg != 0.0)
        total, cross_entropy = caption_loss(logits, weights, tgt_out, pad_id=WordVocab.PAD,
                                            attention_reg=attention_reg)
        return BatchLoss(objective=total, cross_entropy=cross_entropy, logits=logits, targets=tgt_out)

    def validate(self, model: Captioner, device: torch.device) -> dict:
        return evaluate(model, self.valid_scenes, self.vocab, batch_size=self.config.valid_batch_size,
                        device=device)

    def describe_scores(self, valid: dict) -> str:
        return f"BLEU {valid['bleu']:.1f} grounding {valid['grounding']:.3f} (chance {valid['chance']:.3f})"

    def vocab_state(self) -> dict:
        return {"vocab": self.vocab.to_dict()}


# ----------------------------------------------------------------------------------------------------------------
# Training, checkpoints
# ----------------------------------------------------------------------------------------------------------------

def train(config: CaptionTrainConfig) -> CaptionTrainResult:
    """Train a `Captioner` as `config` says (see the module docstring); prints a summary line. Under torchrun every
    process calls this; each returns its own (identical) model. A bad config value, a foreign or damaged --resume
    checkpoint, an output directory in use or holding another run: a `UserError` before any work. When resuming,
    the model fields, image size included, are the checkpoint's (`resumed_config`)."""
    config.validate(files=True)
    checkpoint = checkpoints.load_checkpoint(config.resume, TASK_NAME, for_resume=True) if config.resume else None
    config = resumed_config(config, checkpoint)
    with claim_out_dir(config):
        task = CaptionTask(config, checkpoint)
        run = run_training(config, task, checkpoint)
    return CaptionTrainResult(**vars(run), vocab=task.vocab)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu", *,
                    attention_backend: str | None = None) -> tuple[Captioner, WordVocab, dict]:
    """(model in eval mode on `device`, vocabulary, info) from a checkpoint written by `train`. info: step, epoch,
    batch_in_epoch, best_valid_exact_match, valid, model_config, train_config. `attention_backend` overrides the
    stored one (e.g. "torch" for a model trained on a GPU with "triton", loaded on a CPU). A file that is not such a
    checkpoint, or a device this machine lacks, is a `UserError`."""
    check_device(device)
    checkpoint = checkpoints.load_checkpoint(path, TASK_NAME)
    model = restore_model(checkpoint, build_model, device, attention_backend, path=path)
    return model, WordVocab.from_dict(checkpoint["vocab"]), run_info(checkpoint)


# ----------------------------------------------------------------------------------------------------------------
# Decoding and scores
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def caption_images(model: Captioner, images: torch.Tensor, vocab: WordVocab, *, beam_size: int = 1,
                   max_len: int = MAX_CAPTION_WORDS, need_attention: bool = True):
    """Captions of images [B, 3, H, W] (on the model's device) and the `Decoded` they came from (attention
    [B, L_out, grid²]: the step that emitted each word; None with `need_attention=False`). Greedy for beam_size 1.
    Leaves the model's mode as it found it."""
    was_training = model.training
    model.eval()
    decoded = (model.beam_search(images, beam_size, max_len, need_attention=need_attention) if beam_size > 1
               else model.greedy(images, max_len, need_attention=need_attention))
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
