"""The SpeechBrain decoder bench (attn_fast.tools.bench.framework_bench) at its tiny size: every row checked, then
timed; and the section's answer when SpeechBrain cannot be imported."""
from __future__ import annotations

import pytest
import torch
from integration_helpers import import_speechbrain

from attn_fast.tools.bench import framework_bench


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
