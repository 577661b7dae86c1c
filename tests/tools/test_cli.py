"""`attn-fast verify`: the table, and exit code 1 when anything fails."""
import shutil
import subprocess

import pytest

import attn_fast.tools.verify
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
