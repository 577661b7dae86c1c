"""The output directory of a training run (`training.claim_out_dir`): an exclusive lock for the run, stale checkpoint
temporaries removed at start and nothing else, a directory with files refused unless the run resumes or overwrites;
and, through the real command in subprocesses, SIGKILL in the middle of checkpoint writes (the previous checkpoint
survives, the next start cleans up), a second run into a directory in use, and a torchrun launch that refuses. The
commands run in processes of their own forked from a server that imported the CLI once (tests/cli_process.py, the
`cli_processes` fixture), but for the torchrun launch."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from attn_fast.examples.checkpoints import is_stale_temporary, load_checkpoint
from attn_fast.examples.errors import UserError
from attn_fast.examples.training import LOCK_NAME, RunConfig, claim_out_dir
from attn_fast.tools.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY_RUN = ["--train-size", "64", "--valid-size", "8", "--embed-dim", "8", "--hidden-dim", "16", "--attn-dim", "8",
            "--batch-size", "16", "--attention-backend", "torch", "--device", "cpu", "--quiet"]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of `directory` (not recursive) by name, with its bytes: what a refusal must leave as it was."""
    return {entry.name: entry.read_bytes() for entry in directory.iterdir() if entry.is_file()}


def config(out_dir: Path, **fields) -> RunConfig:
    return RunConfig(out_dir=str(out_dir), device="cpu", **fields)


# ----------------------------------------------------------------------------------------------------------------
# claim_out_dir, in process
# ----------------------------------------------------------------------------------------------------------------

def test_an_empty_or_missing_directory_is_claimed_and_released(tmp_path):
    out_dir = tmp_path / "new" / "run"
    with claim_out_dir(config(out_dir)) as claimed:
        assert claimed == out_dir and out_dir.is_dir()
        assert (out_dir / LOCK_NAME).read_text().strip() == str(os.getpid())  # the holder, for the refusal message
    assert list(out_dir.iterdir()) == []  # the lock file goes with the run
    with claim_out_dir(RunConfig(out_dir=None, device="cpu")) as claimed:
        assert claimed is None


def test_a_directory_with_files_is_refused_and_kept(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"the previous run's")
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"already holds best.pt, notes.txt: give --resume .*last.pt.*--overwrite"):
        with claim_out_dir(config(tmp_path)):
            pytest.fail("the run must not start")
    assert snapshot(tmp_path) == before


def test_resume_may_use_a_directory_with_files(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"the run to continue")
    with claim_out_dir(config(tmp_path, resume=str(tmp_path / "last.pt"))):
        assert (tmp_path / "last.pt").read_bytes() == b"the run to continue"


def test_overwrite_removes_the_previous_checkpoints_and_nothing_else(tmp_path):
    for name in ("best.pt", "last.pt", "notes.txt"):
        (tmp_path / name).write_text(name)
    with claim_out_dir(config(tmp_path, overwrite=True)):
        assert sorted(entry.name for entry in tmp_path.iterdir()) == [LOCK_NAME, "notes.txt"]


def test_stale_checkpoint_temporaries_are_removed_and_nothing_else(tmp_path):
    stale = [".last.pt.k3j_x9q2.tmp", ".best.pt.abcdefgh.tmp"]
    others = [".last.pt.tmp", ".notes.txt.abcdefgh.tmp", "last.pt.abcdefgh.tmp", ".last.pt.abcdefgh.tmp.keep"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "last.pt").write_bytes(b"checkpoint")
    with claim_out_dir(config(tmp_path, resume=str(tmp_path / "last.pt"))):
        assert sorted(entry.name for entry in tmp_path.iterdir()) == sorted([LOCK_NAME, "last.pt", *others])
    assert [name for name in stale + others if is_stale_temporary(name)] == stale


def test_a_directory_in_use_is_refused(tmp_path):
    with claim_out_dir(config(tmp_path)):
        # flock locks belong to the open file, so a second claim conflicts even from the same process
        with pytest.raises(UserError, match=rf"is in use by another run \(pid {os.getpid()}\)"):
            with claim_out_dir(config(tmp_path, overwrite=True)):
                pytest.fail("two runs must not share a directory")
        assert (tmp_path / LOCK_NAME).exists()  # the refused claim left the holder's lock alone
    with claim_out_dir(config(tmp_path)):  # released: the next run may take it
        pass


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(UserError, match="is a file, not a directory"):
        with claim_out_dir(config(tmp_path / "run")):
            pytest.fail("the run must not start")
    assert (tmp_path / "run").read_text() == "not a directory"


def test_only_rank_0_claims_the_directory(tmp_path, monkeypatch):
    (tmp_path / "best.pt").write_text("rank 0 decides about this")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with claim_out_dir(config(tmp_path)):
        assert not (tmp_path / LOCK_NAME).exists()
    assert snapshot(tmp_path) == {"best.pt": b"rank 0 decides about this"}


# ----------------------------------------------------------------------------------------------------------------
# The real command, killed and raced
# ----------------------------------------------------------------------------------------------------------------

