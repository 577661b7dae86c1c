"""`run_bench`: every selected case (checked, then timed, then its memory measured), the model bench, the
roofline, the targets; then the table, the JSON and the PNG.

Quick (default), chosen to finish in about a minute on a quiet 2-core CPU:
    CPU  shapes nmt_train and tts_step, fp32; forward, forward+backward, decode step and the step through a
         prepared memory; eager reference, torch.compile(reference), the torch backend and the fused "cpu"
         backend (when numba imports); peak memory of eager and the fast backends for nmt_train's forward and
         forward+backward (a fresh process each); the Seq2Seq model at the date-task size ("date") with both
         decoders and every layer backend.
    GPU  all four named shapes, fp32, every mode and backend (Triton included), memory for every case; model
         at the date-task size.
--full adds: caption and long (CPU), fp16 and bf16 (GPU), memory for every case (CPU, compile included), the
model at NMT size ("nmt": embed 256, hidden 512, attention 256, vocabulary 8,000, S = T = 50), longer timing
(about 2 s of samples per case instead of 0.5 s) and, on CPU, the thread-scaling section (`scaling`).

On CPU the run first measures the CPU limit of the factorized tanh's per-element arithmetic (`cpu_limit`, with 1
thread and with the run's threads) in this process; every CPU row then reports its tanh elements/s and their
fraction of that limit at the row's thread count.

Like any multiprocessing code (the CPU memory probes fork from a forkserver), a script that calls `run_bench`
needs the `if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import datetime
import gc
import os
import pathlib
import platform
import sys
import time

import torch
from tqdm.auto import tqdm

from attn_fast.cpu_warmup import warm_cpu_math
from attn_fast.tools.bench import cpu_limit, framework_bench, model_bench, ragged, report, roofline, scaling, targets
from attn_fast.tools.bench import memory as memory_module
from attn_fast.tools.bench.cases import (
    MODES,
    CaseSpec,
    PreparedCase,
    backends_for,
    case_specs,
    check_case,
    skipped_backends,
)
from attn_fast.tools.bench.shapes import get_shape
from attn_fast.tools.bench.timing import input_sets_for_l2, time_cpu, time_cuda

QUICK_SHAPES = {"cpu": ("nmt_train", "tts_step"), "cuda": ("nmt_train", "tts_step", "caption", "long")}
FULL_SHAPES = ("nmt_train", "tts_step", "caption", "long")
QUICK_DTYPES = {"cpu": ("fp32",), "cuda": ("fp32",)}
FULL_DTYPES = {"cpu": ("fp32",), "cuda": ("fp32", "fp16", "bf16")}
DEFAULT_OUT_DIR = pathlib.Path("runs") / "bench"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_average() -> float | None:
    """The 1-minute load average. Other processes make CPU timings noisy (on a 2-core machine shared with other
    work, a multithreaded call can run ten times slower: each of its parallel regions waits for a descheduled
    thread), so the load is recorded with the numbers."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict:
    """Where the numbers come from: host, CPU, device, versions and threads."""
    cpu_name = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_name, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "device": str(device),
            "device_name": cpu_name, "load_average_1m_end": load_average()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=properties.name, sm_count=properties.multi_processor_count,
                    gpu_memory_gib=properties.total_memory / 2**30, cuda=torch.version.cuda)
    return info


def wants_memory(spec: CaseSpec, full: bool, device: torch.device, first_shape: str) -> bool:
    """Which cases get a memory measurement: all in --full or on GPU (it is cheap there); in the quick CPU run,
    eager and the fast backends at the first shape's forward and forward+backward (a fresh process per case costs
    seconds)."""
    if full or device.type == "cuda":
        return True
    return (spec.shape_name == first_shape and spec.mode in ("forward", "forward_backward")
            and spec.backend != "compile")


