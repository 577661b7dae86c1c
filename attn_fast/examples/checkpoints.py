"""Checkpoint files of the examples' runs: atomic writes, checked reads, the model rebuilt from one.

A checkpoint is a dict saved with torch.save, readable with `weights_only=True`. Every example's holds at least

    format          its example's format string, e.g. "attn-fast-seq2seq-checkpoint/1" (`CHECKPOINT_TASKS`)
    model_config    the keyword arguments that rebuild the model; model: its state_dict
    step, epoch, batch_in_epoch, best_valid_exact_match, valid, train_config    where the run was (see `training`)

plus what the loop needs to resume (optimizer, RNG states) and the example's vocabularies.

`load_checkpoint(path, task)` reads one and checks it before anything uses it: a missing, empty, truncated or
foreign file, a checkpoint of the other example ("a checkpoint of attn-fast train-captions, not train") or one
without the entries its task needs is a `UserError` that names the file.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from attn_fast.examples.errors import UserError

__all__ = ["save_checkpoint", "load_checkpoint", "model_config_of", "restore_model", "run_info", "CheckpointTask",
           "CHECKPOINT_TASKS", "RESUME_KEYS", "is_stale_temporary"]

RUN_INFO_KEYS = ("step", "epoch", "batch_in_epoch", "best_valid_exact_match", "valid", "model_config", "train_config")
#: What a checkpoint must hold besides `RUN_INFO_KEYS` and its task's vocabularies to be resumed from.
RESUME_KEYS = ("model", "optimizer", "rng")


class CheckpointTask(NamedTuple):
    """The checkpoints one `attn-fast` train command writes: their format string and their vocabulary entries."""

    format: str
    vocab_keys: tuple[str, ...]


#: Every example's checkpoints, by the command that writes them (the name `load_checkpoint` takes and reports).
CHECKPOINT_TASKS = {
    "train": CheckpointTask("attn-fast-seq2seq-checkpoint/1", ("src_vocab", "tgt_vocab")),
    "train-captions": CheckpointTask("attn-fast-captioning-checkpoint/1", ("vocab",)),
}

# The temporary file `save_checkpoint` writes before its rename: `.NAME.XXXXXXXX.tmp` (tempfile.mkstemp's 8
# characters). A process killed between the two leaves it behind.
_TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """torch.save `checkpoint` to `path` atomically: written to a temporary file in the same directory, flushed to
    disk, then renamed over `path`. A failure leaves the previous file at `path` intact and no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # see _TEMPORARY_NAME
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


def is_stale_temporary(name: str, targets: tuple[str, ...] = ("best.pt", "last.pt")) -> bool:
    """True for the name of a temporary file `save_checkpoint` left behind for one of `targets` (it was killed
    during the write): `.last.pt.k3j_x9q2.tmp`. Nothing else matches, so that a clean-up removes only those."""
    match = _TEMPORARY_NAME.fullmatch(name)
    return match is not None and match["target"] in targets


def load_checkpoint(path: str | os.PathLike, expected_task: str, *, for_resume: bool = False) -> dict:
    """The checkpoint at `path`, on the CPU (torch.load with weights_only=True), written by `attn-fast
    expected_task` ("train" or "train-captions", `CHECKPOINT_TASKS`), with every entry the task reads (and, with
    `for_resume`, the optimizer and RNG states a resume needs). Anything else is a `UserError` naming the file: it
    does not exist, is empty, is truncated or damaged, is not a checkpoint, belongs to the other task, or lacks
    entries."""
    expected = CHECKPOINT_TASKS[expected_task]
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a checkpoint file (its best.pt or last.pt?)")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not a checkpoint")
    try:
        with warnings.catch_warnings():
            # (raised by a pickle that torch.save did not write, before the failure this function reports)
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror})") from error
    except Exception as error:
        # torch.load fails on a damaged file with RuntimeError, EOFError, KeyError, OSError (EINVAL) or
        # UnpicklingError, depending on where the bytes end and what they hold.
        text = str(error).strip()
        # the first sentence of torch's message; KeyError's and EOFError's texts say nothing (a byte value, "")
        reason = (type(error).__name__ if isinstance(error, (KeyError, EOFError)) or not text
                  else text.splitlines()[0].split(". ")[0][:160])
        raise UserError(f"{path} is not a readable checkpoint: truncated or damaged, or not written by torch.save "
                        f"({reason})") from error
    if not isinstance(checkpoint, dict) or "format" not in checkpoint:
        raise UserError(f"{path} is not an attn-fast checkpoint (no format entry)")
    found = checkpoint["format"]
    if found != expected.format:
        writer = next((task for task, kind in CHECKPOINT_TASKS.items() if kind.format == found), None)
        if writer is not None:
            raise UserError(f"{path} is a checkpoint of attn-fast {writer}, not {expected_task}")
        raise UserError(f"{path} has checkpoint format {found!r}, not {expected.format!r} (the format of attn-fast "
                        f"{expected_task})")
    needed = RUN_INFO_KEYS + ("model",) + expected.vocab_keys + (RESUME_KEYS if for_resume else ())
    missing = [key for key in dict.fromkeys(needed) if key not in checkpoint]
    if missing:
        raise UserError(f"{path} is a checkpoint of attn-fast {expected_task} without {', '.join(missing)}: "
                        "damaged, or written by another version")
    for key in ("model_config", "train_config", "model"):
        if not isinstance(checkpoint[key], dict):
            raise UserError(f"{path}: its {key} entry is a {type(checkpoint[key]).__name__}, not a dict (damaged)")
    return checkpoint


def model_config_of(checkpoint: dict, attention_backend: str | None = None) -> dict:
    """The checkpoint's model keyword arguments, with `attention_backend` in place of the stored one when given:
    the backend is a choice of the machine that runs the model, not part of the architecture."""
    model_config = dict(checkpoint["model_config"])
    if attention_backend is not None:
        model_config["attention_backend"] = attention_backend
    return model_config


def restore_model(checkpoint: dict, build_model: Callable[[dict], torch.nn.Module], device: torch.device | str,
                  attention_backend: str | None = None, *,
                  path: str | os.PathLike = "the checkpoint") -> torch.nn.Module:
    """The checkpoint's model, rebuilt by `build_model(model_config)` with its weights, on `device`, in eval mode.
    A model_config that builds no model, or weights that do not fit it, is a `UserError` naming `path` (the file
    is damaged or edited: `load_checkpoint` checked the rest)."""
    try:
        model = build_model(model_config_of(checkpoint, attention_backend))  # TypeError: unknown or missing keys
        model.load_state_dict(checkpoint["model"])  # RuntimeError: missing, unexpected or misshapen weights
    except (TypeError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__  # torch's first line says too little
        raise UserError(f"{path}: its model_config and weights do not make a model (damaged, or written by another "
                        f"version): {reason}") from error
    return model.to(device).eval()


def run_info(checkpoint: dict) -> dict:
    """What `load_checkpoint` reports besides the model: step, epoch, batch_in_epoch, best_valid_exact_match, valid
    (the metrics when it was written), model_config, train_config."""
    return {key: checkpoint[key] for key in RUN_INFO_KEYS}
