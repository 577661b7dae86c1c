"""The Python half of benchmarks/gpu_acceptance.sh: the checks that only a GPU can run, each writing one JSON file.

    python benchmarks/gpu_acceptance.py env OUT/environment.json      device, driver, CUDA, torch, triton, date
    python benchmarks/gpu_acceptance.py numerics OUT/numerics.json    tanh.approx and tl.dot (ieee, tf32x3, tf32,
                                                                      fp16, bf16) errors against float64
    python benchmarks/gpu_acceptance.py determinism OUT/determinism.json   Triton forward+backward twice, bitwise
    python benchmarks/gpu_acceptance.py graphs OUT/graphs.json        CUDA-graph capture: AdditiveAttention.step on
                                                                      an AttentionMemory, a Seq2Seq greedy step
    python benchmarks/gpu_acceptance.py prepared-keys OUT/prepared-keys.json   fp32 all-steps forward with the key
                                                                      pre-pass off and on, timed side by side
    python benchmarks/gpu_acceptance.py summary OUT                   OUT/summary.json from the files above

Every check catches its own failures and records them in its JSON ("ok": false, "error": ...) instead of crashing,
so that one broken check does not hide the others; the exit code is 1 when a check failed. `env` also runs without
a GPU (then "cuda": false).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import traceback
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))


def _write(path: str | Path, value: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _guarded(name: str, function) -> dict:
    """Run one sub-check; a raised exception becomes {"ok": False, "error": ...} in the report."""
    try:
        result = function()
        result.setdefault("ok", True)
        return result
    except Exception as error:  # noqa: BLE001 - every failure is a result here
        return {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:],
                "check": name}


# ----------------------------------------------------------------------------------------------------------------
# environment


def environment() -> dict:
    import triton

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "cuda_runtime": torch.version.cuda,
            "python": platform.python_version(), "host": platform.node(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info.update(device=torch.cuda.get_device_name(0), capability=capability,
                    sm_count=properties.multi_processor_count, memory_gib=round(properties.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = smi.stdout.strip().splitlines()[0].split(",")[0].strip() if smi.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        info["driver"] = None
    return info


# ----------------------------------------------------------------------------------------------------------------
# numerics (issue 12, point 1): what the interpreter cannot show


def _dot_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                   PRECISION: tl.constexpr, CAST_FP32: tl.constexpr):
        rows = tl.arange(0, M)
        cols = tl.arange(0, N)
        inner = tl.arange(0, K)
        a = tl.load(a_ptr + rows[:, None] * K + inner[None, :])
        b = tl.load(b_ptr + inner[:, None] * N + cols[None, :])
        if CAST_FP32:
            c = tl.dot(a, b, input_precision=PRECISION)
        else:
            c = tl.dot(a, b)  # fp16 / bf16 operands on the tensor cores, fp32 accumulation
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], c)

    return dot_kernel


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    from attn_fast.tolerances import relative_error

    return float(relative_error(actual, expected))


def dot_numerics() -> dict:
    kernel = _dot_kernel()
    generator = torch.Generator(device="cpu").manual_seed(0)
    size = 64
    a64 = torch.randn(size, size, generator=generator, dtype=torch.float64)
    b64 = torch.randn(size, size, generator=generator, dtype=torch.float64)
    results = {}
    for name, dtype, precision in [("fp32-ieee", torch.float32, "ieee"), ("fp32-tf32x3", torch.float32, "tf32x3"),
                                   ("fp32-tf32", torch.float32, "tf32"), ("fp16", torch.float16, None),
                                   ("bf16", torch.bfloat16, None)]:
        def run(dtype=dtype, precision=precision):
            a, b = a64.to(dtype).cuda(), b64.to(dtype).cuda()
            c = torch.empty(size, size, dtype=torch.float32, device="cuda")
            kernel[(1,)](a, b, c, size, size, size, PRECISION=precision or "ieee", CAST_FP32=precision is not None)
            torch.cuda.synchronize()
            # against the float64 product of the operands as the kernel saw them (rounded to `dtype`)
            expected = a.double().cpu() @ b.double().cpu()
            return {"relative_error": _relative_error(c.double().cpu(), expected)}

        results[name] = _guarded(name, run)
    checks = {"tf32x3 within 10x of ieee": results["fp32-tf32x3"].get("relative_error", 1.0)
              <= 10 * max(results["fp32-ieee"].get("relative_error", 0.0), 1e-7),
              "fp16 and bf16 within their rounding": results["fp16"].get("relative_error", 1.0) < 1e-2
              and results["bf16"].get("relative_error", 1.0) < 5e-2}
    results["checks"] = checks
    results["ok"] = all(checks.values()) and all(r.get("ok", True) for r in results.values() if isinstance(r, dict))
    return results


def tanh_numerics() -> dict:
    """The forward's tanh forms (tanh.approx, libdevice, exp, factorized) and the kernels' context per dtype, at a
    benchmark-like shape, against the float64 reference."""
    from attn_fast import additive_attention_reference
    from attn_fast.kernels.forward import attention_forward
    from attn_fast.tolerances import forward_tolerance
    from attn_fast.tools.testing import random_case
    from attn_fast.validation import attention_call

    results = {}
    base = random_case(4, 50, 120, 256, 128, mask="lengths", seed=1, device="cuda")
    for dtype_name, dtype in [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        case = base.cast(dtype)
        case64 = case.cast(torch.float64)
        expected, expected_weights = additive_attention_reference(*case64.inputs(), **case64.options(),
                                                                  need_weights=True)
        for form in ("default", "approx", "libdevice", "exp", "factorized"):
            def run(case=case, form=form, expected=expected, expected_weights=expected_weights, dtype=dtype):
                tuning = {} if form == "default" else {"tanh_form": form}
                context, _, weights = attention_forward(attention_call(*case.inputs(), **case.options(),
                                                                       need_weights=True), **tuning)
                torch.cuda.synchronize()
                errors = {"context": _relative_error(context, expected),
                          "weights": _relative_error(weights, expected_weights),
                          "tolerance": forward_tolerance(dtype)}
                errors["ok"] = max(errors["context"], errors["weights"]) <= (
                    forward_tolerance(dtype) if form != "approx" or dtype != torch.float32 else 2e-3)
                return errors

            results[f"{dtype_name}/{form}"] = _guarded(f"{dtype_name}/{form}", run)
    results["ok"] = all(r.get("ok", False) for r in results.values())
    return results


def numerics() -> dict:
    report = {"tanh": _guarded("tanh", tanh_numerics), "dot": _guarded("dot", dot_numerics)}
    report["ok"] = report["tanh"].get("ok", False) and report["dot"].get("ok", False)
    return report


# ----------------------------------------------------------------------------------------------------------------
# deterministic repeatability


def determinism() -> dict:
    from attn_fast import additive_attention
    from attn_fast.tools.testing import random_case

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        report = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
        for dtype_name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
            def run(dtype=dtype):
                case = random_case(8, 40, 150, 256, 64, mask="mixed", beam=2, extra_key_term=True, device="cuda",
                                   seed=5)
                runs = []
                for _ in range(2):
                    leaves = case.cast(dtype, requires_grad=True)
                    context, weights = additive_attention(*leaves.inputs(), **leaves.options(), need_weights=True,
                                                          backend="triton")
                    (context.float().square().sum() + weights[..., :7].float().sum()).backward()
                    runs.append([context, weights] + [t.grad for t in leaves.float_tensors().values()])
                torch.cuda.synchronize()
                names = ["context", "weights"] + [f"grad_{n}" for n in case.float_tensors()]
                equal = {name: bool(torch.equal(a, b)) for name, a, b in zip(names, *runs)}
                return {"bitwise_equal": equal, "ok": all(equal.values())}

            report[dtype_name] = _guarded(dtype_name, run)
        report["ok"] = all(report[name].get("ok", False) for name in ("fp32", "bf16"))
        return report
    finally:
        torch.use_deterministic_algorithms(previous)


# ----------------------------------------------------------------------------------------------------------------
# prepared keys at all steps: the one launch choice the model could not settle offline


#: (name, B, T, S, A, D): the bench's caption and long shapes, and the static report's long_prepared, where
#: kernels/configs.py's model prefers the key pre-pass (benchmarks/NOTES.md, "Prepared keys at all steps").
PREPARED_KEYS_SHAPES = (("caption", 32, 20, 196, 512, 2048), ("long", 8, 400, 400, 256, 256),
                        ("long_prepared", 16, 800, 800, 512, 128))


def _do_bench_median_ms(function) -> float:
    import triton.testing

    return triton.testing.do_bench(function, warmup=25, rep=100, return_mode="median")


def prepared_keys(device: str = "cuda", shapes=PREPARED_KEYS_SHAPES, timer=_do_bench_median_ms) -> dict:
    """fp32 forward with the key pre-pass off and on (`plan_forward(prepare_keys=...)`) at `shapes`: do_bench
    medians (ms, CUDA events, inputs in L2 as in a model; `timer` takes the function to time), each configuration,
    and the two contexts' relative difference. Whichever is faster on this GPU tells whether the model's charge for
    the pre-pass (its bytes at HBM bandwidth, kernels/configs.py `_modelled_seconds`) should change. `device` and
    `timer` are parameters so that a test can run the same code on CPU under the Triton interpreter."""
    from attn_fast.kernels.forward import attention_forward, plan_forward
    from attn_fast.tolerances import relative_error
    from attn_fast.validation import attention_call

    report = {}
    for name, batch, tgt_len, src_len, attn_dim, value_dim in shapes:
        generator = torch.Generator(device=device).manual_seed(11)
        query_proj, key_proj, value = (torch.randn(*sizes, device=device, generator=generator) for sizes in
                                       ((batch, tgt_len, attn_dim), (batch, src_len, attn_dim),
                                        (batch, src_len, value_dim)))
        v = torch.randn(attn_dim, device=device, generator=generator) / attn_dim ** 0.5
        call = attention_call(query_proj, key_proj, value, v)
        row = {}
        contexts = []
        for choice in (False, True):
            config = plan_forward(call, prepare_keys=choice).config
            contexts.append(attention_forward(call, prepare_keys=choice)[0])
            milliseconds = timer(lambda c=call, k=choice: attention_forward(c, prepare_keys=k))
            row["prepared" if choice else "default_off"] = {"ms": milliseconds, "config": str(config)}
        row["relative_difference"] = relative_error(contexts[1], contexts[0])
        row["faster"] = min(("default_off", "prepared"), key=lambda key: row[key]["ms"])
        report[name] = row
    report["ok"] = all(row["relative_difference"] <= 1e-5 for row in report.values() if isinstance(row, dict))
    return report


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs


def _capture_and_replay(step, inputs: list[torch.Tensor], fresh: list[torch.Tensor]) -> dict:
    """Warm `step(*inputs)` up on a side stream, capture it in a CUDA graph, replay it on `fresh` inputs copied into
    the static ones, and compare with an eager call on `fresh`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = step(*inputs)
    for static, new in zip(inputs, fresh):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    expected = step(*fresh)
    differences = {f"output{i}": float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
                   for i, (a, b) in enumerate(zip(static_outputs, expected))}
    return {"max_abs_difference": differences, "ok": all(d <= 1e-5 for d in differences.values())}


