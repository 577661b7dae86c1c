"""`attn-fast verify`: the table, and exit code 1 when anything fails; how `main` reports errors (one line on
stderr, the exit status; --debug and ATTN_FAST_DEBUG=1 keep the traceback). The same through a subprocess, for
every user error of the examples: tests/tools/test_cli_errors.py."""
import importlib
import shutil
import subprocess

import pytest

import attn_fast.tools.verify
from attn_fast.examples.errors import UserError
from attn_fast.tools.cli import main


def test_verify_passes_and_prints_a_row_per_case(capsys):
    assert main(["verify", "--backend", "torch", "--backend", "reference", "--dtype", "float32"]) == 0
    output = capsys.readouterr().out
    rows = [line for line in output.splitlines() if line.startswith(("torch ", "reference "))]
    assert len(rows) == 2 * len(attn_fast.tools.verify.CASES)
    assert all(row.endswith("ok") for row in rows)
    assert "all passed" in output


@pytest.mark.slow
def test_verify_runs_the_triton_kernels_under_the_interpreter(capsys):
    # conftest sets TRITON_INTERPRET=1 on machines without CUDA
    assert main(["verify", "--backend", "triton", "--dtype", "float32", "--dtype", "bfloat16"]) == 0
    output = capsys.readouterr().out
    rows = [line for line in output.splitlines() if line.startswith("triton ")]
    assert len(rows) == 2 * len(attn_fast.tools.verify.CASES) and all(row.endswith("ok") for row in rows)


def test_verify_exits_1_on_failure(capsys, monkeypatch):
    monkeypatch.setattr(attn_fast.tools.verify, "forward_tolerance", lambda dtype: -1.0)
    assert main(["verify", "--backend", "torch", "--dtype", "float64"]) == 1
    output = capsys.readouterr().out
    assert f"{len(attn_fast.tools.verify.CASES)} failed" in output and "FAIL" in output


@pytest.mark.slow
def test_console_script_is_installed():
    executable = shutil.which("attn-fast")
    if executable is None:
        pytest.fail("the attn-fast console script is not on PATH: was the package installed with pip install -e .?")
    result = subprocess.run([executable, "verify", "--backend", "torch", "--dtype", "float64"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all passed" in result.stdout


@pytest.mark.parametrize(("argv", "line"), [
    (["train", "--batch-size", "x"], "attn-fast train: error: argument --batch-size: invalid int value: 'x' "
                                     "(see attn-fast train --help)"),
    (["train", "--no-such-flag"], "attn-fast train: error: unrecognized arguments: --no-such-flag "
                                  "(see attn-fast train --help)"),
    (["no-such-command"], "attn-fast: error: argument command: invalid choice: 'no-such-command'"),
    ([], "attn-fast: error: the following arguments are required: command"),
])
def test_argparse_errors_are_one_line_and_exit_2(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err


def failing_train(error: BaseException):
    def train(config):
        raise error
    return train


@pytest.mark.parametrize(("error", "status", "line"), [
    (UserError("--thing must be\nsomething"), 2, "attn-fast train: error: --thing must be something"),
    (FileNotFoundError(2, "No such file or directory", "data/x.tsv"), 1,
     "attn-fast train: error: data/x.tsv: No such file or directory"),
    (KeyboardInterrupt(), 130, "attn-fast train: interrupted"),
])
def test_main_reports_errors_in_one_line_unless_debugging(error, status, line, capsys, monkeypatch):
    monkeypatch.delenv("ATTN_FAST_DEBUG", raising=False)
    monkeypatch.setattr(importlib.import_module("attn_fast.examples.seq2seq.train"), "train", failing_train(error))
    assert main(["train"]) == status
    assert capsys.readouterr().err == line + "\n"
    for argv in (["--debug", "train"], ["train", "--debug"]):
        with pytest.raises(type(error)):
            main(argv)
    monkeypatch.setenv("ATTN_FAST_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["train"])
    monkeypatch.setenv("ATTN_FAST_DEBUG", "0")
    assert main(["train"]) == status


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(importlib.import_module("attn_fast.examples.seq2seq.train"), "train",
                        failing_train(ZeroDivisionError("a bug, not a user error")))
    with pytest.raises(ZeroDivisionError):
        main(["train"])
