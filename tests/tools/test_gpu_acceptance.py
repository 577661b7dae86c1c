"""benchmarks/gpu_acceptance.sh, the first GPU's acceptance run, as far as a machine without a GPU can check it: it
parses, finds no GPU, says so in one line and exits 0 (a dry run); its Python helper's environment record and
summary work. (On a GPU machine the run itself is the check: `bash benchmarks/gpu_acceptance.sh`.) The helper's
commands run as `python benchmarks/gpu_acceptance.py ...` in processes forked from a server that imported torch and
attn_fast once (tests/cli_process.py, the `cli_processes` fixture), not in fresh interpreters (~4 s each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
SCRIPT = REPOSITORY / "benchmarks" / "gpu_acceptance.sh"
HELPER = REPOSITORY / "benchmarks" / "gpu_acceptance.py"


#: What makes this machine one without a GPU, even when it has one (the helper's process initializes CUDA itself).
WITHOUT_GPU = {"CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def without_gpu() -> dict:
    """The environment of a machine without a GPU, even when this one has one."""
    return {**os.environ, **WITHOUT_GPU}


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0


@pytest.mark.slow
def test_dry_run_without_gpu_says_so_and_exits_0():
    before = set((REPOSITORY / "benchmarks" / "results").glob("gpu-acceptance-*"))
    finished = subprocess.run(["bash", str(SCRIPT)], cwd="/", env=without_gpu(), capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "dry run" in lines[0], finished.stdout
    assert set((REPOSITORY / "benchmarks" / "results").glob("gpu-acceptance-*")) == before, "a dry run writes nothing"


def run_helper(cli_processes, *args: str, **environment: str) -> subprocess.CompletedProcess:
    """`python benchmarks/gpu_acceptance.py ARGS` in a process of its own; text stdout and stderr."""
    finished = cli_processes.run(*args, script=HELPER, **environment)
    return subprocess.CompletedProcess(finished.args, finished.returncode, finished.stdout.decode(),
                                       finished.stderr.decode())


@pytest.mark.slow
def test_helper_records_the_environment_and_summarizes(tmp_path, cli_processes):
    finished = run_helper(cli_processes, "env", str(tmp_path / "environment.json"), **WITHOUT_GPU)
    assert finished.returncode == 0, finished.stderr
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["cuda"] is False and {"torch", "triton", "date_utc", "driver"} <= set(environment)

    (tmp_path / "steps.jsonl").write_text('{"step": "verify", "rc": 0, "seconds": 3, "limit_s": 40}\n')
    for name, ok in (("numerics", True), ("determinism", True), ("graphs", False), ("prepared-keys", True)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"ok": ok, "error": None if ok else "capture failed"}))
    finished = run_helper(cli_processes, "summary", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert finished.returncode == 1 and "FAIL" in finished.stdout and "graphs" in finished.stdout
    assert summary["ok"] is False and summary["checks"] == {"numerics": True, "determinism": True, "graphs": False,
                                                            "prepared-keys": True}
    assert summary["environment"]["torch"] == environment["torch"]


@pytest.mark.slow
def test_gpu_checks_refuse_to_run_without_gpu(tmp_path, cli_processes):
    finished = run_helper(cli_processes, "graphs", str(tmp_path / "graphs.json"), **WITHOUT_GPU)
    assert finished.returncode == 2 and "no CUDA GPU" in finished.stderr


def test_the_prepared_keys_check_runs_both_configurations(monkeypatch):
    """The acceptance run's prepared-keys A/B, run on CPU under the Triton interpreter at a tiny shape with a
    stand-in timer: both configurations are planned as asked, agree within fp32 accuracy, and are reported."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(REPOSITORY / "benchmarks"))
    import gpu_acceptance

    timed = []

    def timer(function):
        function()
        timed.append(True)
        return float(len(timed))  # the pre-pass-off run is "faster": it is timed first

    report = gpu_acceptance.prepared_keys(device="cpu", shapes=(("tiny", 2, 10, 37, 16, 8),), timer=timer)
    row = report["tiny"]
    assert report["ok"] and len(timed) == 2 and row["faster"] == "default_off"
    assert "prepare_keys=False" in row["default_off"]["config"] and "prepare_keys=True" in row["prepared"]["config"]
    assert row["relative_difference"] <= 1e-5