def decode_step_graph(backend: str) -> dict:
    from attn_fast import AdditiveAttention

    generator = torch.Generator(device="cpu").manual_seed(0)
    layer = AdditiveAttention(512, 512, 256, backend=backend).cuda().eval()
    keys = torch.randn(8, 100, 512, generator=generator).cuda()
    lengths = torch.randint(50, 101, (8,), generator=generator).cuda()
    memory = layer.precompute(keys, key_lengths=lengths)
    index = torch.arange(8).repeat_interleave(4).cuda()  # beam 4 over the shared memory
    query = torch.randn(32, 512, generator=generator).cuda()
    fresh = [torch.randn(32, 512, generator=generator).cuda(), index.flip(0).contiguous()]

    @torch.no_grad()
    def step(query, index):
        return layer.step(query, memory, index=index, need_weights=True)

    return _capture_and_replay(step, [query, index.clone()], fresh)


def seq2seq_greedy_step_graph(backend: str) -> dict:
    from attn_fast.examples.decoding import next_token_log_probs
    from attn_fast.examples.seq2seq.model import Seq2Seq

    torch.manual_seed(0)
    model = Seq2Seq(40, 40, embed_dim=64, hidden_dim=128, attn_dim=128, attention_backend=backend).cuda().eval()
    src = torch.randint(3, 40, (16, 30), device="cuda")
    lengths = torch.randint(10, 31, (16,), device="cuda")
    with torch.no_grad():
        encoder_states, hidden = model.encode(src, lengths)
        memory = model.decoder.precompute(encoder_states, lengths)
    finished = torch.zeros(16, dtype=torch.bool, device="cuda")

    @torch.no_grad()
    def step(prev_tokens, hidden):
        """One iteration of decoding.greedy's loop, without its host-side `finished.all()` exit."""
        logits, hidden, weights = model.decoder.step(prev_tokens, hidden, memory, need_weights=True)
        best_log_prob, token = next_token_log_probs(model, logits).max(dim=-1)
        return token.masked_fill(finished, model.pad_id), hidden, weights, best_log_prob

    prev = torch.full((16,), model.bos_id, device="cuda")
    fresh = [torch.randint(3, 40, (16,), device="cuda"), torch.randn_like(hidden)]
    return _capture_and_replay(step, [prev, hidden.clone()], fresh)


