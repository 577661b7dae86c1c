"""Checkpoint files of the examples' runs: atomic writes, format-checked reads, the model rebuilt from one.

A checkpoint is a dict saved with torch.save, readable with `weights_only=True`. Every example's holds at least

    format          its example's format string, e.g. "attn-fast-seq2seq-checkpoint/1"
    model_config    the keyword arguments that rebuild the model; model: its state_dict
    step, epoch, batch_in_epoch, best_valid_exact_match, valid, train_config    where the run was (see `training`)

plus what the loop needs to resume (optimizer, RNG states) and the example's vocabularies.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "read_checkpoint", "model_config_of", "restore_model", "run_info"]

RUN_INFO_KEYS = ("step", "epoch", "batch_in_epoch", "best_valid_exact_match", "valid", "model_config", "train_config")


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


def read_checkpoint(path: str | os.PathLike, checkpoint_format: str, model_name: str) -> dict:
    """The checkpoint at `path`, on the CPU; ValueError unless its format is `checkpoint_format` (`model_name`,
    e.g. "Seq2Seq", says in the message what was expected)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != checkpoint_format:
        raise ValueError(f"{path} is not an attn-fast {model_name} checkpoint ({checkpoint_format})")
    return checkpoint


def model_config_of(checkpoint: dict, attention_backend: str | None = None) -> dict:
    """The checkpoint's model keyword arguments, with `attention_backend` in place of the stored one when given:
    the backend is a choice of the machine that runs the model, not part of the architecture."""
    model_config = dict(checkpoint["model_config"])
    if attention_backend is not None:
        model_config["attention_backend"] = attention_backend
    return model_config


def restore_model(checkpoint: dict, build_model: Callable[[dict], torch.nn.Module], device: torch.device | str,
                  attention_backend: str | None = None) -> torch.nn.Module:
    """The checkpoint's model, rebuilt by `build_model(model_config)` with its weights, on `device`, in eval mode."""
    model = build_model(model_config_of(checkpoint, attention_backend))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def run_info(checkpoint: dict) -> dict:
    """What `load_checkpoint` reports besides the model: step, epoch, batch_in_epoch, best_valid_exact_match, valid
    (the metrics when it was written), model_config, train_config."""
    return {key: checkpoint[key] for key in RUN_INFO_KEYS}
