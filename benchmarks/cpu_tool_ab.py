"""Issue 13: which tool compiles the fused CPU forward? numba vs a C++ extension (torch.utils.cpp_extension, at::vec,
at::parallel_for) vs Inductor (torch.compile of the formula), side by side in one process, plus numba's threading
layer next to torch ops and the first call of a fresh process.

    python -m benchmarks.cpu_tool_ab                      # everything below, ~5-10 min on a busy 2-core VM
    python -m benchmarks.cpu_tool_ab --section tools      # only the kernel A/B

Sections:
- tools: the hot part of the forward, P = masked softmax of the factorized scores sum(v) - 2 sum_a v_a / (1 +
  e^{2q_a} e^{2k_a}) from e^{2q}, e^{2k}, v and key lengths (the context, P @ value, is the same torch.bmm for
  every tool), by each tool at the issue's shapes, 1 and 2 threads; each result checked against a float64
  computation first (max abs error of P printed); next to them the whole forward of the torch backend and of the
  "cpu" backend (scores, softmax and context), and for the decode step (e^{2k} prepared) eager's.
- named: the issue's targets at the bench's named shapes, 2 threads: the cpu vs the torch backend's forward, and a
  decode step through a prepared memory vs eager.
- threading: numba's kernel alternating with a threaded torch op (a 512x512 matmul), per threading layer
  ("workqueue", "omp"), each in a fresh process: kernel time after the torch op vs alone.
- first-call: a fresh process's import + first forward with an empty numba cache and with the cache written.

Timings: candidates interleaved round by round in one process, median over the rounds; this VM is shared, so
compare within a row. Results: a markdown table on stdout and JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

#: (B, T, S, A, D) of issue 13's measurements; the decode step reads prepared e^{2k}.
ISSUE_SHAPES = {"issue_small": (4, 100, 200, 256, 64), "issue_long": (2, 400, 400, 256, 256),
                "tts_step": (32, 1, 200, 128, 512)}

CPP_SOURCE = textwrap.dedent(r"""
    #include <torch/extension.h>
    #include <ATen/Parallel.h>
    #include <ATen/cpu/vec/functional.h>
    #include <ATen/cpu/vec/vec.h>
    #include <algorithm>
    #include <cmath>

    using Vec = at::vec::Vectorized<float>;

    // P [B, T, S] = masked softmax over j < limits[b] of sum(v) - 2 sum_a v[a] / (1 + qe[b, i, a] ke[b, j, a]).
    torch::Tensor masked_probs(torch::Tensor qe, torch::Tensor ke, torch::Tensor v, torch::Tensor limits) {
      const int64_t B = qe.size(0), T = qe.size(1), A = qe.size(2), S = ke.size(1);
      auto probs = torch::empty({B, T, S}, qe.options());
      const float* q = qe.data_ptr<float>();
      const float* k = ke.data_ptr<float>();
      const float* vp = v.data_ptr<float>();
      const int64_t* lim = limits.data_ptr<int64_t>();
      float* p = probs.data_ptr<float>();
      float v_sum = 0.f;
      for (int64_t a = 0; a < A; ++a) v_sum += vp[a];
      at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
        const Vec one(1.f);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / T;
          const float* qrow = q + item * A;
          float* prow = p + item * S;
          const int64_t limit = std::min<int64_t>(lim[b], S);
          float row_max = -INFINITY;
          for (int64_t j = 0; j < limit; ++j) {
            const float* krow = k + (b * S + j) * A;
            Vec acc(0.f);
            int64_t a = 0;
            for (; a + Vec::size() <= A; a += Vec::size()) {
              acc = acc + Vec::loadu(vp + a) / at::vec::fmadd(Vec::loadu(qrow + a), Vec::loadu(krow + a), one);
            }
            float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
            for (; a < A; ++a) total += vp[a] / (1.f + qrow[a] * krow[a]);
            const float score = v_sum - 2.f * total;
            prow[j] = score;
            if (score > row_max) row_max = score;
          }
          if (!std::isfinite(row_max)) row_max = 0.f;
          float sum = 0.f;
          for (int64_t j = 0; j < limit; ++j) { prow[j] = std::exp(prow[j] - row_max); sum += prow[j]; }
          if (sum == 0.f) sum = 1.f;
          for (int64_t j = 0; j < limit; ++j) prow[j] /= sum;
          for (int64_t j = limit; j < S; ++j) prow[j] = 0.f;
        }
      });
      return probs;
    }
