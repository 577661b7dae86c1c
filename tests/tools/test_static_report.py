"""The static sm_90 report (benchmarks/static_report.py): compiles the forward's default configurations offline
(no GPU needed) and checks what the design relies on: no register spills, exactly one MUFU op per tanh element in
the hot loop (plus, for the factorized fp32 tanh, the per-row exponentials), and few enough instructions per tanh
for the loop to be bound by the special-function unit in Hopper's issue model. Also: the report takes its shapes from
the bench's table, and the predictions shipped as package data are the bench's subset of the saved report."""
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
    """The report for the fused all-steps shape in fp32 and fp16, built in a process without TRITON_INTERPRET
    (kernels decorated under the interpreter cannot be compiled). A partial run: it must leave the package's
    predictions alone."""
    output = tmp_path_factory.mktemp("static") / "report.json"
    shipped = static_report.PACKAGE_PREDICTIONS.read_bytes()
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "benchmarks.static_report", "--shapes", "nmt_fused", "--dtypes", "fp32", "fp16",
               "--output", str(output)]
    finished = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "hot loop" in finished.stdout
    assert f"not written: {static_report.PACKAGE_PREDICTIONS}" in finished.stdout
    assert static_report.PACKAGE_PREDICTIONS.read_bytes() == shipped
    return json.loads(output.read_text())


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


def score_kernels(report, dtype_name):
    return [entry for entry in report["kernels"] if entry["kernel"] == "_attention_forward_kernel"
            and any(use.startswith(f"nmt_fused/{dtype_name}") for use in entry["used_by"])]


@pytest.mark.slow
def test_every_kernel_compiles_without_spills(report):
    assert report["target"] == "sm_90"
    names = {entry["kernel"] for entry in report["kernels"]}
    assert {"_score_vector_kernel", "_attention_forward_kernel", "_context_from_scores_kernel"} <= names
    for entry in report["kernels"]:
        assert entry["stack_bytes"] == 0, entry
        assert entry["registers"] <= 255


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
        assert loop["instructions_per_tanh"] <= 8.0  # MUFU-bound in the issue model
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
        assert loop["instructions_per_tanh"] <= 8.0
        assert loop["predicted_mufu_limit_fraction"] == 1.0


@pytest.mark.slow
def test_backward_recomputes_one_tanh_per_element_at_the_mufu_bound(report):
    """The fused backward: one MUFU op per (i, j, a) element (1 - t^2 from t with an FMA, no second MUFU op),
    reductions kept in registers (no SHFL), <= 8 instructions per tanh, no spills — for fp32 and fp16."""
    entries = [entry for entry in report["kernels"] if entry["kernel"] == "_attention_backward_kernel"]
    assert {use.split("/")[1] for entry in entries for use in entry["used_by"]} == {"fp32", "fp16"}
    for entry in entries:
        loop = entry["hot_loop"]
        assert entry["stack_bytes"] == 0, entry
        assert loop["element_ops_per_element"] == 1.0
        assert loop["mufu_per_element"] <= 1.0 + 1.0 / 16  # plus e^{2q} once per query row in fp32
        assert loop["shfl"] == 0 and loop["local_memory_instructions"] == 0
        assert loop["instructions_per_tanh"] <= 8.0
