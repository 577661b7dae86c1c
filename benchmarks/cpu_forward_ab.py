"""Issue 13 forward targets: the "cpu" backend's forward and prepared decode step against the torch backend and eager,
at the bench's named shapes, one thread, interleaved round by round in one process.

    python -m benchmarks.cpu_forward_ab                       # forward at nmt_train, caption, long + decode steps
    python -m benchmarks.cpu_forward_ab --eager               # also eager's forward at caption and long (slow, GBs)
    python -m benchmarks.cpu_forward_ab --parts               # where the cpu forward's time goes (kernel, bmm, ...)

Before/after a change: run it on each version (a copy of the old package first on PYTHONPATH); the ratios to the
torch backend and to eager are taken within one process, so they compare across runs on a loaded machine better
than the absolute figures. Every candidate is checked against float64 first (relative error of the context).
Timings: wall and process CPU time (time.process_time) per call, median and minimum over the rounds; on this
shared 2-core VM the one-thread CPU time is the steadier figure.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch


def timed_rounds(candidates: dict, rounds: int) -> dict:
    for run in candidates.values():  # warm-up
        run()
    samples = {name: ([], []) for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            samples[name][1].append(1e3 * (time.process_time() - started_cpu))
            samples[name][0].append(1e3 * (time.perf_counter() - started))
    return {name: dict(wall_median=statistics.median(wall), wall_min=min(wall), cpu_median=statistics.median(cpu),
                       cpu_min=min(cpu)) for name, (wall, cpu) in samples.items()}


def forward_rows(rounds: int, eager: bool) -> list[dict]:
    import attn_fast
    from attn_fast.functional import additive_attention_on_memory, check_memory, prepare_key_exp
    from attn_fast.tolerances import relative_error
    from attn_fast.tools.bench.shapes import NAMED_SHAPES, make_inputs

    rows = []
    problems = [NAMED_SHAPES[name] for name in ("nmt_train", "caption", "long")]
    problems += [NAMED_SHAPES["tts_step"], NAMED_SHAPES["nmt_train"].decode_step(),
                 NAMED_SHAPES["caption"].decode_step()]
    for problem in problems:
        case = make_inputs(problem, torch.float32, "cpu")
        options = case.options()
        candidates = {}
        if problem.tgt_len > 1:
            for backend in ("torch", "cpu"):
                candidates[backend] = functools.partial(attn_fast.additive_attention, *case.inputs(), **options,
                                                        backend=backend)
            if eager or problem.tanh_elements < 1e8:
                candidates["eager"] = functools.partial(attn_fast.additive_attention, *case.inputs(), **options,
                                                        backend="reference")
        else:
            memory_options = dict(key_lengths=options["key_lengths"], key_padding_mask=None)
            candidates["eager"] = functools.partial(attn_fast.additive_attention, *case.inputs(), **options,
                                                    backend="reference")
            for backend in ("torch", "cpu"):
                form = check_memory(case.key_proj, case.value, case.v, **memory_options)
                candidates[backend] = functools.partial(
                    additive_attention_on_memory, *case.inputs(), **memory_options, backend=backend, tanh_form=form,
                    key_exp=prepare_key_exp(case.key_proj, form, backend))
        with torch.no_grad():
            expected, _ = attn_fast.additive_attention(*(t.double() for t in case.inputs()), **options,
                                                       backend="torch")
            errors = {name: relative_error(run()[0], expected) for name, run in candidates.items()}
            times = timed_rounds(candidates, rounds if problem.tanh_elements < 1e8 else max(3, rounds // 2))
        row = dict(shape=problem.name, sizes=list(problem.sizes), step=problem.tgt_len == 1, ms=times,
                   context_error=errors)
        for other in ("torch", "eager"):
            if other in times:
                row[f"cpu_vs_{other}"] = {key: times[other][key] / times["cpu"][key] for key in times["cpu"]}
        rows.append(row)
        label = f"{problem.name}{' step' if problem.tgt_len == 1 else ''} {problem.sizes}"
        cells = "  ".join(f"{name} {t['cpu_median']:.2f}|{t['cpu_min']:.2f} (wall {t['wall_median']:.2f})"
                          for name, t in times.items())
        ratios = "  ".join(f"cpu/{other} {row[f'cpu_vs_{other}']['cpu_median']:.1f}x "
                           f"(min {row[f'cpu_vs_{other}']['cpu_min']:.1f}x)" for other in ("torch", "eager")
                           if f"cpu_vs_{other}" in row)
        print(f"{label:38s} CPU ms median|min: {cells}   {ratios}   err {max(errors.values()):.1e}", flush=True)
    return rows


def parts_rows(rounds: int) -> list[dict]:
    """The cpu forward next to its parts at the same shapes: the kernel's P alone (inputs prepared), the context
    product, the range scan and the exponentials torch computes."""
    from attn_fast.tools.bench.shapes import NAMED_SHAPES

    return [shape_parts(NAMED_SHAPES[name], rounds) for name in ("nmt_train", "caption", "long")]


def shape_parts(problem, rounds: int) -> dict:
    import attn_fast
    from attn_fast.backends import common, cpu_backend
    from attn_fast.backends.cpu_kernels import forward, launching
    from attn_fast.tools.bench.shapes import make_inputs

    case = make_inputs(problem, torch.float32, "cpu")
    query, keys, value, v = case.inputs()
    rows_index = torch.arange(problem.batch)
    limits = case.key_lengths.to(torch.int64)
    probs = torch.empty(problem.batch, problem.tgt_len, problem.src_len)
    no_mask = torch.zeros(0, 1, 1, dtype=torch.bool).numpy()
    arrays = (query.numpy(), keys.numpy(), False, rows_index.numpy(), v.numpy(), value.numpy(),
              rows_index.numpy(), limits.numpy(), no_mask, False, forward.FACTORIZED_IF_IN_RANGE,
              common.EXP_SAFE_MAGNITUDE[torch.float32],
              cpu_backend.step_block(problem.batch, problem.tgt_len, problem.src_len, torch.get_num_threads()))

    def kernel():
        with launching() as threads:
            forward.attention_forward(*arrays, False, probs.numpy(), torch.empty(0, 0, 0).numpy(), threads)

    candidates = {
        "whole_cpu_forward": functools.partial(attn_fast.additive_attention, query, keys, value, v,
                                               key_lengths=case.key_lengths, backend="cpu"),
        "kernel_P_only (with e^{2k}, range check)": kernel,
        "bmm_context": lambda: torch.bmm(probs, value),
        "range_scan": lambda: common.largest_operand(query, keys, None),
        "torch_exps": lambda: (torch.mul(query, 2.0).exp_(), torch.mul(keys, 2.0).exp_()),
    }
    with torch.no_grad():
        times = timed_rounds(candidates, rounds)
    print(f"{problem.name:10s} " + "  ".join(f"{k} {t['cpu_median']:.2f}|{t['cpu_min']:.2f}"
                                             for k, t in times.items()), flush=True)
    return dict(shape=problem.name, sizes=list(problem.sizes), ms=times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="eager's forward at caption and long too (slow)")
    parser.add_argument("--parts", action="store_true", help="the cpu forward's parts instead of the A/B")
    parser.add_argument("--out", default=None, help="JSON path")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    result = dict(torch=torch.__version__, threads=arguments.threads, rounds=arguments.rounds)
    if arguments.parts:
        result["parts"] = parts_rows(arguments.rounds)
    else:
        result["rows"] = forward_rows(arguments.rounds, arguments.eager)
    if arguments.out:
        with open(arguments.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