""")


def build_cpp_extension():
    """The C++ candidate, compiled with torch.utils.cpp_extension (AVX2 + FMA through at::vec's AVX2 build);
    returns (module, seconds to build or load)."""
    from torch.utils.cpp_extension import load_inline

    started = time.perf_counter()
    module = load_inline(
        name="attn_fast_cpu_ab", cpp_sources=[CPP_SOURCE], functions=["masked_probs"],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"], verbose=False,
    )
    return module, time.perf_counter() - started


def inductor_formula(qe, ke, v, visible):
    """The same P as the formula torch.compile fuses: [B, T, S, A] is a loop it need not materialize."""
    scores = v.sum() - 2.0 * (v / (1.0 + qe[:, :, None, :] * ke[:, None, :, :])).sum(-1)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def numba_probs(qe, ke, v, limits):
    """P by the shipped numba kernel without its context (`fuse_context=False`)."""
    from attn_fast.backends.cpu_kernels import forward, unavailable_reason, use_torch_threads

    assert unavailable_reason() is None
    rows = torch.arange(qe.shape[0])
    probs = torch.empty(qe.shape[0], qe.shape[1], ke.shape[1])
    threads = use_torch_threads()
    # The shipped kernel takes q itself (it forms e^{2q} per step) and the memory's prepared e^{2k}: the other
    # candidates get e^{2q} ready-made, a [B, T, A] exp that is S times smaller than their loop.
    query = qe.log().mul_(0.5)
    forward.attention_forward(query.numpy(), ke.numpy(), True, rows.numpy(), v.numpy(), torch.zeros(1, 1, 0).numpy(),
                              rows.numpy(), limits.numpy(), torch.zeros(0, 1, 1, dtype=torch.bool).numpy(), False,
                              forward.FACTORIZED, 40.0, qe.shape[1], False, probs.numpy(),
                              torch.zeros(0, 0, 0).numpy(), threads)
    return probs


def interleaved_medians(candidates: dict, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """ms per call, wall clock and this process's CPU time: every candidate once per round (after one warm-up
    call each), median over the rounds. On a shared, oversubscribed VM the CPU time of a one-thread call is the
    steadier measure (time spent descheduled is not in it); a two-thread call's CPU time sums both threads."""
    for run in candidates.values():
        run()
    wall = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            cpu[name].append(time.process_time() - started_cpu)
            wall[name].append(time.perf_counter() - started)
    return ({name: 1e3 * statistics.median(values) for name, values in wall.items()},
            {name: 1e3 * statistics.median(values) for name, values in cpu.items()})


