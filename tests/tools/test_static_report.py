"""The static sm_90 / sm_80 report (benchmarks/static_report.py): compiles the forward's default configurations
offline (no GPU needed) and checks what the design relies on: no register spills on sm_90 and sm_80, exactly one MUFU
op per tanh element in the hot loop (plus, for the factorized fp32 tanh, the per-row exponentials), and the design's
instruction budgets (forward <= 4.5 per tanh at the all-steps shapes, backward <= 8.6; DESIGN.md, "Performance you
can check without a GPU"). The committed reports must hold every launch the planners make today (`--check`) and
show issue 12's whole-GPU ceilings. Also: the report takes its shapes from the bench's table, and the predictions
shipped as package data are the bench's subset of the saved report."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from attn_fast.tools.bench import roofline, shapes  # noqa: E402
from benchmarks import static_report  # noqa: E402

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report for the fused all-steps shape in fp32, fp16 and bf16 for sm_90 and sm_80, built in a process
    without TRITON_INTERPRET (kernels decorated under the interpreter cannot be compiled). A partial run: it must
    leave the package's predictions alone."""
    output = tmp_path_factory.mktemp("static") / "report.json"
    shipped = static_report.PACKAGE_PREDICTIONS.read_bytes()
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "benchmarks.static_report", "--shapes", "nmt_fused", "--dtypes", "fp32", "fp16",
               "bf16", "--output", str(output)]
    finished = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "hot loop" in finished.stdout
    assert f"not written: {static_report.PACKAGE_PREDICTIONS}" in finished.stdout
    assert static_report.PACKAGE_PREDICTIONS.read_bytes() == shipped
    report = json.loads(output.read_text())  # sm_90, with the sm_80 report (written next to it) under "sm_80"
    report["sm_80"] = json.loads(static_report.output_for(output, 80).read_text())
    return report


def test_report_shapes_are_the_bench_table_plus_named_additions():
    for name, shape in shapes.NAMED_SHAPES.items():
        assert static_report.SHAPES[name] is shape
    assert not set(static_report.REPORT_ONLY_SHAPES) & set(shapes.SHAPES)
    assert list(static_report.SHAPES) == [*shapes.NAMED_SHAPES, *static_report.REPORT_ONLY_SHAPES]


def test_shipped_predictions_are_the_bench_subset_of_the_saved_report():
    """attn_fast/tools/bench/static_sm90_predictions.json (package data) must come from the committed full report:
    both are written by one run of the script (or the predictions by `--write-predictions` from the report)."""
    saved = json.loads(static_report.DEFAULT_OUTPUT.read_text())
    assert roofline.load_static_predictions() == roofline.static_predictions(saved)
    for name in shapes.NAMED_SHAPES:
        assert f"{name}/fp32" in roofline.load_static_predictions()["predicted_tanh_rate_fraction"]


#: Design targets (DESIGN.md, "Performance you can check without a GPU"; issue 12): instructions per tanh in the hot
#: loop of the forward at the all-steps shapes and of the backward.
FORWARD_INSTRUCTIONS_PER_TANH = 4.5
BACKWARD_INSTRUCTIONS_PER_TANH = 8.6
#: Whole-GPU ceilings (fraction of the MUFU limit, sm_90) issue 12 asks the committed report to show.
WHOLE_GPU_TARGETS = {"caption/fp16": 0.60, "caption/bf16": 0.60, "caption/fp32": 0.60,
                     "long/fp32": 0.80, "long/fp16": 0.80, "long/bf16": 0.80,
                     "long/fp32/backward": 0.70, "long/fp16/backward": 0.70, "long/bf16/backward": 0.70}
#: All-steps shapes (T > DECODE_MAX_TGT_LEN) of the report.
ALL_STEPS = ("nmt_train", "caption", "long", "nmt_fused", "mid", "long_prepared")


def committed(arch):
    return json.loads(static_report.output_for(static_report.DEFAULT_OUTPUT, arch).read_text())


