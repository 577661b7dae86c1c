"""The training loop both examples share: `seq2seq.train` and `captioning.train` each describe their part of a run as
a `Task` (data, model, loss, validation scores) and hand it to `run_training`.

    config.validate(files=True)                         # config: a RunConfig; every value, before any work
    checkpoint = load_checkpoint(config.resume, "train", for_resume=True) if config.resume else None
    config = resumed_config(config, checkpoint)         # the model fields the run really has
    with claim_out_dir(config):                         # lock, refuse to overwrite, clean up (see below)
        run = run_training(config, task, checkpoint)    # task: built from the same config and checkpoint

One run, in order:
  model       `task.build_model` of `task.model_config()`, or of the checkpoint's model config when resuming (the
              attention backend is always the config's: it is a runtime choice); AdamW, gradient clipping by
              global norm
  loop        epochs of `task.epoch_batches(epoch)`, whose order depends only on (seed, epoch) (`epoch_generator`),
              so that a run can stop and resume anywhere inside an epoch; a tqdm bar shows the loss and the
              teacher-forced token accuracy of the epoch so far
  validation  at the end of each epoch, and when the run stops early: `task.validate`, whose exact match picks
              the best checkpoint
  checkpoints in `out_dir`: `best.pt` (best validation exact match so far) and `last.pt` (where the run is now),
              both written atomically (`checkpoints.save_checkpoint`)
  stop        after `epochs` epochs, or `max_steps` optimizer steps in all (then `epochs` is ignored), or
              `time_limit` seconds of this invocation, whichever comes first (`stop_reason`)

Resuming from `last.pt` restores the model, the optimizer, the position (step, epoch, batch within the epoch), the
best metric and torch's RNG state (dropout), so that the run continues exactly as the uninterrupted one would have:
on CPU, N steps straight and N/2 + resume + N/2 give identical parameters. The architecture and the vocabularies
come from the checkpoint; the data, the device, the attention backend and the stopping rules from the new config.
`resumed_config` puts the checkpoint's model fields into the config (so that train_config records what the run
really used) and says which of the given ones it replaced.

The output directory (`claim_out_dir`): a run takes an exclusive lock on it (`fcntl.flock` on `out_dir/.lock`,
released when the run ends, with the kernel's help when the process dies), so that a second run into the same
directory refuses at once; it removes the temporary files of checkpoint writes that a killed run left behind
(`.last.pt.XXXXXXXX.tmp`, nothing else); and it refuses a directory that holds anything unless the run resumes
(`resume`) or replaces (`overwrite`: best.pt and last.pt are removed first). All of it happens before any work.

Under `torchrun` (WORLD_SIZE > 1) the same loop trains with DistributedDataParallel, gloo on CPU and nccl on GPU:
each process takes its shard of every epoch's batches, rank 0 validates and writes the checkpoints (see
`distributed.py`). Rank 0 alone claims the output directory; when it refuses, torchrun stops the other processes.
A checkpoint keeps every rank's RNG state, so a resume with the same number of processes is exact too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from attn_fast.examples import distributed
from attn_fast.examples.checkpoints import is_stale_temporary, model_config_of, save_checkpoint
from attn_fast.examples.errors import UserError
from attn_fast.validation import BACKENDS

__all__ = ["RunConfig", "RunResult", "RunPosition", "BatchLoss", "Task", "run_training", "train_step",
           "stop_reason", "epoch_generator", "check_device", "claim_out_dir", "resumed_config", "LOCK_NAME",
           "CHECKPOINT_NAMES"]

#: The lock file of an output directory (see `claim_out_dir`), and the checkpoints a run writes there.
LOCK_NAME = ".lock"
CHECKPOINT_NAMES = ("best.pt", "last.pt")


@dataclass
class RunConfig:
    """What every example run depends on; each example's config (`seq2seq.train.TrainConfig`,
    `captioning.train.CaptionTrainConfig`) adds its data and model fields and names its own `out_dir`."""

    # Data (the generated task of the example).
    train_size: int = 20000           # training examples
    valid_size: int = 1000            # validation examples
    data_seed: int = 0                # which examples are drawn and which split each goes to
    # Model (what both models have).
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
    out_dir: str | None = None        # where best.pt and last.pt go; None: write no checkpoint
    resume: str | None = None         # a checkpoint (normally last.pt) to continue from
    valid_batch_size: int = 256
    quiet: bool = False               # no progress bar, no per-epoch lines (the summary line is still printed)
    overwrite: bool = False           # start afresh in an out_dir that holds files (best.pt, last.pt removed first)

    def __post_init__(self):
        self.validate()

    def validate(self, *, files: bool = False) -> None:
        """Raise a `UserError` naming the command-line flag (--batch-size for batch_size) of the first field whose
        value no run could use; with `files`, also check that the files named exist. Runs at construction, and
        again (with `files`) when a run starts: before any work, for the CLI and Python alike."""
        _require_int(self, "train_size", minimum=1)
        _require_int(self, "valid_size", minimum=1)
        _require_int(self, "data_seed", minimum=0)
        _require_choice(self, "attention_backend", BACKENDS)
        for name in ("embed_dim", "hidden_dim", "attn_dim", "batch_size", "epochs", "valid_batch_size"):
            _require_int(self, name, minimum=1)
        _require_number(self, "dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")
        _require_number(self, "lr", self.lr > 0, "a positive number")
        _require_number(self, "weight_decay", self.weight_decay >= 0, "a number >= 0")
        _require_number(self, "grad_clip", self.grad_clip >= 0, "a number >= 0 (0: no clipping)")
        if self.max_steps is not None:
            _require_int(self, "max_steps", minimum=1)
        if self.time_limit is not None:
            _require_number(self, "time_limit", self.time_limit > 0, "a positive number of seconds")
        _require_int(self, "seed", minimum=0)
        check_device(self.device)
        for name in ("out_dir", "resume"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not os.fspath(value)):
                raise UserError(f"{_flag(name)} must be a path, got {value!r}")
        if self.overwrite and self.resume is not None:
            raise UserError("--overwrite starts a new run and --resume continues one: give one of them")
        if files and self.resume is not None and not Path(self.resume).is_file():
            raise UserError(f"--resume {self.resume}: no such checkpoint file")


@dataclass
class RunResult:
    """What `run_training` returns. `history` holds one dict per validation (step, epoch, train_loss,
    train_token_accuracy and the task's validation scores prefixed valid_); `valid` is the last scores (None if no
    validation ran). `model` is the model as training left it (the state of last.pt), in eval mode."""

    steps: int
    epoch: int                        # completed epochs
    wall_time: float                  # seconds, this invocation
    best_valid_exact_match: float | None
    stop_reason: str                  # "epochs", "max_steps" or "time_limit"
    valid: dict | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    history: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = field(default=None, repr=False)


@dataclass
class RunPosition:
    """Where a run is: steps done in all, current epoch, batches of that epoch done, best metric so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_valid_exact_match: float | None = None