# Run before `attn-fast ARGS`: torch.save stopped in the middle of every checkpoint write: it writes half of the
# bytes to the temporary file, creates the file $PAUSED, and finishes only once the file $GO exists (or is killed
# first).
PAUSING_PRELUDE = textwrap.dedent("""
    import io, os, time
    from pathlib import Path

    import torch

    paused, go = Path(os.environ["PAUSED"]), Path(os.environ["GO"])
    real_save = torch.save

    def save_with_a_pause(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[:len(data) // 2])
        f.flush()
        paused.touch()
        while not go.exists():
            time.sleep(0.02)
        f.write(data[len(data) // 2:])

    torch.save = save_with_a_pause
""")


def cli_environment(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that runs this checkout's attn_fast (the editable install may point
    elsewhere) on one thread."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def run_cli(cli_processes, *args: str) -> subprocess.CompletedProcess:
    """`attn-fast ARGS` through its entry point, `python -m attn_fast.tools.cli` (the console script's main), in a
    process of its own forked from the fixture's server, which imported the CLI once (tests/cli_process.py); text
    stdout and stderr."""
    completed = cli_processes.run(*args)
    return subprocess.CompletedProcess(completed.args, completed.returncode, completed.stdout.decode("utf-8"),
                                       completed.stderr.decode("utf-8"))


def start_paused(cli_processes, tmp_path: Path, *args: str):
    """Start `attn-fast ARGS` with PAUSING_PRELUDE (in a process of its own, forked from the fixture's server) and
    wait until it is halfway through its first checkpoint write; returns (process, the PAUSED file, the GO file)."""
    paused, go = tmp_path / "paused", tmp_path / "go"
    paused.unlink(missing_ok=True)
    process = cli_processes.start(*args, prelude=PAUSING_PRELUDE, PAUSED=str(paused), GO=str(go))
    deadline = time.monotonic() + 240
    while not paused.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before its checkpoint write: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run did not reach its checkpoint write in 240 s")
        time.sleep(0.05)
    return process, paused, go


def assert_one_line_error(completed: subprocess.CompletedProcess, command: str, *expected: str) -> None:
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"attn-fast {command}: error: "), completed.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.slow
def test_kills_during_checkpoint_writes_keep_the_previous_checkpoint_and_the_next_start_cleans_up(tmp_path,
                                                                                                  cli_processes):
    out_dir = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--max-steps", "2", "--out-dir", str(out_dir)]) == 0
    previous = snapshot(out_dir)
    assert sorted(previous) == ["best.pt", "last.pt"]
    resume = ["train", *TINY_RUN, "--max-steps", "4", "--out-dir", str(out_dir), "--resume", str(out_dir / "last.pt")]
    for kill in range(2):  # repeated: the second start must remove what the first kill left
        process, _, _ = start_paused(cli_processes, tmp_path, *resume)
        temporaries = [entry.name for entry in out_dir.iterdir() if entry.name.endswith(".tmp")]
        # this write's, half done; the previous kill's was removed when this run started
        assert len(temporaries) == 1 and is_stale_temporary(temporaries[0]), (kill, temporaries)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        assert {name: data for name, data in snapshot(out_dir).items() if name.endswith(".pt")} == previous
        assert load_checkpoint(out_dir / "last.pt", "train", for_resume=True)["step"] == 2

    completed = run_cli(cli_processes, *resume)  # the next start, unhindered
    assert completed.returncode == 0 and "Traceback" not in completed.stderr, completed.stderr
    assert sorted(entry.name for entry in out_dir.iterdir()) == ["best.pt", "last.pt"]  # no temporary, no lock
    assert load_checkpoint(out_dir / "last.pt", "train", for_resume=True)["step"] == 4


@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_refuses(tmp_path, cli_processes):
    out_dir = tmp_path / "run"
    first, _, go = start_paused(cli_processes, tmp_path, "train", *TINY_RUN, "--max-steps", "2", "--out-dir",
                                str(out_dir))
    try:
        during = snapshot(out_dir)
        # even --overwrite, which would remove the first run's checkpoints, must not take a directory in use
        second = run_cli(cli_processes, "train", *TINY_RUN, "--max-steps", "2", "--out-dir", str(out_dir),
                         "--overwrite")
        assert_one_line_error(second, "train", f"--out-dir {out_dir} is in use by another run (pid {first.pid})")
        assert snapshot(out_dir) == during
    finally:
        go.touch()
    stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stdout + stderr
    assert "best checkpoint" in stdout  # the first run's summary: best.pt is its own
    assert sorted(entry.name for entry in out_dir.iterdir()) == ["best.pt", "last.pt"]
    assert load_checkpoint(out_dir / "last.pt", "train")["step"] == 2


@pytest.mark.slow
def test_a_torchrun_launch_into_a_directory_with_files_refuses_without_hanging(tmp_path):
    # Rank 0 refuses before the process group forms; torchrun must then stop rank 1, which waits for it there.
    (tmp_path / "last.pt").write_bytes(b"a previous run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "attn_fast.tools.cli", "train", *TINY_RUN, "--max-steps", "2", "--out-dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, env=cli_environment(), timeout=240)
    assert completed.returncode != 0
    assert f"attn-fast train: error: --out-dir {tmp_path} already holds last.pt" in completed.stderr
    assert snapshot(tmp_path) == {"last.pt": b"a previous run"}

