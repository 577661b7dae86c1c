"""The targets of issues 6 and 13, evaluated per case and recorded in the JSON (reported, never asserted by tests).
Every figure compared with a threshold is a ratio computed from the run's own measurements (medians, peaks, the CPU
limit measured in the same process); the thresholds are the issues'.

CPU, torch backend:  at nmt_train, caption and long (the all-steps shapes the issue names), forward and
                     forward+backward: forward >= 3x eager, forward+backward >= 2x eager, peak extra memory
                     <= 1/50 of eager's, not slower than torch.compile(reference) after its compile. Single steps
                     (tts_step, decode_step) have no CPU target: their [B, 1, S, A] tensor is the size of key_proj,
                     so there is no A-fold memory to save, and they are reported against eager only.
GPU, Triton backend: forward >= 10x eager and >= 3x torch.compile(reference) and forward+backward >= 5x eager
                     at the all-steps shapes (T > 1); >= 70% of the MUFU limit at long; a decode step (the
                     decode_step mode, and the forward of a T = 1 shape) >= 3x eager; peak memory <= 1/50 of
                     eager's, as on CPU.
CPU, fused "cpu" backend (issue 13: "forward >= 4x today's torch backend figures as ratios to eager", "today" being
                     the day the issue was filed; `CPU_BACKEND_VS_EAGER`): forward >= 38.4x eager at nmt_train, >= 40x
                     at caption, >= 60x at long; forward+backward >= 11.4x eager at nmt_train, >= 15x at caption, >=
                     18x at long; peak extra memory no more than the torch backend's at those shapes and modes ("as
                     bounded as today"); the step through a prepared memory (prepared_step) >= 3x eager at tts_step
                     and at nmt_train's decode step (B=32, S=50, A=256, D=512: the NMT decode step); the forward at
                     long >= 50% of the measured CPU limit (tanh elements/s over the limit's elements/s at the same
                     thread count, `cpu_limit`). The 1-thread vs n-thread scaling is reported (`scaling`), not a
                     threshold.
A target whose figure is missing (a backend failed, memory or the CPU limit not measured) is recorded with
"met": null.
"""
from __future__ import annotations

ALL_STEPS_TARGET_SHAPES = ("nmt_train", "caption", "long")
#: Issue 13, fused CPU backend: (mode, shape) -> least speed-up against eager. The issue asks for 4x (forward) and
#: 3x (forward+backward) "today's torch backend figures as ratios to eager": fixed figures of the day it was filed,
#: not the torch backend's case of each run (whose own median moved 2x between runs on this shared VM, e.g. caption
#: forward 74 and 33 ms on 2026-11-29). The issue wrote them out for caption and long (40x, 60x; 15x, 18x); for
#: nmt_train they are 4x and 3x the torch backend's speed-ups in that day's committed run
#: (benchmarks/results/cpu-full-20261125T032042Z.json: 9.6x forward, 3.8x forward+backward).
TORCH_BACKEND_ON_ISSUE_DAY = {("forward", "nmt_train"): 9.6, ("forward_backward", "nmt_train"): 3.8}
CPU_BACKEND_VS_EAGER = {("forward", "nmt_train"): round(4 * TORCH_BACKEND_ON_ISSUE_DAY["forward", "nmt_train"], 1),
                        ("forward", "caption"): 40, ("forward", "long"): 60,
                        ("forward_backward", "nmt_train"): round(
                            3 * TORCH_BACKEND_ON_ISSUE_DAY["forward_backward", "nmt_train"], 1),
                        ("forward_backward", "caption"): 15, ("forward_backward", "long"): 18}
#: The decode-step shapes of issue 13 (tts_step's own T = 1, and nmt_train's decode step) and their least speed-up.
CPU_BACKEND_STEP_SHAPES = ("tts_step", "nmt_train")
CPU_BACKEND_STEP_VS_EAGER = 3
#: The forward at long: least fraction of the measured CPU limit.
CPU_BACKEND_LIMIT_FRACTION = 0.5


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
    return (case.get("memory") or {}).get("peak_extra_mib")


def cpu_backend_targets(case: dict, group: dict[str, dict]) -> dict:
    """Issue 13's targets of one case of the fused "cpu" backend (see the module docstring)."""
    shape, mode = case["shape"], case["mode"]
    eager, chunked = group.get("reference"), group.get("torch")
    speedup = ratio(_median(eager), _median(case))
    targets = {}
    if (mode, shape) in CPU_BACKEND_VS_EAGER:
        least_eager = CPU_BACKEND_VS_EAGER[mode, shape]
        name = "forward" if mode == "forward" else "forward+backward"
        targets[f"{name} >= {least_eager:g}x eager"] = _target(f">= {least_eager:g}", speedup,
                                                               lambda x: x >= least_eager)
        targets["peak memory <= torch backend's"] = _target("<= 1", ratio(_peak(case), _peak(chunked)),
                                                            lambda x: x <= 1)
    if mode == "prepared_step" and shape in CPU_BACKEND_STEP_SHAPES:
        targets[f"prepared step >= {CPU_BACKEND_STEP_VS_EAGER}x eager"] = _target(
            f">= {CPU_BACKEND_STEP_VS_EAGER}", speedup, lambda x: x >= CPU_BACKEND_STEP_VS_EAGER)
    if shape == "long" and mode == "forward":
        fraction = (case.get("throughput") or {}).get("cpu_limit_fraction")
        targets[f">= {CPU_BACKEND_LIMIT_FRACTION:.0%} of CPU limit"] = _target(
            f">= {CPU_BACKEND_LIMIT_FRACTION}", fraction, lambda x: x >= CPU_BACKEND_LIMIT_FRACTION)
    return targets


def case_targets(case: dict, group: dict[str, dict], device_type: str) -> dict:
    """Targets of one case given the other backends' cases of its group (backend -> case dict)."""
    eager, compiled = group.get("reference"), group.get("compile")
    shape, mode = case["shape"], case["mode"]
    speedup = ratio(_median(eager), _median(case))
    memory_share = ratio(_peak(case), _peak(eager))
    targets = {}
    if device_type == "cpu" and case["backend"] == "cpu":
        targets.update(cpu_backend_targets(case, group))
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
        single_step = mode in ("decode_step", "prepared_step") or case["sizes"]["T"] == 1
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
