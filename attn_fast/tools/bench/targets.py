"""The targets of issue 6, evaluated per case and recorded in the JSON (reported, never asserted by tests).

CPU, torch backend:  at nmt_train, caption and long (the all-steps shapes the issue names), forward and
                     forward+backward: forward >= 3x eager, forward+backward >= 2x eager, peak extra memory
                     <= 1/50 of eager's, not slower than torch.compile(reference) after its compile. Single steps
                     (tts_step, decode_step) have no CPU target: their [B, 1, S, A] tensor is the size of key_proj,
                     so there is no A-fold memory to save, and they are reported against eager only.
GPU, Triton backend: forward >= 10x eager and >= 3x torch.compile(reference) and forward+backward >= 5x eager
                     at the all-steps shapes (T > 1); >= 70% of the MUFU limit at long; a decode step (the
                     decode_step mode, and the forward of a T = 1 shape) >= 3x eager; peak memory <= 1/50 of
                     eager's, as on CPU.
A target whose figure is missing (a backend failed, memory not measured) is recorded with "met": null.
"""
from __future__ import annotations

ALL_STEPS_TARGET_SHAPES = ("nmt_train", "caption", "long")


def _target(wanted: str, value: float | None, met) -> dict:
    return {"wanted": wanted, "value": value, "met": None if value is None else bool(met(value))}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _median(case: dict | None) -> float | None:
    if case is None or case.get("status") != "ok":
        return None
    return case.get("timing", {}).get("median_s")


def _peak(case: dict | None) -> float | None:
    if case is None:
        return None
    return case.get("memory", {}).get("peak_extra_mib")


def case_targets(case: dict, group: dict[str, dict], device_type: str) -> dict:
    """Targets of one case given the other backends' cases of its group (backend -> case dict)."""
    eager, compiled = group.get("reference"), group.get("compile")
    shape, mode = case["shape"], case["mode"]
    speedup = ratio(_median(eager), _median(case))
    memory_share = ratio(_peak(case), _peak(eager))
    targets = {}
    if (device_type == "cpu" and case["backend"] == "torch" and shape in ALL_STEPS_TARGET_SHAPES
            and mode in ("forward", "forward_backward")):
        if mode == "forward":
            targets["forward >= 3x eager"] = _target(">= 3", speedup, lambda x: x >= 3)
        else:
            targets["forward+backward >= 2x eager"] = _target(">= 2", speedup, lambda x: x >= 2)
        if compiled is not None:
            targets["not slower than compile(ref)"] = _target(
                ">= 1", ratio(_median(compiled), _median(case)), lambda x: x >= 1)
        targets["peak memory <= 1/50 of eager"] = _target("<= 0.02", memory_share, lambda x: x <= 0.02)
    if device_type == "cuda" and case["backend"] == "triton":
        single_step = mode == "decode_step" or case["sizes"]["T"] == 1
        if single_step:
            targets["decode step >= 3x eager"] = _target(">= 3", speedup, lambda x: x >= 3)
        elif mode == "forward":
            targets["forward >= 10x eager"] = _target(">= 10", speedup, lambda x: x >= 10)
            if compiled is not None:
                targets["forward >= 3x compile(ref)"] = _target(
                    ">= 3", ratio(_median(compiled), _median(case)), lambda x: x >= 3)
        elif mode == "forward_backward":
            targets["forward+backward >= 5x eager"] = _target(">= 5", speedup, lambda x: x >= 5)
        if shape == "long" and mode in ("forward", "forward_backward"):
            fraction = case.get("roofline", {}).get("mufu_fraction")
            targets[">= 70% of MUFU limit"] = _target(">= 0.7", fraction, lambda x: x >= 0.7)
        targets["peak memory <= 1/50 of eager"] = _target("<= 0.02", memory_share, lambda x: x <= 0.02)
    return targets


def annotate(cases: list[dict], device_type: str) -> None:
    """Add "speedup_vs_eager", "memory_saved_vs_eager" (eager's peak / this case's) and "targets" to every case."""
    groups: dict[str, dict[str, dict]] = {}
    for case in cases:
        groups.setdefault(case["group"], {})[case["backend"]] = case
    for case in cases:
        group = groups[case["group"]]
        eager = group.get("reference")
        case["speedup_vs_eager"] = ratio(_median(eager), _median(case))
        case["memory_saved_vs_eager"] = ratio(_peak(eager), _peak(case))
        case["targets"] = case_targets(case, group, device_type)
