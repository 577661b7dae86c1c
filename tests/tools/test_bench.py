"""`attn-fast bench` cannot rot: the runner end to end on the tiny shape, the correct-before-timed rule, the memory
probe, the roofline prediction, the targets and the CLI options. No test asserts a timing."""
import argparse
import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from attn_fast.tools.bench import cases, memory, ragged, report, roofline, runner, targets
from attn_fast.tools.bench.cases import CaseSpec
from attn_fast.tools.bench.cli import add_bench_parser
from attn_fast.tools.cli import main

CPU = torch.device("cpu")


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-fast")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.slow
def test_runner_end_to_end_on_tiny_shape(tmp_path):
    table = io.StringIO()
    result = runner.run_bench(device="cpu", shapes=["tiny"], backends=["reference", "torch"], out_dir=tmp_path,
                              model_config="tiny", progress=False, out=table)

    printed = table.getvalue()
    assert "tiny/fp32/forward_backward" in printed and "x eager" in printed and "Seq2Seq 'tiny'" in printed
    saved = json.loads((tmp_path / result["files"]["json"].split("/")[-1]).read_text())
    for field in ("host", "cpu", "device", "torch", "triton", "threads"):
        assert field in saved["machine"]
    assert saved["date"] and saved["wall_s"] > 0
    assert [(c["mode"], c["backend"]) for c in saved["cases"]] == [
        (mode, backend) for mode in cases.MODES for backend in ("reference", "torch")]
    for case in saved["cases"]:
        assert case["status"] == "ok", case
        assert case["check"]["passed"] and case["timing"]["median_s"] > 0
        assert len(case["timing"]["samples_s"]) == case["timing"]["repeats"] >= 3
        assert case["timing"]["threads"] == torch.get_num_threads()
    eager_forward, torch_forward = saved["cases"][0], saved["cases"][1]
    assert eager_forward["speedup_vs_eager"] == 1.0
    assert "memory" in torch_forward and "peak_extra_mib" in torch_forward["memory"], torch_forward
    assert torch_forward["targets"] == {}  # tiny is not one of the shapes the CPU targets name
    assert [r["status"] for r in saved["model"]["results"]] == ["ok"] * 4
    assert all(r["greedy_sentences_per_s"] > 0 and r["beam_sentences_per_s"] > 0 for r in saved["model"]["results"])
    [ragged_row] = saved["ragged"]["rows"]  # the fast backends only: torch here
    assert ragged_row["backend"] == "torch" and "saving" in ragged_row and "Ragged batches" in printed
    png = (tmp_path / result["files"]["png"].split("/")[-1]).read_bytes()
    assert png.startswith(b"\x89PNG")

    # `attn-fast bench --show RUN.json` prints the same tables again from the saved file.
    shown = io.StringIO()
    with redirect_stdout(shown):
        assert main(["bench", "--show", str(tmp_path / result["files"]["json"].split("/")[-1])]) == 0
    assert shown.getvalue().strip() == printed.strip().split("\nwritten:")[0].strip()


@pytest.mark.slow
def test_compile_case_reports_compile_time_apart():
    record = runner.run_case(CaseSpec("tiny", "fp32", "forward", "compile"), CPU, target_s=0.05,
                             measure_memory=False, seed=0, threads=None, mufu_limit=None, static_predictions=None)
    assert record["status"] == "ok", record
    assert record["compile_s"] == record["first_call_s"] > 0
    assert record["timing"]["median_s"] < record["compile_s"]  # compilation is not inside the timed calls


def test_incorrect_backend_is_reported_failed_and_not_timed(monkeypatch):
    real_build = cases.build_attention

    def build(backend, device, mode="forward"):
        if backend != "torch":
            return real_build(backend, device, mode)

        def garbage(query_proj, key_proj, value, v, **options):
            return torch.randn(*query_proj.shape[:2], value.shape[-1], dtype=value.dtype), None
        return garbage

    monkeypatch.setattr(cases, "build_attention", build)
    result = runner.run_bench(device="cpu", shapes=["tiny"], modes=["forward"], backends=["reference", "torch"],
                              model=False, memory=False, out_dir=None, progress=False, out=io.StringIO())
    eager, broken = result["cases"]
    assert eager["status"] == "ok"
    assert broken["status"] == "failed" and "incorrect, not timed" in broken["error"]
    assert "timing" not in broken and broken["speedup_vs_eager"] is None
    assert result["summary"]["failed"] == 1