def run_case(spec: CaseSpec, device: torch.device, *, target_s: float, measure_memory: bool, seed: int,
             threads: int | None, mufu_limit: dict | None, static_predictions: dict | None,
             cpu_limit_result: dict | None = None) -> dict:
    """One case: build, check against the float64 reference, and only if correct: time, roofline (GPU) or tanh
    elements/s against the CPU limit (CPU, `cpu_limit_result` as `cpu_limit.measure_cpu_limit` returns it),
    memory."""
    record = {"key": spec.key, "group": spec.group, "shape": spec.shape_name, "dtype": spec.dtype_name,
              "mode": spec.mode, "backend": spec.backend, "sizes": spec.problem.as_dict(), "status": "failed"}
    prepared = None
    try:
        prepared = PreparedCase(spec, device, seed=seed)
        check = check_case(prepared)
        record["check"] = {"passed": check.passed, "errors": check.errors, "tolerances": check.tolerances,
                           "checked_rows": check.checked_rows}
        record["first_call_s"] = check.first_call_s
        if spec.backend == "compile":
            record["compile_s"] = check.first_call_s  # compilation (forward, and backward if any) + one call
        if not check.passed:
            worst = max(check.errors, key=lambda name: check.errors[name] / check.tolerances[name])
            record["error"] = (f"incorrect, not timed: {worst} error {check.errors[worst]:.2e} > tolerance "
                               f"{check.tolerances[worst]:.0e}")
            return record
        if device.type == "cuda":
            bytes_per_set = sum(t.numel() * t.element_size() for t in prepared.inputs.inputs())
            sets = [prepared] + [PreparedCase(spec, device, seed=seed + 100 * k, attention=prepared.attention)
                                 for k in range(1, input_sets_for_l2(bytes_per_set, device))]
            single_step = spec.problem.tgt_len == 1  # decode_step, and the forward of a T = 1 shape
            # The torch backend reads max |input| on the host to pick its tanh form (a sync), so it cannot be
            # captured; it is timed with plain launches rather than risk a failed capture poisoning the stream.
            capturable = spec.backend != "torch"
            record["timing"] = time_cuda([s.run for s in sets],
                                         use_graph=single_step and not prepared.with_grad and capturable)
            del sets
        else:
            record["timing"] = time_cpu(prepared.run, target_s=target_s)
            visible = roofline.visible_tanh_evaluations(spec, prepared.inputs.key_lengths)
            record["throughput"] = cpu_limit.throughput(visible, record["timing"]["median_s"],
                                                        record["timing"]["threads"], cpu_limit_result)
        record["status"] = "ok"
        if spec.backend == "triton" and mufu_limit is not None:
            fraction = roofline.measured_fraction(spec, record["timing"]["median_s"], mufu_limit)
            record["roofline"] = {"tanh_evaluations": roofline.tanh_evaluations(spec), "mufu_fraction": fraction,
                                  **(roofline.predicted_fraction(static_predictions, spec.shape_name,
                                                                 spec.dtype_name, spec.mode) or {})}
        if measure_memory:
            record["memory"] = memory_module.measure(spec, device, prepared=prepared, threads=threads)
    except Exception as error:  # reported as this case's failure (e.g. a torch.compile error), never a crash
        record["status"] = "failed"
        record["error"] = f"{type(error).__name__}: {error}"
    finally:
        del prepared
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def roofline_rows(records: list[dict], device: torch.device, static_predictions: dict | None) -> dict:
    rows = []
    for group in dict.fromkeys(record["group"] for record in records):
        shape_name, dtype_name, mode = group.split("/")
        row = {"group": group}
        row.update(roofline.predicted_fraction(static_predictions, shape_name, dtype_name, mode) or {})
        triton_case = next((r for r in records if r["group"] == group and r["backend"] == "triton"), None)
        if triton_case is not None:
            row["mufu_fraction"] = (triton_case.get("roofline") or {}).get("mufu_fraction")
        rows.append(row)
    note = ("'predicted' = static sm_90 issue-model figure of the Triton kernels (`python -m benchmarks.static_report`)"
            ": a PREDICTION from compiled SASS, not a measurement")
    if device.type != "cuda":
        note += "; no GPU here, so nothing is measured"
    if static_predictions is None:
        note += "; static predictions not found (the static_predictions_path given does not exist)"
    return {"rows": rows, "note": note, "measured_on_gpu": device.type == "cuda"}


