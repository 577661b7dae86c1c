"""Roofline of the tanh work: achieved tanh/s as a fraction of the GPU's MUFU limit (16 ops/clk/SM on Hopper).

    % of MUFU limit = tanh evaluations / seconds / (16 x SM count x SM clock)

Tanh evaluations per call (docs/DESIGN.md, "The operation"): forward and decode step B*T*S*A; forward + backward
2*B*T*S*A (the backward recomputes the tanh once, it does not store it). Measured for Triton cases on a GPU. On
CPU (no GPU to measure) the static sm_90 report's *predicted* fraction is shown instead: the issue-slot model's
figure for the kernel configuration the launcher plans for that shape and dtype — a prediction from compiled SASS,
never a measurement. The bench reads those figures from the package's own copy, `static_sm90_predictions.json`
next to this module (package data, so that an installed wheel has them without a checkout), which `python -m
benchmarks.static_report` writes along with its full report (benchmarks/results/static_sm90.json).
"""
from __future__ import annotations

import importlib.resources
import json
import pathlib

import torch

from attn_fast.tools.bench.cases import CaseSpec
from attn_fast.tools.bench.shapes import SHAPES

MUFU_OPS_PER_CLOCK_PER_SM = 16
#: The static predictions shipped with the package (written by `python -m benchmarks.static_report`).
STATIC_PREDICTIONS_FILE = "static_sm90_predictions.json"


def tanh_evaluations(spec: CaseSpec) -> int:
    """Tanh evaluations one call of the case needs (forward + backward: the forward's and the backward's pass)."""
    passes = 2 if spec.mode == "forward_backward" else 1
    return passes * spec.problem.tanh_elements


def visible_tanh_evaluations(spec: CaseSpec, key_lengths: torch.Tensor | None) -> int:
    """Tanh evaluations at visible keys only (key_lengths [B], or every key without them): the work left to a
    kernel that skips padded keys, as the cpu backend's kernels do. CPU elements/s count these: counting padded
    keys too (the bench's lengths are uniform in 1..S, about half of them) would credit a skipping kernel with
    twice the work it does, and its fraction of the CPU limit could pass 100%."""
    passes = 2 if spec.mode == "forward_backward" else 1
    problem = spec.problem
    if key_lengths is None:
        visible_keys = problem.batch * problem.src_len
    else:
        visible_keys = int(key_lengths.clamp(0, problem.src_len).sum())
    return passes * problem.tgt_len * visible_keys * problem.attn_dim


def gpu_mufu_limit(device: torch.device) -> dict:
    """{"sm_count", "sm_clock_hz", "tanh_per_s"} of the GPU (the maximum SM clock, as the driver reports it), or
    {"error"} when the clock cannot be read."""
    properties = torch.cuda.get_device_properties(device)
    sm_count = properties.multi_processor_count
    try:
        import triton

        driver_properties = triton.runtime.driver.active.utils.get_device_properties(
            device.index if device.index is not None else torch.cuda.current_device())
        clock_hz = driver_properties["sm_clock_rate"] * 1e3  # reported in kHz
    except Exception as error:  # an older or different driver interface
        return {"sm_count": sm_count, "error": f"SM clock unknown ({type(error).__name__}: {error})"}
    return {"sm_count": sm_count, "sm_clock_hz": clock_hz,
            "tanh_per_s": MUFU_OPS_PER_CLOCK_PER_SM * sm_count * clock_hz}


def measured_fraction(spec: CaseSpec, median_s: float, limit: dict) -> float | None:
    """Achieved tanh/s over the MUFU limit, for one timed call."""
    if "tanh_per_s" not in limit or median_s <= 0:
        return None
    return tanh_evaluations(spec) / median_s / limit["tanh_per_s"]


def static_predictions(report: dict) -> dict:
    """The bench's subset of a full static report (the JSON of benchmarks/static_report.py): for the tanh kernel of
    every bench shape and dtype, forward (weights not asked for, as the bench calls it) and backward, the predicted
    fraction of 16 tanh/clk/SM inside one SM (the hot loop's issue model) and, where the report has it, the
    whole-GPU ceiling (that x the grid's efficiency: idle SMs, partial waves, padding; kernels/occupancy.py).

    Returns {"target", "triton", "model", "predicted_tanh_rate_fraction": {use: per-SM fraction},
    "predicted_whole_gpu_fraction": {use: whole-GPU ceiling}}, use "shape/dtype" for the forward's score kernel and
    "shape/dtype/backward" for the backward's tanh pass; shapes outside the bench's table (the report-only
    additions) are left out."""
    fractions, whole_gpu = {}, {}
    for entry in report.get("kernels", []):
        if "hot_loop" not in entry:
            continue
        for use in entry["used_by"]:
            if use.endswith("/weights") or use.split("/")[0] not in SHAPES:
                continue
            fractions.setdefault(use, entry["hot_loop"]["predicted_tanh_rate_fraction"])
            if use in entry.get("whole_gpu", {}):
                whole_gpu.setdefault(use, entry["whole_gpu"][use]["ceiling"])
    return {"target": report.get("target", "sm_90"), "triton": report.get("triton"), "model": report.get("model"),
            "predicted_tanh_rate_fraction": fractions, "predicted_whole_gpu_fraction": whole_gpu}


def load_static_predictions(path: pathlib.Path | str | None = None) -> dict | None:
    """The `static_predictions` dict: from `path` (a predictions file, or a full report, which is reduced to its
    predictions), else the package's own copy. None when `path` does not exist."""
    if path is None:
        text = importlib.resources.files(__package__).joinpath(STATIC_PREDICTIONS_FILE).read_text(encoding="utf-8")
        return json.loads(text)
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    loaded = json.loads(path.read_text(encoding="utf-8"))
    return static_predictions(loaded) if "kernels" in loaded else loaded


def predicted_fraction(predictions: dict | None, shape_name: str, dtype_name: str, mode: str) -> dict | None:
    """The predicted fraction of the MUFU limit (tanh rate; the whole-GPU ceiling when the predictions have it) of
    the score kernel the forward plans for (shape, dtype), and for forward_backward the tanh-weighted mean with the
    backward kernel's figure; `predictions` as `load_static_predictions` returns them. None when they do not cover
    the shape (e.g. `tiny`) or the mode: the report compiles each named shape as it is, so a decode step of an
    all-steps shape (T = 1 instead of T) is not in it; tts_step's forward, which is a decode step, is."""
    if predictions is None or mode == "decode_step":
        return None
    # The whole-GPU ceiling where the predictions have it (what a measurement on the whole GPU compares with),
    # else the per-SM figure.
    fractions = {**predictions["predicted_tanh_rate_fraction"], **predictions.get("predicted_whole_gpu_fraction", {})}
    scope = "whole-GPU ceiling" if predictions.get("predicted_whole_gpu_fraction") else "per-SM"
    forward = fractions.get(f"{shape_name}/{dtype_name}")
    if forward is None:
        return None
    if mode == "forward_backward":
        backward = fractions.get(f"{shape_name}/{dtype_name}/backward")
        if backward is None:
            return None
        # Equal tanh counts in both passes: time adds up, so the combined rate is the harmonic mean.
        fraction = 2 / (1 / forward + 1 / backward)
    else:
        fraction = forward
    return {"predicted_mufu_fraction": fraction,
            "source": f"static sm_{predictions.get('target', 'sm_90').removeprefix('sm_')} issue model, {scope} "
                      f"(Triton {predictions.get('triton') or '?'}): a PREDICTION, not a measurement"}
