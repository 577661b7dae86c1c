"""The SpeechBrain decoder bench (attn_fast.tools.bench.framework_bench) at its tiny size: every row checked, then
timed; and the section's answer when SpeechBrain cannot be imported."""
from __future__ import annotations

import pytest
import torch
from integration_helpers import import_speechbrain

from attn_fast.tools.bench import framework_bench, runner
from attn_fast.tools.cli import main


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: two threads fight over the cores (steps 5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_run_checks_then_times_every_variant(one_thread):
    import_speechbrain()  # skips without SpeechBrain; installs the test stand-in for torchaudio where needed
    result = framework_bench.run_framework_bench("cpu", config="tiny", backends=["torch"], target_s=0.01)
    assert result["threads"] == 1
    assert result["status"] == "ok" and result["config"]["name"] == "tiny"
    rows = {(row["attn_type"], row["variant"]): row for row in result["results"]}
    assert set(rows) == {(attn, variant) for attn in ("content", "location") for variant in ("speechbrain", "torch")}
    for (attn_type, variant), row in rows.items():
        assert row["status"] == "ok", row.get("error")
        for workload in ("train_step", "greedy", "beam"):
            assert row[workload]["median_s"] > 0 and row[workload]["repeats"] >= 3
            assert row[f"{workload}_speedup"] == pytest.approx(
                rows[(attn_type, "speechbrain")][workload]["median_s"] / row[workload]["median_s"])
        if variant == "torch":
            assert row["check"]["passed"] and 0 < row["check"]["logits_error"] <= row["check"]["tolerance"]
            expected = "ContentBasedAttention" if attn_type == "content" else "LocationAwareAttention"
            assert row["swapped"] == [f"attn: {expected} -> Fused{expected}"]
        else:
            assert "check" not in row and "swapped" not in row
    table = framework_bench.framework_table(result).splitlines()
    assert table[0].startswith("SpeechBrain AttentionalRNNDecoder before/after swap_attention (tiny")
    assert len(table) == 2 + len(rows) and all("failed" not in line for line in table)


def test_without_speechbrain_the_section_says_why(monkeypatch):
    reason = "SpeechBrain is not importable (ModuleNotFoundError: No module named 'torchaudio'); pip install ..."
    monkeypatch.setattr(framework_bench, "import_speechbrain", lambda: reason)
    result = framework_bench.run_framework_bench("cpu", config="tiny")
    assert result == {"status": "skipped", "reason": reason}
    assert framework_bench.framework_table(result) == (
        f"SpeechBrain decoder before/after swap_attention: skipped ({reason})")


def test_attn_fast_bench_turns_the_section_on_unless_told_not_to(monkeypatch):
    """`attn-fast bench` asks run_bench for the section; --no-model (it is a model benchmark) and --no-framework
    do not."""
    asked = []

    def fake_run_bench(**options):
        asked.append(options["framework"])
        return {"summary": {"failed": 0}, "model": None, "ragged": None,
                "framework": {"status": "ok", "results": [{"status": "failed"}]} if options["framework"] else None}

    monkeypatch.setattr(runner, "run_bench", fake_run_bench)
    common = ["bench", "--device", "cpu", "--quiet"]
    assert main([*common, "--no-model"]) == 0 and main([*common, "--no-framework"]) == 0
    assert main(common) == 1  # a failed framework row fails the run, as a failed model row does
    assert asked == [False, False, True]


@pytest.mark.slow
def test_run_bench_runs_the_section(monkeypatch, capsys):
    """run_bench calls the section with the run's swap backends (quick size; "asr" with full), keeps its result
    and prints its table."""
    calls = []

    def fake_bench(device, *, config, backends, target_s):
        calls.append((str(device), config, list(backends)))
        return {"status": "skipped", "reason": "a fake section"}

    monkeypatch.setattr(framework_bench, "run_framework_bench", fake_bench)
    result = runner.run_bench(device="cpu", shapes=["tiny"], modes=["forward"], backends=["reference", "torch"],
                              model=False, memory=False, ragged_batches=False, framework=True, out_dir=None,
                              progress=False)
    assert calls == [("cpu", "quick", ["torch"])]
    assert result["framework"] == {"status": "skipped", "reason": "a fake section"}
    assert result["settings"]["framework"] is True
    assert "SpeechBrain decoder before/after swap_attention: skipped (a fake section)" in capsys.readouterr().out
