"""`attn-fast bench`: every backend side by side on the named shapes (DESIGN.md, "Benchmarks"), inside the op and
inside the Seq2Seq model, with peak memory, a roofline figure and the targets of issue 6.

    from attn_fast.tools.bench.runner import run_bench
    result = run_bench(device="cpu", out_dir="runs/bench")          # the quick subset; full=True for all

Modules, one job each: `shapes` (named problems and their inputs), `cases` (shape x dtype x mode x backend: the
callable and its correctness check), `timing` (CPU wall clock / GPU do_bench and CUDA graphs), `memory` (peak
extra memory: a fresh subprocess per case on CPU), `model_bench` (Seq2Seq train step and decoding), `roofline`
(% of the MUFU limit, measured on GPU, predicted on CPU), `targets` (the issue's targets per case), `report`
(table, JSON, PNG), `runner` (all of it in order) and `cli` (the `bench` subcommand).
"""
