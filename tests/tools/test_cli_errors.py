"""User errors through the real entry point (`python -m attn_fast.tools.cli`, the console script's main, in a
process of its own): each ends with exit status 2 and one line on stderr, `attn-fast <command>: error: ...`, that
names the flag or file and the problem, without a traceback, before any work, and leaves the files it was given as
they were. `--debug` and ATTN_FAST_DEBUG=1 bring the traceback back.

The commands run in processes forked from a server that imported the CLI once (tests/cli_process.py, the
`cli_processes` fixture): a fresh interpreter per command spent ~3-5 s importing torch before refusing in
milliseconds. The first test runs commands both ways, there and in a plain `python -m attn_fast.tools.cli`
subprocess, and requires the same exit status, stdout and stderr."""
import subprocess
from pathlib import Path

import pytest
import torch

from attn_fast.examples.checkpoints import CHECKPOINT_TASKS
from attn_fast.tools.cli import main

TINY_RUN = ["--train-size", "64", "--valid-size", "8", "--embed-dim", "8", "--hidden-dim", "16", "--attn-dim", "8",
            "--batch-size", "16", "--attention-backend", "torch", "--device", "cpu", "--quiet"]
TINY_CAPTIONS = ["--train-size", "16", "--valid-size", "4", "--image-size", "48", "--channels", "8", "--embed-dim",
                 "8", "--hidden-dim", "16", "--attn-dim", "8", "--batch-size", "8", "--attention-backend", "torch",
                 "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A finished tiny `attn-fast train` run (run/best.pt, run/last.pt) and damaged or foreign copies of its
    checkpoint: truncated (as by a write killed before the atomic rename existed), empty, without its keys, and
    relabelled as a captioning checkpoint; plus a plain file where a directory is expected. By name without .pt."""
    root = tmp_path_factory.mktemp("cli-errors")
    assert main(["train", *TINY_RUN, "--max-steps", "1", "--out-dir", str(root / "run")]) == 0
    checkpoint_bytes = (root / "run" / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(checkpoint_bytes[:len(checkpoint_bytes) // 2])
    (root / "empty.pt").write_bytes(b"")
    torch.save({"format": CHECKPOINT_TASKS["train"].format}, root / "keyless.pt")
    captions = torch.load(root / "run" / "last.pt", weights_only=True)
    captions["format"] = CHECKPOINT_TASKS["train-captions"].format
    torch.save(captions, root / "captions.pt")
    (root / "a-file").write_text("not a directory")
    return {name.removesuffix(".pt"): root / name
            for name in ("run", "truncated.pt", "empty.pt", "keyless.pt", "captions.pt", "a-file")}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def as_text(completed: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(completed.args, completed.returncode, completed.stdout.decode("utf-8"),
                                       completed.stderr.decode("utf-8"))


def run_cli(cli_processes, *args: str, **environment: str) -> subprocess.CompletedProcess:
    """`attn-fast ARGS` in a process of its own (forked from the fixture's server), on this checkout's attn_fast
    (the editable install may point elsewhere), without ATTN_FAST_DEBUG unless given; text stdout and stderr."""
    return as_text(cli_processes.run(*args, **environment))


slow = pytest.mark.slow
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a missing CUDA")

# (argv: {name} stands for a file of the fixture, by name without .pt, and {new} for an output directory that must
# stay uncreated; the command that reports; what its one line must say; id). Three run in the quick loop, the rest
# are slow.
CASES = [
    pytest.param(["train", *TINY_RUN, "--batch-size", "0", "--out-dir", "{new}"], "train",
                 ["--batch-size must be a positive integer, got 0"], id="batch-size-0"),
    pytest.param(["train", *TINY_RUN, "--lr", "nan", "--out-dir", "{new}"], "train",
                 ["--lr must be a positive number, got nan"], id="lr-nan", marks=slow),
    pytest.param(["train", *TINY_RUN, "--hidden-dim", "0", "--out-dir", "{new}"], "train",
                 ["--hidden-dim must be a positive integer, got 0"], id="hidden-dim-0", marks=slow),
    pytest.param(["train", *TINY_RUN, "--dropout", "1.5", "--out-dir", "{new}"], "train",
                 ["--dropout must be in [0, 1), got 1.5"], id="dropout-1.5", marks=slow),
    pytest.param(["train", *TINY_RUN, "--max-steps", "-1", "--out-dir", "{new}"], "train",
                 ["--max-steps must be a positive integer, got -1"], id="max-steps-negative", marks=slow),
    pytest.param(["train", *TINY_RUN, "--epochs", "0", "--out-dir", "{new}"], "train",
                 ["--epochs must be a positive integer, got 0"], id="epochs-0", marks=slow),
    pytest.param(["train-captions", *TINY_CAPTIONS, "--image-size", "16", "--out-dir", "{new}"], "train-captions",
                 ["--image-size must be a multiple of 8 and at least 48", "got 16"], id="image-size-16", marks=slow),
    pytest.param(["train", *TINY_RUN, "--batch-size", "many", "--out-dir", "{new}"], "train",
                 ["argument --batch-size: invalid int value: 'many'"], id="argparse-type", marks=slow),
    pytest.param(["train", *TINY_RUN, "--data-tsv", "{new}/train.tsv", "--out-dir", "{new}"], "train",
                 ["give both --data-tsv and --valid-tsv"], id="one-tsv-file", marks=slow),
    pytest.param(["train", *TINY_RUN, "--data-tsv", "{new}/train.tsv", "--valid-tsv", "{new}/valid.tsv",
                  "--out-dir", "{new}"], "train", ["--data-tsv", "train.tsv: no such file"], id="missing-tsv",
                 marks=slow),
    pytest.param(["train", *TINY_RUN, "--device", "cuda", "--out-dir", "{new}"], "train",
                 ["--device cuda asked for, but CUDA is not available"], id="train-device-cuda",
                 marks=[slow, no_cuda]),
    pytest.param(["evaluate", "--checkpoint", "{run}/last.pt", "--device", "cuda"], "evaluate",
                 ["--device cuda asked for, but CUDA is not available"], id="evaluate-device-cuda",
                 marks=[slow, no_cuda]),
    pytest.param(["train", *TINY_RUN, "--resume", "{truncated}", "--out-dir", "{new}"], "train",
                 ["truncated.pt is not a readable checkpoint: truncated or damaged"], id="truncated-checkpoint"),
    pytest.param(["evaluate", "--checkpoint", "{empty}"], "evaluate", ["empty.pt is empty (0 bytes)"],
                 id="empty-checkpoint", marks=slow),
    pytest.param(["evaluate", "--checkpoint", "{keyless}"], "evaluate",
                 ["keyless.pt is a checkpoint of attn-fast train without", "model_config"], id="keyless-checkpoint",
                 marks=slow),
    pytest.param(["train", *TINY_RUN, "--resume", "{captions}", "--out-dir", "{new}"], "train",
                 ["captions.pt is a checkpoint of attn-fast train-captions, not train"], id="foreign-checkpoint",
                 marks=slow),
    pytest.param(["evaluate-captions", "--checkpoint", "{run}/best.pt"], "evaluate-captions",
                 ["best.pt is a checkpoint of attn-fast train, not train-captions"], id="other-task-checkpoint",
                 marks=slow),
    pytest.param(["train", *TINY_RUN, "--resume", "{run}/last.pt", "--overwrite", "--out-dir", "{new}"], "train",
                 ["--overwrite starts a new run and --resume continues one"], id="overwrite-and-resume", marks=slow),
    pytest.param(["train", *TINY_RUN, "--out-dir", "{a-file}"], "train", ["a-file is a file, not a directory"],
                 id="out-dir-is-a-file", marks=slow),
    pytest.param(["train", *TINY_RUN, "--max-steps", "1", "--out-dir", "{run}"], "train",
                 ["already holds best.pt, last.pt: give --resume", "--overwrite"], id="out-dir-holds-a-run"),
]


def case_args(argv: list[str], files: dict[str, Path], new_dir: Path) -> list[str]:
    names = {name: str(path) for name, path in files.items()}
    return [arg.replace("{new}", str(new_dir)).format(**names) for arg in argv]


def test_a_forked_command_is_the_real_entry_point(cli_processes, files, tmp_path):
    """What the other tests see of a command (exit status, stdout, stderr) is what a fresh `python -m
    attn_fast.tools.cli` process gives: a refusal by `main` (the quick loop's first case) and the usage error
    that argparse exits with."""
    from tests.cli_process import run_real_cli

    for argv in (CASES[0].values[0], ["no-such-command"]):
        args = case_args(argv, files, tmp_path / "new-run")
        forked, real = cli_processes.run(*args), run_real_cli(*args)
        assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
        assert real.returncode == 2 and real.stderr.count(b"\n") == 1, real
    assert not (tmp_path / "new-run").exists()


@pytest.mark.parametrize(("argv", "command", "expected"), CASES)
def test_a_user_error_is_one_line_and_exit_2(cli_processes, files, tmp_path, argv, command, expected):
    new_dir = tmp_path / "new-run"
    args = case_args(argv, files, new_dir)
    root = files["run"].parent
    before = snapshot(root)
    completed = run_cli(cli_processes, *args)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"attn-fast {command}: error: "), completed.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert completed.stdout == ""  # refused before any work: not even the run's first log line
    assert snapshot(root) == before  # nothing given was changed or lost
    assert not new_dir.exists()  # and no output directory was made for a run that never started


@pytest.mark.slow
@pytest.mark.parametrize("debug", [["--debug", "evaluate"], ["evaluate", "--debug"], ["evaluate"]],
                         ids=["flag-before", "flag-after", "environment"])
def test_debug_shows_the_traceback(cli_processes, files, debug):
    environment = {"ATTN_FAST_DEBUG": "1"} if "--debug" not in debug else {}
    completed = run_cli(cli_processes, *debug, "--checkpoint", str(files["empty"]), **environment)
    assert completed.returncode == 1  # the exception escapes main, as Python reports it
    assert "Traceback" in completed.stderr and "UserError: " in completed.stderr
    assert "empty.pt is empty (0 bytes)" in completed.stderr
