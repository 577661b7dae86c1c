"""The `attn-fast bench` subcommand: `add_bench_parser(subparsers)` adds it to the `attn-fast` parser.

    attn-fast bench                       quick subset (about a minute on a quiet 2-core CPU)
    attn-fast bench --full                every named shape (and fp16/bf16 on GPU), memory for every case,
                                          NMT-size model
    attn-fast bench --shape tiny --no-model --no-memory      a smoke run
    attn-fast bench --show benchmarks/results/cpu-full-*.json  the tables of a saved run
    attn-fast bench --show RUN.json --markdown                  the README's CPU table of a saved run
    attn-fast bench --threads 1 --no-scaling                    every row at one thread

Exit code: 0 when every case ran correctly, 1 when some case failed (incorrect results or an error; the table says
which), 2 on a bad request (e.g. --device cuda without CUDA). Missed performance targets do not change it: they
are reported, in the table and the JSON.
"""
from __future__ import annotations

import argparse
import sys

# Only light modules here: `attn_fast.tools.cli` imports this one for every subcommand.
from attn_fast.tools.bench.cases import BACKENDS, MODES
from attn_fast.tools.bench.shapes import DTYPES, MODEL_CONFIGS, SHAPES


def _bench(args: argparse.Namespace) -> int:
    import torch

    if args.show:  # print the tables of a saved run again (the README and NOTES quote them this way)
        import json

        from attn_fast.tools.bench.report import format_report, markdown_table

        with open(args.show, encoding="utf-8") as saved:
            result = json.load(saved)
        print(markdown_table(result, args.show) if args.markdown else format_report(result))
        return 0
    from attn_fast.tools.bench.runner import run_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("attn-fast bench: --device cuda asked for, but CUDA is not available", file=sys.stderr)
        return 2
    result = run_bench(full=args.full, device=device, out_dir=args.out_dir, shapes=args.shape, dtypes=args.dtype,
                       modes=args.mode, backends=args.backend, model=not args.no_model, model_config=args.model_size,
                       memory=not args.no_memory, ragged_batches=not args.no_ragged, thread_scaling=args.scaling,
                       framework=not (args.no_model or args.no_framework),
                       threads=args.threads, seed=args.seed, progress=not args.quiet)
    failed = result["summary"]["failed"]
    failed_models = sum(entry["status"] != "ok" for entry in (result["model"] or {}).get("results", []))
    failed_ragged = sum(row["full"]["status"] != "ok" or row["ragged"]["status"] != "ok"
                        for row in (result["ragged"] or {}).get("rows", []))
    failed_framework = sum(row["status"] != "ok" for row in (result["framework"] or {}).get("results", []))
    return 1 if failed or failed_models or failed_ragged or failed_framework else 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` to an `add_subparsers()` object; the parsed namespace's `handler(args)` returns the exit code."""
    bench = subparsers.add_parser(
        "bench", help="benchmark every backend side by side (op and Seq2Seq model): time, memory, roofline",
        description="Benchmark the attention backends on the named shapes: forward, forward+backward and decode "
                    "step against the eager reference, peak memory, % of the MUFU limit (GPU) and the Seq2Seq "
                    "model. Prints a table and writes JSON + PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--full", action="store_true",
                       help="all named shapes (and fp16/bf16 on GPU), memory for every case, NMT-size model, "
                            "longer timing (default: the quick subset)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--out-dir", default="runs/bench", help="where bench-<device>-<time>.json/.png are written")
    bench.add_argument("--shape", action="append", choices=list(SHAPES),
                       help="repeat to pick several (default: the quick or full set; 'tiny' is the CI smoke shape)")
    bench.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeat to pick several")
    bench.add_argument("--backend", action="append", choices=list(BACKENDS),
                       help="repeat to pick several (default: all that run on the device; the eager reference is "
                            "always included, as the baseline)")
    bench.add_argument("--mode", action="append", choices=list(MODES), help="repeat to pick several (default: all)")
    bench.add_argument("--model-size", choices=list(MODEL_CONFIGS),
                       help="Seq2Seq size (default: 'date' quick, 'nmt' with --full)")
    bench.add_argument("--no-model", action="store_true", help="skip the Seq2Seq model benchmark")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    bench.add_argument("--no-framework", action="store_true",
                       help="skip SpeechBrain's decoder before/after swap_attention (a model benchmark: --no-model "
                            "skips it too; it runs when SpeechBrain imports)")
    bench.add_argument("--no-ragged", action="store_true",
                       help="skip the ragged-batch rows (forward + backward with lengths in [S/2, S] vs all S)")
    bench.add_argument("--threads", type=int,
                       help="torch CPU threads, which the fused 'cpu' backend follows (default: torch's own setting)")
    bench.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None,
                       help="CPU: time the 'cpu' backend's forward, forward+backward and prepared step at 1 thread "
                            "and at --threads, side by side (default: on with --full)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.add_argument("--show", metavar="RUN.json", help="print the tables of a saved run and exit (runs nothing)")
    bench.add_argument("--markdown", action="store_true",
                       help="with --show: print the README's CPU table (every backend's median and ratio to eager, "
                            "peak memory) in Markdown instead")
    bench.set_defaults(handler=_bench)
    return bench