class BatchLoss(NamedTuple):
    """A teacher-forced forward of one batch, as `Task.batch_loss` gives it."""

    objective: torch.Tensor           # scalar: what the step minimizes (the cross-entropy, plus any regularization)
    cross_entropy: torch.Tensor       # scalar: mean cross-entropy over the target tokens (the loss reported)
    logits: torch.Tensor              # [B, T, V]
    targets: torch.Tensor             # [B, T] int64: the tokens to predict, the model's pad_id where there is none


class Task(Protocol):
    """One example's part of a run: its data, its model and its scores. A task is built from the run's config and,
    when resuming, the checkpoint (from which it restores what `vocab_state` saved).

    The model `build_model` gives has a `pad_id` attribute. `batch_loss` receives the module that trains it, which
    is DistributedDataParallel around it under torchrun: calling that module (its forward) is what averages the
    gradients across processes, so `batch_loss` calls it rather than one of the model's other methods."""

    checkpoint_format: str            # the "format" entry of the task's checkpoints

    def describe_data(self) -> str:
        """The data part of the run's first log line, e.g. "3000 training / 200 validation pairs"."""
        ...

    def model_config(self) -> dict:
        """Keyword arguments of a fresh model (stored in every checkpoint)."""
        ...

    def build_model(self, model_config: dict) -> torch.nn.Module:
        ...

    def describe_model(self, model: torch.nn.Module, model_config: dict) -> str:
        """The model part of the run's first log line, e.g. "decoder parallel"."""
        ...

    def epoch_batches(self, epoch: int) -> Sequence[Any]:
        """The training batches of `epoch` in order, each as `batch_loss` takes it, cheap to hold for a whole epoch;
        a function of (seed, epoch) alone (`epoch_generator`), so that a resumed run, or another rank, builds the
        same list."""
        ...

    def batch_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> BatchLoss:
        ...

    def validate(self, model: torch.nn.Module, device: torch.device) -> dict:
        """Scores of the validation data, with "exact_match" (0..1): the metric best.pt follows."""
        ...

    def describe_scores(self, valid: dict) -> str:
        """The validation scores of an epoch's log line besides exact match, e.g. "char acc 0.9870"."""
        ...

    def vocab_state(self) -> dict:
        """The checkpoint entries the task restores itself from when resuming (its vocabularies)."""
        ...