def test_backend_that_raises_is_reported_failed(monkeypatch):
    def build(backend, device, mode="forward"):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(cases, "build_attention", build)
    record = runner.run_case(CaseSpec("tiny", "fp32", "forward", "compile"), CPU, target_s=0.05,
                             measure_memory=False, seed=0, threads=None, mufu_limit=None, static_predictions=None)
    assert record["status"] == "failed" and "compiler exploded" in record["error"] and "timing" not in record


@pytest.mark.slow
def test_memory_probe_sees_eager_materialize_and_torch_backend_not():
    # nmt_train forward: the eager [B, T, S, A] tensor is 78 MiB in fp32.
    eager = memory.measure(CaseSpec("nmt_train", "fp32", "forward", "reference"), CPU)
    chunked = memory.measure(CaseSpec("nmt_train", "fp32", "forward", "torch"), CPU)
    assert eager["tanh_tensor_mib"] == pytest.approx(78.125)
    assert eager["outputs_mib"] == chunked["outputs_mib"] == pytest.approx(32 * 50 * 512 * 4 / 2**20)  # context
    assert eager["peak_extra_mib"] >= eager["tanh_tensor_mib"], eager
    assert 0 < chunked["peak_extra_mib"] < eager["peak_extra_mib"] / 4, (chunked, eager)
    # Freed heap memory is handed back before the measured call (malloc_trim), so the context the call returns is
    # always inside its peak (without it, the torch backend's peak once measured below its own outputs).
    assert "malloc_trim" in chunked["method"] and chunked["peak_extra_mib"] >= chunked["outputs_mib"], chunked


def test_static_prediction_is_labelled_and_tiny_is_not_in_it():
    predictions = roofline.load_static_predictions()  # the package's own copy: there without a checkout
    predicted = roofline.predicted_fraction(predictions, "long", "fp32", "forward")
    assert 0 < predicted["predicted_mufu_fraction"] <= 1 and "PREDICTION" in predicted["source"]
    assert roofline.predicted_fraction(predictions, "tiny", "fp32", "forward") is None
    assert roofline.predicted_fraction(predictions, "nmt_train", "fp32", "decode_step") is None


def test_static_predictions_are_the_bench_subset_of_a_full_report(tmp_path):
    """A full report given as the path is reduced to the bench's uses: forward without weights and backward, of the
    bench's shapes only; the combined forward_backward figure is the harmonic mean of the two passes."""
    def entry(fraction, *uses):
        return {"kernel": "k", "used_by": list(uses), "hot_loop": {"predicted_tanh_rate_fraction": fraction}}

    full = {"target": "sm_90", "triton": "9.9", "kernels": [
        {"kernel": "no_tanh_loop", "used_by": ["long/fp32"]},
        entry(0.8, "long/fp32", "nmt_fused/fp32"),
        entry(0.1, "long/fp32/weights"),
        entry(0.4, "long/fp32/backward"),
    ]}
    (tmp_path / "full.json").write_text(json.dumps(full))
    predictions = roofline.load_static_predictions(tmp_path / "full.json")
    assert predictions["predicted_tanh_rate_fraction"] == {"long/fp32": 0.8, "long/fp32/backward": 0.4}
    combined = roofline.predicted_fraction(predictions, "long", "fp32", "forward_backward")
    assert combined["predicted_mufu_fraction"] == pytest.approx(2 / (1 / 0.8 + 1 / 0.4))
    assert "Triton 9.9" in combined["source"]
    assert roofline.load_static_predictions(tmp_path / "missing.json") is None


def test_busy_note_counts_only_load_the_idle_cores_cannot_absorb():
    def note(load, cores, threads):
        return report._load_note({"load_average_1m_start": load, "device": "cpu", "cpu_count": cores,
                                  "threads": threads})

    assert "NOTE" in note(0.6, 2, 2)  # every core is the run's: any other runnable work competes
    assert "NOTE" not in note(0.9, 2, 1) and "NOTE" in note(1.2, 2, 1)
    assert "NOTE" not in note(3.0, 16, 4)
    assert "NOTE" not in note(0.3, 2, 2)


