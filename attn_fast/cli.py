"""The `attn-fast` command: `attn-fast verify` checks every backend on this machine against the float64
reference and exits 1 on any failure; `attn-fast train` trains the Seq2Seq example model (the date task by
default)."""
from __future__ import annotations

import argparse
import sys

import torch


def _verify(args) -> int:
    from .cpu_warmup import warm_cpu_math
    from .verify import available_backends, interpreter_note, parse_dtypes, run_verify

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("attn-fast verify: --device cuda asked for, but CUDA is not available", file=sys.stderr)
        return 2
    warm_cpu_math()
    backends = args.backend or available_backends(device)
    failures = run_verify(device, backends, parse_dtypes(args.dtype, device), seed=args.seed)
    note = interpreter_note(device)
    if note and "triton" not in backends:
        print(note)
    return 1 if failures else 0


def _train(args) -> int:
    import dataclasses

    from .seq2seq.train import TrainConfig, train

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("attn-fast train: --device cuda asked for, but CUDA is not available", file=sys.stderr)
        return 2
    if (args.data_tsv is None) != (args.valid_tsv is None):
        print("attn-fast train: give both --data-tsv and --valid-tsv, or neither (the date task)", file=sys.stderr)
        return 2
    train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-fast", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every available backend against the float64 reference")
    verify.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    verify.add_argument("--backend", action="append", choices=["reference", "torch", "triton"],
                        help="repeat to pick several (default: all available on the device)")
    verify.add_argument("--dtype", action="append", choices=["float64", "float32", "float16", "bfloat16"],
                        help="repeat to pick several (default: all the device supports)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    verify.set_defaults(handler=_verify)

    # Defaults mirror attn_fast.seq2seq.train.TrainConfig (a test checks that they agree).
    train = commands.add_parser("train", help="train the Seq2Seq example model (date task, or TSV files)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = train.add_argument_group("data (the date task unless --data-tsv and --valid-tsv are given)")
    data.add_argument("--data-tsv", metavar="TRAIN.tsv", help="training pairs, source<TAB>target per line")
    data.add_argument("--valid-tsv", metavar="VALID.tsv", help="validation pairs, source<TAB>target per line")
    data.add_argument("--train-size", type=int, default=20000, help="date task: training examples")
    data.add_argument("--valid-size", type=int, default=1000, help="date task: validation examples")
    data.add_argument("--data-seed", type=int, default=0, help="date task: seed of the splits and examples")
    model = train.add_argument_group("model")
    model.add_argument("--decoder", choices=["parallel", "bahdanau"], default="parallel",
                       help="parallel: one attention call for all steps; bahdanau: the paper's step-by-step one")
    model.add_argument("--attention-backend", choices=["auto", "triton", "torch", "reference"], default="auto",
                       help="backend of the AdditiveAttention layer")
    model.add_argument("--embed-dim", type=int, default=64, help="token embedding size")
    model.add_argument("--hidden-dim", type=int, default=128, help="GRU size (encoder: per direction)")
    model.add_argument("--attn-dim", type=int, default=64, help="attention hidden size")
    model.add_argument("--dropout", type=float, default=0.0, help="on embeddings and the readout")
    optim = train.add_argument_group("optimization")
    optim.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    optim.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    optim.add_argument("--batch-size", type=int, default=64, help="training pairs per step")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    optim.add_argument("--epochs", type=int, default=5, help="passes over the training pairs")
    optim.add_argument("--max-steps", type=int, help="total optimizer steps, counting those before --resume "
                                                     "(overrides --epochs)")
    optim.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop after this long")
    run = train.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="model initialization, batch order, dropout")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    run.add_argument("--out-dir", default="runs/seq2seq", help="where best.pt and last.pt are written")
    run.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (its last.pt)")
    run.add_argument("--valid-batch-size", type=int, default=256, help="pairs per greedy-decoding batch")
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    train.set_defaults(handler=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