def _flag(name: str) -> str:
    """The command-line flag of the config field `name`: --batch-size for batch_size."""
    return "--" + name.replace("_", "-")


def _require_int(config: RunConfig, name: str, *, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        requirement = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UserError(f"{_flag(name)} must be {requirement}, got {value!r}")


def _require_number(config: RunConfig, name: str, condition: bool, requirement: str) -> None:
    """`condition`: the field's value meets `requirement` (checked only once the value is a finite real number)."""
    value = getattr(config, name)
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and condition):
        raise UserError(f"{_flag(name)} must be {requirement}, got {value!r}")


def _require_choice(config: RunConfig, name: str, choices: Sequence[str]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise UserError(f"{_flag(name)} must be one of {', '.join(choices)}; got {value!r}")


def check_device(device: str | torch.device, flag: str = "--device") -> torch.device:
    """`device` as a torch.device, or a `UserError` naming `flag` when it is no device torch knows or this machine
    lacks it (CUDA, a CUDA index, MPS): checked before any work, instead of an AssertionError deep inside."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserError(f"{flag} {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device} asked for, but CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {device} asked for, but MPS is not available on this machine")
    return parsed


@contextlib.contextmanager
def claim_out_dir(config: RunConfig) -> Iterator[Path | None]:
    """Hold `config.out_dir` for a run (the module docstring's rules): created if missing, locked for the whole
    `with` block, stale checkpoint temporaries removed, refused (`UserError`) when another run holds it or when it
    holds files and the run neither resumes nor overwrites. Yields the directory (None when the run writes no
    checkpoint). Under torchrun only rank 0 claims it: the other ranks write nothing there."""
    if config.out_dir is None:
        yield None
        return
    out_dir = Path(config.out_dir)
    if distributed.launch_rank() != 0:
        yield out_dir
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out-dir {out_dir}: cannot create it ({error.strerror})") from error
    lock = _lock_directory(out_dir)
    try:
        for entry in out_dir.iterdir():
            # the lock says that no live run is writing it
            if is_stale_temporary(entry.name, CHECKPOINT_NAMES) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
        held = sorted(entry.name for entry in out_dir.iterdir() if entry.name != LOCK_NAME)
        if held and config.resume is None:
            if not config.overwrite:
                shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
                raise UserError(f"--out-dir {out_dir} already holds {shown}: give --resume {out_dir / 'last.pt'} "
                                f"to continue that run, --overwrite to replace it, or another --out-dir")
            for name in CHECKPOINT_NAMES:  # a new run: the previous run's checkpoints must not pass for its own
                (out_dir / name).unlink(missing_ok=True)
        yield out_dir
    finally:
        _unlock_directory(out_dir, lock)


def _lock_directory(out_dir: Path) -> int:
    """An exclusive flock on out_dir/LOCK_NAME, its descriptor; `UserError` if another process holds it. The file
    records the holder's pid for that message. (The lock file is removed on release, so a run can find a file that
    a finishing run has just unlinked: it locks again until the locked file is the one in the directory.)"""
    path = out_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(f"--out-dir {out_dir}: cannot create its lock file ({error.strerror})") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"--out-dir {out_dir}: cannot lock it ({error.strerror})") from error
            raise UserError(f"--out-dir {out_dir} is in use by another run" + (f" (pid {holder})" if holder else "")
                            + ": wait for it to end, or give another --out-dir") from None
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _unlock_directory(out_dir: Path, fd: int) -> None:
    """Remove the lock file, then release the lock (in that order: see `_lock_directory`)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out_dir / LOCK_NAME)
    os.close(fd)