def test_targets_are_evaluated_per_case():
    def case(backend, median_s, peak_mib):
        return {"group": "caption/fp32/forward", "shape": "caption", "mode": "forward", "backend": backend,
                "sizes": {"T": 20}, "status": "ok", "timing": {"median_s": median_s},
                "memory": {"peak_extra_mib": peak_mib}}

    records = [case("reference", 1.0, 1000.0), case("compile", 0.5, 900.0), case("torch", 0.25, 30.0)]
    targets.annotate(records, "cpu")
    chunked = records[2]
    assert chunked["speedup_vs_eager"] == 4.0
    assert chunked["targets"]["forward >= 3x eager"]["met"] is True
    assert chunked["targets"]["not slower than compile(ref)"]["met"] is True
    assert chunked["targets"]["peak memory <= 1/50 of eager"]["met"] is False  # 30/1000 > 1/50
    assert records[0]["targets"] == {}

    # A single decoder step has no CPU target (its [B, 1, S, A] tensor is key_proj's size: nothing A-fold to save).
    steps = [dict(case("reference", 1.0, 10.0), group="caption/fp32/decode_step", mode="decode_step"),
             dict(case("torch", 2.0, 20.0), group="caption/fp32/decode_step", mode="decode_step")]
    targets.annotate(steps, "cpu")
    assert steps[1]["targets"] == {} and steps[1]["speedup_vs_eager"] == 0.5


def test_cli_options_parse():
    args = bench_parser().parse_args(["bench", "--full", "--device", "cpu", "--shape", "tiny", "--shape", "long",
                                      "--dtype", "fp32", "--backend", "torch", "--mode", "decode_step",
                                      "--no-model", "--no-memory", "--out-dir", "somewhere", "--threads", "1"])
    assert args.full and args.device == "cpu" and args.shape == ["tiny", "long"] and args.dtype == ["fp32"]
    assert args.backend == ["torch"] and args.mode == ["decode_step"] and args.no_model and args.no_memory
    assert args.out_dir == "somewhere" and args.threads == 1 and callable(args.handler)
    defaults = bench_parser().parse_args(["bench"])
    assert not defaults.full and defaults.out_dir == "runs/bench" and defaults.shape is None


def test_cli_handler_runs_and_returns_exit_codes(tmp_path, capsys):
    parser = bench_parser()
    args = parser.parse_args(["bench", "--device", "cpu", "--shape", "tiny", "--backend", "torch", "--mode",
                              "forward", "--no-model", "--no-memory", "--quiet", "--out-dir", str(tmp_path)])
    assert args.handler(args) == 0
    assert "tiny/fp32/forward" in capsys.readouterr().out
    assert sorted(path.suffix for path in tmp_path.iterdir()) == [".json", ".png"]
    if not torch.cuda.is_available():
        args = parser.parse_args(["bench", "--device", "cuda", "--no-model"])
        assert args.handler(args) == 2


def test_ragged_lengths_lie_in_the_upper_half():
    lengths = ragged.ragged_lengths(1000, 7, seed=3)
    assert lengths.dtype == torch.int64 and lengths.min() == 4 and lengths.max() == 7  # ceil(7 / 2) .. S


def test_ragged_rows_are_checked_then_timed_and_skip_decode_shapes():
    result = ragged.run_ragged_bench(["tiny", "tts_step"], "fp32", ["torch"], torch.device("cpu"), target_s=0.01)
    [row] = result["rows"]  # tts_step (T = 1) has no row
    assert row["shape"] == "tiny" and 0.5 <= row["visible_fraction"] <= 1.0
    for variant in ("full", "ragged"):
        assert row[variant]["status"] == "ok" and row[variant]["median_s"] > 0, row
        assert all(error < 1e-5 for error in row[variant]["errors"].values())
    assert row["saving"] == 1 - row["ragged"]["median_s"] / row["full"]["median_s"]
    assert "tiny" in report.ragged_table(result)


def test_a_ragged_variant_that_does_not_match_the_reference_is_failed_not_timed(monkeypatch):
    monkeypatch.setattr(ragged, "time_cpu", lambda *args, **kwargs: pytest.fail("a failed check must not be timed"))
    real_run = cases.PreparedCase.run

    def wrong(self):
        real_run(self)
        self.last_context = self.last_context + 1.0

    monkeypatch.setattr(cases.PreparedCase, "run", wrong)
    [row] = ragged.run_ragged_bench(["tiny"], "fp32", ["torch"], torch.device("cpu"), target_s=0.01)["rows"]
    assert row["full"]["status"] == row["ragged"]["status"] == "failed" and "saving" not in row