def graphs() -> dict:
    report = {}
    for backend in ("triton", "torch"):
        report[f"decode_step/{backend}"] = _guarded("decode_step", lambda b=backend: decode_step_graph(b))
        report[f"seq2seq_greedy_step/{backend}"] = _guarded("seq2seq", lambda b=backend: seq2seq_greedy_step_graph(b))
    report["ok"] = all(value.get("ok", False) for value in report.values())
    return report


# ----------------------------------------------------------------------------------------------------------------
# summary


def summary(folder: Path) -> dict:
    def load(name):
        path = folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    steps = []
    steps_file = folder / "steps.jsonl"
    if steps_file.exists():
        steps = [json.loads(line) for line in steps_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    checks = {name: load(f"{name}.json") for name in ("numerics", "determinism", "graphs", "prepared-keys")}
    result = {"environment": load("environment.json"), "steps": steps,
              "checks": {name: (None if value is None else bool(value.get("ok"))) for name, value in checks.items()},
              "bench_json": sorted(str(p.relative_to(folder)) for p in folder.glob("bench/*.json"))}
    result["ok"] = bool(steps) and all(step["rc"] == 0 for step in steps) and all(result["checks"].values())
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("env", "numerics", "determinism", "graphs", "prepared-keys", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    command, target = argv
    if command == "env":
        _write(target, environment())
        return 0
    if command == "summary":
        report = summary(Path(target))
        _write(Path(target) / "summary.json", report)
        failed = [step["step"] for step in report["steps"] if step["rc"] != 0]
        failed += [name for name, ok in report["checks"].items() if not ok]
        print(f"gpu acceptance: {'PASS' if report['ok'] else 'FAIL'}"
              + (f" (failed: {', '.join(failed)})" if failed else "") + f" -> {Path(target) / 'summary.json'}")
        return 0 if report["ok"] else 1
    if not torch.cuda.is_available():
        print(f"gpu_acceptance.py {command}: no CUDA GPU", file=sys.stderr)
        return 2
    report = _guarded(command, {"numerics": numerics, "determinism": determinism, "graphs": graphs,
                                "prepared-keys": prepared_keys}[command])
    _write(target, report)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