def shape_rows(name: str, sizes: tuple, cpp, cpp_build_s: float, rounds: int) -> list[dict]:
    """The rows of one shape (1 and 2 threads): every tool's P checked against float64, then all timed."""
    import attn_fast
    from attn_fast.functional import additive_attention_on_memory
    from attn_fast.tools.testing import random_case

    batch, tgt_len, src_len, attn_dim, value_dim = sizes
    case = random_case(batch, tgt_len, src_len, attn_dim, value_dim, mask="lengths", seed=0)
    case.key_lengths[0] = src_len  # at least one full row
    qe, ke = torch.mul(case.query_proj, 2).exp(), torch.mul(case.key_proj, 2).exp()
    limits = case.key_lengths.to(torch.int64)
    visible = (torch.arange(src_len)[None, :] < limits[:, None])[:, None, :]
    expected = inductor_formula(qe.double(), ke.double(), case.v.double(), visible)
    compiled = torch.compile(inductor_formula, dynamic=False)
    started = time.perf_counter()
    compiled(qe, ke, case.v, visible)
    inductor_compile_s = time.perf_counter() - started
    kernels = {
        "numba": lambda: numba_probs(qe, ke, case.v, limits),
        "cpp_extension": lambda: cpp.masked_probs(qe, ke, case.v, limits),
        "inductor": lambda: compiled(qe, ke, case.v, visible),
    }
    errors = {tool: float((run().double() - expected).abs().max()) for tool, run in kernels.items()}
    options = dict(key_lengths=case.key_lengths)
    whole = {
        "torch_backend_forward": lambda: attn_fast.additive_attention(*case.inputs(), **options, backend="torch"),
        "cpu_backend_forward": lambda: attn_fast.additive_attention(*case.inputs(), **options, backend="cpu"),
    }
    if tgt_len == 1:  # a decode step: eager, and both backends through a prepared memory (e^{2k} given)
        key_exp = torch.mul(case.key_proj, 2).exp()
        whole["eager_reference"] = lambda: attn_fast.additive_attention(*case.inputs(), **options,
                                                                        backend="reference")
        for backend in ("torch", "cpu"):
            whole[f"{backend}_backend_step_key_exp"] = functools.partial(
                additive_attention_on_memory, *case.inputs(), **options, backend=backend, tanh_form="factorized",
                key_exp=key_exp)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            medians, cpu_medians = interleaved_medians({**kernels, **whole}, rounds)
        row = dict(shape=name, sizes=list(sizes), threads=threads, ms=medians, cpu_ms=cpu_medians,
                   max_abs_error_of_P=errors,
                   inductor_compile_s=inductor_compile_s, cpp_build_s=cpp_build_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def tools_section(rounds: int) -> list[dict]:
    cpp, cpp_build_s = build_cpp_extension()
    print(f"C++ extension built/loaded in {cpp_build_s:.1f} s", flush=True)
    return [row for name, sizes in ISSUE_SHAPES.items() for row in shape_rows(name, sizes, cpp, cpp_build_s, rounds)]


def named_section(rounds: int, threads: int = 2) -> list[dict]:
    """The issue's targets at the bench's named shapes (attn_fast/tools/bench/shapes.py), at `threads`: forward of the
    torch and cpu backends (all steps), and a decode step through a prepared memory (check_memory and
    prepare_key_exp once, as precompute runs them) of both backends against eager; each checked first against the
    float64 reference (the float64 torch backend above 4e7 tanh elements), relative error of the context printed."""
    import attn_fast
    from attn_fast.functional import additive_attention_on_memory, check_memory, prepare_key_exp
    from attn_fast.tolerances import relative_error
    from attn_fast.tools.bench.shapes import NAMED_SHAPES, make_inputs

    torch.set_num_threads(threads)
    rows = []
    for shape in NAMED_SHAPES.values():
        for problem in ((shape,) if shape.tgt_len == 1 else (shape, shape.decode_step())):
            case = make_inputs(problem, torch.float32, "cpu")
            options = case.options()
            if problem.tanh_elements <= 4e7:
                expected, _ = attn_fast.additive_attention_reference(*(t.double() for t in case.inputs()), **options)
            else:  # the float64 reference would hold several [B, T, S, A] float64 tensors (GBs): the torch backend
                expected, _ = attn_fast.additive_attention(*(t.double() for t in case.inputs()), **options,
                                                           backend="torch")
            candidates = {}
            if problem.tgt_len > 1:
                for backend in ("torch", "cpu"):
                    candidates[f"{backend}_forward"] = functools.partial(attn_fast.additive_attention,
                                                                         *case.inputs(), **options, backend=backend)
            else:
                memory_options = dict(key_lengths=options["key_lengths"], key_padding_mask=None)
                candidates["eager_reference"] = functools.partial(attn_fast.additive_attention, *case.inputs(),
                                                                  **options, backend="reference")
                for backend in ("torch", "cpu"):
                    form = check_memory(case.key_proj, case.value, case.v, **memory_options)
                    candidates[f"{backend}_prepared_step"] = functools.partial(
                        additive_attention_on_memory, *case.inputs(), **memory_options, backend=backend,
                        tanh_form=form, key_exp=prepare_key_exp(case.key_proj, form, backend))
            with torch.no_grad():
                errors = {name: relative_error(run()[0], expected) for name, run in candidates.items()}
                medians, cpu_medians = interleaved_medians(candidates, rounds if problem.tanh_elements < 1e8 else 3)
            row = dict(shape=shape.name, sizes=list(problem.sizes), threads=threads, ms=medians, cpu_ms=cpu_medians,
                       context_error=errors)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


THREADING_PROBE = textwrap.dedent("""
    import json, os, statistics, sys, time
    import numba
    numba.config.THREADING_LAYER = sys.argv[1]
    import torch
    from attn_fast.backends.cpu_kernels import forward, use_torch_threads
    torch.set_num_threads(2)
    B, T, S, A = 4, 100, 200, 256
    qe, ke, v = torch.rand(B, T, A) + 0.5, torch.rand(B, S, A) + 0.5, torch.randn(A)
    query = (torch.rand(B, T, A) + 0.5).log() * 0.5  # the kernel forms e^{2q} itself
    rows, limits = torch.arange(B), torch.full((B,), S)
    probs = torch.empty(B, T, S)
    left, right = torch.randn(512, 512), torch.randn(512, 512)

    def kernel():
        threads = use_torch_threads()
        forward.attention_forward(query.numpy(), ke.numpy(), True, rows.numpy(), v.numpy(),
                                  torch.zeros(1, 1, 0).numpy(), rows.numpy(), limits.numpy(),
                                  torch.zeros(0, 1, 1, dtype=torch.bool).numpy(), False, forward.FACTORIZED, 40.0, T,
                                  False, probs.numpy(), torch.zeros(0, 0, 0).numpy(), threads)

    kernel(); left @ right
    times = {name: ([], []) for name in ("kernel_alone", "kernel_after_torch_op", "torch_op_after_kernel")}

    def timed(name, run):
        wall, cpu = times[name]
        started, started_cpu = time.perf_counter(), time.process_time()
        run()
        cpu.append(time.process_time() - started_cpu); wall.append(time.perf_counter() - started)

    for _ in range(int(sys.argv[2])):
        timed("kernel_alone", kernel)
        left @ right
        timed("kernel_after_torch_op", kernel)
        timed("torch_op_after_kernel", lambda: left @ right)
    row = dict(layer=numba.threading_layer())
    for name, (wall, cpu) in times.items():
        row[name + "_ms"] = 1e3 * statistics.median(wall)
        row[name + "_cpu_ms"] = 1e3 * statistics.median(cpu)
    print(json.dumps(row))
""")

FIRST_CALL_PROBE = textwrap.dedent("""
    import json, time
    started = time.perf_counter()
    import torch, attn_fast
    imported = time.perf_counter()
    query, keys, value, v = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 4), torch.randn(8)
    attn_fast.additive_attention(query, keys, value, v, backend="cpu")
    done = time.perf_counter()
    print(json.dumps(dict(import_s=imported - started, first_forward_s=done - imported)))
""")


def subprocess_json(code: str, *args: str, env: dict | None = None) -> dict:
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment,
                            cwd=root, timeout=900, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def threading_section(rounds: int) -> list[dict]:
    rows = [subprocess_json(THREADING_PROBE, layer, str(rounds)) for layer in ("workqueue", "omp")]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def first_call_section() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label in ("empty numba cache", "numba cache written"):
            row = dict(case=label, **subprocess_json(FIRST_CALL_PROBE, env={"NUMBA_CACHE_DIR": cache}))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("tools", "named", "threading", "first-call", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="torch (and numba) threads of the named section")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu-tool-ab-<UTC>.json)")
    arguments = parser.parse_args(argv)
    results = dict(date=datetime.now(timezone.utc).isoformat(), torch=torch.__version__, cpus=os.cpu_count())
    try:
        import numba

        results["numba"] = numba.__version__
    except ImportError:
        results["numba"] = None
    if arguments.section in ("tools", "all"):
        results["tools"] = tools_section(arguments.rounds)
    if arguments.section in ("named", "all"):
        results["named"] = named_section(arguments.rounds, arguments.threads)
    if arguments.section in ("threading", "all"):
        results["threading"] = threading_section(max(arguments.rounds, 15))
    if arguments.section in ("first-call", "all"):
        results["first_call"] = first_call_section()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(arguments.out or Path(__file__).resolve().parent / "results" / f"cpu-tool-ab-{stamp}.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