def tanh_uses(report):
    """(use, entry) for every use of a tanh kernel in a report."""
    return [(use, entry) for entry in report["kernels"] if "hot_loop" in entry for use in entry["used_by"]]


def test_committed_reports_hold_every_planned_launch():
    """Every launch the planners make today for the report's shapes and dtypes, planned for each target's SM count,
    is in the committed sm_90 and sm_80 reports with its own specialization (bf16 and fp16 apart)."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    finished = subprocess.run([sys.executable, "-m", "benchmarks.static_report", "--check"], cwd=REPOSITORY,
                              env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for arch in static_report.ARCHS:
        assert committed(arch)["target"] == f"sm_{arch}"
        assert set(committed(arch)["shapes"]) == set(static_report.SHAPES)


@pytest.mark.parametrize("arch", static_report.ARCHS)
def test_committed_reports_have_no_spills(arch):
    """No stack frame in any compiled launch on sm_90 or sm_80 (issue 12 item 4), so no local-memory traffic."""
    for entry in committed(arch)["kernels"]:
        assert entry["stack_bytes"] == 0, (entry["kernel"], entry["num_warps"], entry["constexprs"],
                                           entry["used_by"])
        if "hot_loop" in entry:
            assert entry["hot_loop"]["local_memory_instructions"] == 0, entry["used_by"]


def test_committed_report_meets_the_instruction_budgets():
    """sm_90: the issue model is Hopper's (sm_80 compiles are checked for spills, not instruction counts)."""
    for use, entry in tanh_uses(committed(90)):
        loop = entry["hot_loop"]
        assert loop["local_memory_instructions"] == 0, use
        if use.endswith("/backward"):
            assert loop["instructions_per_tanh"] <= BACKWARD_INSTRUCTIONS_PER_TANH, use
        elif use.split("/")[0] in ALL_STEPS:
            assert loop["instructions_per_tanh"] <= FORWARD_INSTRUCTIONS_PER_TANH, (use, loop["instructions_per_tanh"])


def test_committed_report_shows_the_whole_gpu_ceilings():
    """Every tanh-kernel use has its whole-GPU model, and the ceilings meet issue 12's targets (sm_90)."""
    report = committed(90)
    ceilings = {}
    for use, entry in tanh_uses(report):
        model = entry["whole_gpu"][use]
        assert 0 < model["ceiling"] <= entry["hot_loop"]["predicted_tanh_rate_fraction"]
        assert model["ceiling"] == pytest.approx(entry["hot_loop"]["predicted_tanh_rate_fraction"] * model["fill"]
                                                 * model["padding"], abs=2e-3)
        ceilings[use] = model["ceiling"]
    for use, target in WHOLE_GPU_TARGETS.items():
        assert ceilings[use] >= target, (use, ceilings[use])


def test_caption_fp32_reaches_its_ceiling_with_prepared_keys():
    """caption (T = 20) fp32: the 8-row tiles that pad T least (24 rows, not 32) cost 1.16 MUFU ops per tanh when
    they compute e^{2k} per query tile; with the key pre-pass (kernels/configs.py PREPARED_TILES) they take one.
    The committed report's caption/fp32 launch is the prepared one, at one MUFU op per tanh."""
    entries = [entry for use, entry in tanh_uses(committed(90)) if use == "caption/fp32"]
    assert [entry["kernel"] for entry in entries] == [static_report.PREPARED_SCORE_KERNEL]
    (entry,) = entries
    assert entry["constexprs"]["BLOCK_T"] == 8 and entry["hot_loop"]["mufu_per_element"] == 1.0


def score_kernels(report, dtype_name):
    return [entry for entry in report["kernels"] if entry["kernel"] == "_attention_forward_kernel"
            and any(use.startswith(f"nmt_fused/{dtype_name}") for use in entry["used_by"])]


