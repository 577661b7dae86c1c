"""Roofline of the tanh work: achieved tanh/s as a fraction of the GPU's MUFU limit (16 ops/clk/SM on Hopper).

    % of MUFU limit = tanh evaluations / seconds / (16 x SM count x SM clock)

Tanh evaluations per call (DESIGN.md): forward and decode step B*T*S*A; forward + backward 2*B*T*S*A (the
backward recomputes the tanh once, it does not store it). Measured for Triton cases on a GPU. On CPU (no GPU to
measure) the static sm_90 report's *predicted* fraction is shown instead (benchmarks/results/static_sm90.json,
made by `python -m benchmarks.static_report`): the issue-slot model's figure for the kernel configuration the
launcher plans for that shape and dtype — a prediction from compiled SASS, never a measurement.
"""
from __future__ import annotations

import json
import pathlib

import torch

from attn_fast.tools.bench.cases import CaseSpec

MUFU_OPS_PER_CLOCK_PER_SM = 16
#: Where `python -m benchmarks.static_report` writes its report, in a source checkout.
STATIC_REPORT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "static_sm90.json"


def tanh_evaluations(spec: CaseSpec) -> int:
    """Tanh evaluations one call of the case needs (forward + backward: the forward's and the backward's pass)."""
    passes = 2 if spec.mode == "forward_backward" else 1
    return passes * spec.problem.tanh_elements


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


def load_static_report(path: pathlib.Path | str | None = None) -> dict | None:
    path = pathlib.Path(path) if path is not None else STATIC_REPORT
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def predicted_fraction(report: dict | None, shape_name: str, dtype_name: str, mode: str) -> dict | None:
    """The static report's predicted fraction of the MUFU limit (tanh rate) for the score kernel the forward plans
    for (shape, dtype), and for forward_backward the tanh-weighted mean with the backward kernel's figure.
    None when the report does not cover the shape (e.g. `tiny`) or the mode: the report compiles each named
    shape as it is, so a decode step of an all-steps shape (T = 1 instead of T) is not in it; tts_step's forward,
    which is a decode step, is."""
    if report is None or mode == "decode_step":
        return None

    def kernel_fraction(use: str) -> float | None:
        for entry in report.get("kernels", []):
            if "hot_loop" in entry and use in entry.get("used_by", []):
                return entry["hot_loop"]["predicted_tanh_rate_fraction"]
        return None

    forward = kernel_fraction(f"{shape_name}/{dtype_name}")
    if forward is None:
        return None
    if mode == "forward_backward":
        backward = kernel_fraction(f"{shape_name}/{dtype_name}/backward")
        if backward is None:
            return None
        # Equal tanh counts in both passes: time adds up, so the combined rate is the harmonic mean.
        fraction = 2 / (1 / forward + 1 / backward)
    else:
        fraction = forward
    return {"predicted_mufu_fraction": fraction,
            "source": f"static sm_{report.get('target', 'sm_90').removeprefix('sm_')} issue model "
                      f"(Triton {report.get('triton', '?')}): a PREDICTION, not a measurement"}