def resumed_config(config: RunConfig, checkpoint: dict | None) -> RunConfig:
    """`config` with the model fields of a resumed run set to the checkpoint's (its model_config: sizes, decoder,
    dropout...; the attention backend stays the config's, a runtime choice), so that the run, its data (the
    captioner's image size) and the train_config it stores agree with the model it really trains. Prints which
    given values were replaced (rank 0, unless quiet). `config` itself when not resuming. A `UserError` when the
    stopping rule leaves nothing to train (--max-steps or --epochs already reached by the checkpoint): such a run
    would do nothing and report success."""
    if checkpoint is None:
        return config
    if config.max_steps is not None and config.max_steps <= checkpoint["step"]:
        raise UserError(f"--max-steps {config.max_steps}: --resume {config.resume} is already at step "
                        f"{checkpoint['step']} (--max-steps counts the steps before the resume too)")
    if config.max_steps is None and config.epochs <= checkpoint["epoch"]:
        raise UserError(f"--epochs {config.epochs}: --resume {config.resume} has already done {checkpoint['epoch']} "
                        f"epoch(s) (--epochs counts the epochs before the resume too)")
    model_fields = {f.name for f in dataclasses.fields(config)} & set(checkpoint["model_config"]) - {
        "attention_backend"}
    stored = {name: checkpoint["model_config"][name] for name in sorted(model_fields)}
    replaced = {name: value for name, value in stored.items() if getattr(config, name) != value}
    if replaced and distributed.launch_rank() == 0 and not config.quiet:
        print("resume: the model is the checkpoint's, "
              + ", ".join(f"{_flag(name)} {value} (not {getattr(config, name)})" for name, value in replaced.items()),
              file=sys.stderr)
    return dataclasses.replace(config, **stored)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that shuffles the batches of `epoch`: seeded from (seed, epoch) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def stop_reason(config: RunConfig, position: RunPosition, elapsed: float) -> str | None:
    """Why a run must stop now ("max_steps", "epochs", "time_limit"), or None."""
    if config.max_steps is not None:
        if position.step >= config.max_steps:
            return "max_steps"
    elif position.epoch >= config.epochs:
        return "epochs"
    if config.time_limit is not None and elapsed >= config.time_limit:
        return "time_limit"
    return None


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, task: Task, batch: Any, grad_clip: float,
               device: torch.device) -> tuple[float, int, int]:
    """One optimizer step on `batch` (`model`: the task's model, or the DistributedDataParallel around it). Returns
    (cross-entropy, correctly predicted target tokens, target tokens) of this batch."""
    model.train()
    loss = task.batch_loss(model, batch, device)
    optimizer.zero_grad(set_to_none=True)
    loss.objective.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    real = loss.targets != distributed.unwrap(model).pad_id
    correct = ((loss.logits.detach().argmax(-1) == loss.targets) & real).sum()
    return loss.cross_entropy.item(), int(correct), int(real.sum())