@pytest.mark.slow
def test_every_kernel_compiles_without_spills(report):
    assert report["target"] == "sm_90" and report["sm_80"]["target"] == "sm_80"
    for target in (report, report["sm_80"]):
        names = {entry["kernel"] for entry in target["kernels"]}
        assert {"_score_vector_kernel", "_attention_forward_kernel", "_context_from_scores_kernel",
                "_combine_splits_kernel", "_attention_backward_kernel"} <= names
        for entry in target["kernels"]:
            assert entry["stack_bytes"] == 0, entry
            assert entry["registers"] <= 255


@pytest.mark.slow
def test_bf16_is_compiled_apart_from_fp16(report):
    """The dedup key holds the pointer dtypes: bf16 launches are compiled, not borrowed from fp16's entries."""
    for target in (report, report["sm_80"]):
        for entry in target["kernels"]:
            dtypes = {use.split("/")[1] for use in entry["used_by"]}
            pointers = {kind for kind in entry["signature"]["types"].values() if kind.startswith("*")}
            assert not ({"fp16", "bf16"} <= dtypes), entry["used_by"]
            if "bf16" in dtypes and entry["kernel"] != "_combine_splits_kernel":
                assert "*bf16" in pointers, entry


@pytest.mark.slow
def test_fp32_default_is_factorized_with_one_reciprocal_per_tanh(report):
    kernels = score_kernels(report, "fp32")
    assert len(kernels) == 2  # fused context, and scores for need_weights
    for entry in kernels:
        constants, loop = entry["constexprs"], entry["hot_loop"]
        assert constants["TANH_FORM"] == "factorized"
        assert loop["element_op"] == "MUFU.RCP" and loop["element_ops_per_element"] == 1.0
        # The only other MUFU ops: e^{2q} and e^{2k}, once per query row and key row of the tile.
        rows_share = (constants["BLOCK_T"] + constants["BLOCK_S"]) / (constants["BLOCK_T"] * constants["BLOCK_S"])
        assert loop["mufu_per_element"] == pytest.approx(1.0 + rows_share)
        assert loop["instructions_per_tanh"] <= FORWARD_INSTRUCTIONS_PER_TANH
        assert loop["local_memory_instructions"] == 0
        assert loop["shfl"] <= 0.25 * loop["elements_per_thread"]  # the A-reduction itself needs none
        assert loop["fallback_instructions_per_tanh"] is not None  # saturated inputs have their own path


@pytest.mark.slow
def test_fp16_default_is_one_tanh_approx_per_element(report):
    for entry in score_kernels(report, "fp16"):
        loop = entry["hot_loop"]
        assert entry["constexprs"]["TANH_FORM"] == "approx"
        assert loop["element_op"] == "MUFU.TANH"
        assert loop["element_ops_per_element"] == 1.0 and loop["mufu_per_element"] == 1.0
        assert loop["shfl"] == 0  # A-major tiles: the reduction over A stays in registers
        assert loop["instructions_per_tanh"] <= FORWARD_INSTRUCTIONS_PER_TANH
        assert loop["predicted_mufu_limit_fraction"] == 1.0


@pytest.mark.slow
def test_backward_recomputes_one_tanh_per_element_at_the_mufu_bound(report):
    """The fused backward: one MUFU op per (i, j, a) element (1 - t^2 from t with an FMA, no second MUFU op),
    reductions kept in registers (no SHFL), <= 8 instructions per tanh, no spills — for fp32 and fp16."""
    entries = [entry for entry in report["kernels"] if entry["kernel"] == "_attention_backward_kernel"]
    assert {use.split("/")[1] for entry in entries for use in entry["used_by"]} == {"fp32", "fp16", "bf16"}
    for entry in entries:
        loop = entry["hot_loop"]
        assert entry["stack_bytes"] == 0, entry
        assert loop["element_ops_per_element"] == 1.0
        assert loop["mufu_per_element"] <= 1.0 + 1.0 / 16  # plus e^{2q} once per query row in fp32
        assert loop["shfl"] == 0 and loop["local_memory_instructions"] == 0
        assert loop["instructions_per_tanh"] <= 8.0