def _summary(records: list[dict]) -> dict:
    all_targets = [t for r in records for t in (r.get("targets") or {}).values()]
    return {"cases": len(records), "ok": sum(r["status"] == "ok" for r in records),
            "failed": sum(r["status"] != "ok" for r in records),
            "targets_met": sum(t["met"] is True for t in all_targets),
            "targets_missed": sum(t["met"] is False for t in all_targets),
            "targets_unmeasured": sum(t["met"] is None for t in all_targets)}


def thread_scaling_section(shapes, dtype_name: str, backends, *, target_s: float, limit: dict | None,
                           seed: int) -> dict:
    """The scaling section: the fused "cpu" backend at 1 thread and at the run's count, or why it is not there."""
    threads = torch.get_num_threads()
    if "cpu" not in backends:
        return {"rows": [], "note": "no thread scaling: the 'cpu' backend is not in this run"}
    if threads < 2:
        return {"rows": [], "note": f"no thread scaling: the run has {threads} thread"}
    return scaling.run_scaling_bench(shapes, dtype_name, ["cpu"], thread_counts=(1, threads), target_s=target_s,
                                     limit=limit, seed=seed)


def run_bench(*, full: bool = False, device: str | torch.device | None = None,
              out_dir: str | os.PathLike | None = DEFAULT_OUT_DIR, shapes=None, dtypes=None, modes=None,
              backends=None, model: bool = True, model_config: str | None = None, memory: bool = True,
              framework: bool = False,
              ragged_batches: bool = True, thread_scaling: bool | None = None, threads: int | None = None,
              seed: int = 0, progress: bool = True, static_predictions_path=None, out=None) -> dict:
    """Run the benchmark and return the result dict (also written as JSON + PNG under `out_dir` unless None).

    Args:
        full: the full set instead of the quick subset (see the module docstring).
        device: "cpu" or "cuda" (default: cuda when available).
        out_dir: folder for bench-<device>-<UTC time>.json / .png; None writes nothing.
        shapes: shape names (`attn_fast.tools.bench.shapes.SHAPES`, incl. "tiny"); dtypes: "fp32", "fp16", "bf16",
            "fp64"; modes: `cases.MODES`; backends: `cases.registered_backends()` ("reference", "compile", then the
            library's: "torch", "cpu", "triton"). None = the quick/full default for the device: every backend
            that runs there (the others are listed, with the reason, under settings["skipped_backends"]).
        model / memory: run the Seq2Seq bench / the memory measurements.
        framework: time SpeechBrain's AttentionalRNNDecoder before and after `swap_attention`
            (`framework_bench`, sizes "quick" / "asr" with `full`); skipped, with the reason, when SpeechBrain
            is not importable. Off by default here; `attn-fast bench` turns it on unless --no-model or
            --no-framework.
        ragged_batches: time forward + backward with all keys visible and with ragged lengths (`ragged`), for
            the fast backends at the run's first dtype.
        thread_scaling: time the "cpu" backend's cases at 1 thread and at the run's thread count (`scaling`;
            CPU only, needs more than one thread). None = on with `full`.
        model_config: a `model_bench.MODEL_CONFIGS` name (default "date" quick, "nmt" full).
        threads: torch CPU threads (default: leave torch's setting); recorded either way.
        static_predictions_path: the static sm_90 predictions of the roofline table, a full report of
            `python -m benchmarks.static_report` or its predictions file (default: the package's own copy).
        out: where the table is printed (default stdout); progress bars go to stderr.

    Returns {"date", "machine", "settings", "timing_method", "cpu_limit", "cases": [...], "roofline", "model",
    "ragged", "scaling", "summary", "wall_s", "files"}; every case holds its raw samples, errors, memory, targets
    and on CPU its "throughput" (tanh elements/s, fraction of the CPU limit).
    """
    out = sys.stdout if out is None else out
    started = time.perf_counter()
    load_at_start = load_average()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but CUDA is not available")
    if threads:
        torch.set_num_threads(threads)
    warm_cpu_math()  # pytorch#188792: before any number is computed in this process
    kind = "cuda" if device.type == "cuda" else "cpu"
    shapes = list(shapes or (FULL_SHAPES if full else QUICK_SHAPES[kind]))
    dtypes = list(dtypes or (FULL_DTYPES if full else QUICK_DTYPES)[kind])
    modes = list(modes or MODES)
    skipped = {} if backends else skipped_backends(device)
    backends = list(backends or backends_for(device))
    if "reference" not in backends:
        backends.insert(0, "reference")  # every ratio is against eager
    target_s = 2.0 if full else 0.5
    static_predictions = roofline.load_static_predictions(static_predictions_path)
    mufu_limit = roofline.gpu_mufu_limit(device) if device.type == "cuda" else None
    # Measured before any case, in this process and on the threads the rows use (and on 1, for the scaling).
    limit = cpu_limit.measure_cpu_limit((1, torch.get_num_threads())) if device.type == "cpu" else None

    specs = case_specs(shapes, dtypes, modes, backends)
    records = []
    for spec in tqdm(specs, desc="attn-fast bench", disable=not progress, file=sys.stderr):
        records.append(run_case(spec, device, target_s=target_s, seed=seed, threads=threads,
                                measure_memory=memory and wants_memory(spec, full, device, shapes[0]),
                                mufu_limit=mufu_limit, static_predictions=static_predictions,
                                cpu_limit_result=limit))
    targets.annotate(records, device.type)

    model_result = None
    if model:
        config = model_bench.MODEL_CONFIGS[model_config or ("nmt" if full else "date")]
        model_backends = [b for b in backends if b != "compile"]  # the layer has no compiled-reference backend
        model_result = model_bench.run_model_bench(config, model_backends, device, target_s=target_s / 2,
                                                   progress=progress)

    framework_result = None
    if framework:
        swap_backends = [b for b in backends if b not in ("reference", "compile")]
        framework_result = framework_bench.run_framework_bench(device, config="asr" if full else "quick",
                                                               backends=swap_backends, target_s=target_s / 2)

    ragged_result = None
    fast_backends = [backend for backend in backends if backend not in ("reference", "compile")]
    if ragged_batches and fast_backends:
        ragged_result = ragged.run_ragged_bench(shapes, dtypes[0], fast_backends, device, target_s=target_s / 2,
                                                seed=seed)

    scaling_result = None
    if thread_scaling is None:
        thread_scaling = full
    if thread_scaling and device.type == "cpu":
        scaling_result = thread_scaling_section(shapes, dtypes[0], backends, target_s=target_s / 2, limit=limit,
                                                seed=seed)

    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": {**machine_info(device), "load_average_1m_start": load_at_start},
        "settings": {"full": full, "shapes": shapes, "dtypes": dtypes, "modes": modes, "backends": backends,
                     "skipped_backends": skipped, "memory": memory, "model": model, "framework": framework,
                     "ragged_batches": ragged_batches, "thread_scaling": bool(thread_scaling), "seed": seed,
                     "target_sample_s": target_s,
                     "shape_sizes": {name: get_shape(name).as_dict() for name in shapes}},
        "timing_method": ("GPU: triton.testing.do_bench median, inputs rotated, CUDA graphs for decode_step"
                          if device.type == "cuda" else
                          f"CPU wall clock (time.perf_counter), median after warm-up, {torch.get_num_threads()} "
                          "thread(s)"),
        "cpu_limit": limit,
        "cases": records,
        "roofline": roofline_rows(records, device, static_predictions),
        "mufu_limit": mufu_limit,
        "model": model_result,
        "framework": framework_result,
        "ragged": ragged_result,
        "scaling": scaling_result,
        "summary": _summary(records),
    }
    result["wall_s"] = time.perf_counter() - started
    result["files"] = {}
    if out_dir is not None:
        stem = pathlib.Path(out_dir) / f"bench-{device.type}-{now.strftime('%Y%m%dT%H%M%SZ')}"
        result["files"] = {"json": str(stem.with_suffix(".json")), "png": str(stem.with_suffix(".png"))}
        report.write_plot(result, pathlib.Path(result["files"]["png"]))
        report.write_json(result, pathlib.Path(result["files"]["json"]))
    print(report.format_report(result), file=out)
    if framework_result is not None:
        print("\n" + framework_bench.framework_table(framework_result), file=out)
    for path in result["files"].values():
        print(f"written: {path}", file=out)
    return result