@dataclass
class _EpochTally:
    """The training figures of the batches this invocation ran in the current epoch."""

    loss_sum: float = 0.0
    correct: int = 0
    tokens: int = 0
    steps: int = 0

    def add(self, loss: float, correct: int, tokens: int) -> None:
        self.loss_sum, self.correct, self.tokens, self.steps = (self.loss_sum + loss, self.correct + correct,
                                                                self.tokens + tokens, self.steps + 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def token_accuracy(self) -> float:
        return self.correct / max(self.tokens, 1)


def run_training(config: RunConfig, task: Task, checkpoint: dict | None = None) -> RunResult:
    """Train `task`'s model as `config` says (see the module docstring), from `checkpoint` (read from
    config.resume, the same one `task` was built from) or from scratch; prints a summary line. Under torchrun every
    process calls this; each returns its own (identical) model."""
    context, device = distributed.setup(config.device)
    try:
        return _run(config, task, checkpoint, context, device)
    finally:
        distributed.teardown(context)


def _run(config: RunConfig, task: Task, checkpoint: dict | None, context: distributed.Distributed,
         device: torch.device) -> RunResult:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model_config = (task.model_config() if checkpoint is None
                    else model_config_of(checkpoint, config.attention_backend))
    model = task.build_model(model_config).to(device)
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

    log: Callable[[str], None] = print if context.is_main and not config.quiet else (lambda line: None)
    out_dir = Path(config.out_dir) if config.out_dir is not None and context.is_main else None
    best_path = last_path = None
    if checkpoint is not None and out_dir is not None and (out_dir / "best.pt").exists():
        best_path = str(out_dir / "best.pt")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"train: {task.describe_data()}, {n_params / 1e6:.2f}M parameters, {task.describe_model(model, model_config)}"
        f", device {device}" + (f", {context.world_size} processes" if context.enabled else "")
        + (f", resuming at step {position.step}" if checkpoint is not None else ""))

    def must_stop() -> str | None:
        return stop_reason(config, position, time.perf_counter() - start)

    history, valid = [], None
    # Every rank must leave the loop at the same step: rank 0 decides between epochs, any rank inside one (the
    # ranks' clocks differ).
    while (stop := distributed.from_main(must_stop(), context)) is None:
        # The rest of the current epoch (all of it, unless resuming in its middle): this rank's shard.
        epoch_list = distributed.shard(task.epoch_batches(position.epoch), context)
        tally = _EpochTally()
        bar = tqdm(total=len(epoch_list), initial=position.batch_in_epoch, desc=f"epoch {position.epoch + 1}",
                   disable=True if config.quiet or not context.is_main else None, leave=False, file=sys.stderr)
        for batch in islice(epoch_list, position.batch_in_epoch, None):
            loss, correct, tokens = train_step(trained, optimizer, task, batch, config.grad_clip, device)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {position.step + 1}")
            position.step += 1
            position.batch_in_epoch += 1
            tally.add(loss, correct, tokens)
            bar.update()
            bar.set_postfix(loss=f"{tally.loss:.4f}", tok_acc=f"{tally.token_accuracy:.4f}", refresh=False)
            if distributed.any_rank(must_stop() is not None, context):
                break
        bar.close()
        if position.batch_in_epoch >= len(epoch_list):
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0

        # Rank 0 validates, then checkpoints: best.pt when the exact match improved, last.pt always. The training
        # figures of the log line are rank 0's batches.
        rank_rng_states = distributed.gather_to_main(torch.get_rng_state(), context)
        if context.is_main:
            valid = task.validate(model, device)
        valid = distributed.from_main(valid, context)
        improved = (position.best_valid_exact_match is None
                    or valid["exact_match"] > position.best_valid_exact_match)
        if improved:
            position.best_valid_exact_match = valid["exact_match"]
        history.append({"step": position.step, "epoch": position.epoch, "train_loss": tally.loss,
                        "train_token_accuracy": tally.token_accuracy,
                        **{f"valid_{key}": value for key, value in valid.items()}})
        if out_dir is not None:
            state = _make_checkpoint(task, model, optimizer, model_config, position, valid, config, rank_rng_states)
            if improved:
                best_path = str(out_dir / "best.pt")
                save_checkpoint(state, best_path)
            last_path = str(out_dir / "last.pt")
            save_checkpoint(state, last_path)
        epochs_done = position.epoch + position.batch_in_epoch / max(len(epoch_list), 1)
        log(f"step {position.step}, epoch {epochs_done:.2f}: train loss {tally.loss:.4f} token acc "
            f"{tally.token_accuracy:.4f} | valid exact match {valid['exact_match']:.4f} {task.describe_scores(valid)}"
            + (" (best)" if improved else ""))

    wall_time = time.perf_counter() - start
    best = position.best_valid_exact_match
    if context.is_main:
        print(f"train: {position.step} steps, {position.epoch} epochs, {wall_time:.1f} s, best valid exact match "
              + (f"{best:.4f}" if best is not None else "n/a") + f" (stopped: {stop})"
              + (f", best checkpoint {best_path}" if best_path else ""))
    return RunResult(steps=position.step, epoch=position.epoch, wall_time=wall_time, best_valid_exact_match=best,
                     stop_reason=stop, valid=valid, best_checkpoint=best_path, last_checkpoint=last_path,
                     history=history, model=model.eval())


def _make_checkpoint(task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_config: dict,
                     position: RunPosition, valid: dict, config: RunConfig,
                     rank_rng_states: list[torch.Tensor]) -> dict:
    return {
        "format": task.checkpoint_format,
        "model_config": model_config,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        **task.vocab_state(),
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


def _restore_rng(checkpoint: dict, context: distributed.Distributed, position: RunPosition) -> None:
    """Put back the dropout RNG of the run that wrote `checkpoint` (this rank's, when it ran with as many
    processes). A resume in the middle of an epoch needs the same number of processes: the shards would differ.
    (Checkpoints of single-process captioning runs written before the loop was shared have no "world_size" and
    no "ranks": they count as one process.)"""
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
