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


def _translate(args) -> int:
    from .seq2seq.data import batches
    from .seq2seq.plots import alignment_heatmap
    from .seq2seq.train import load_checkpoint

    model, src_vocab, tgt_vocab, _ = load_checkpoint(args.checkpoint, args.device)
    pairs = [(source, "") for source in args.sources]
    batch = next(batches(pairs, src_vocab, tgt_vocab, len(pairs), shuffle=False, sort_by_length=False))
    src, lengths = batch.src.to(args.device), batch.src_lengths.to(args.device)
    decoded = (model.beam_search(src, lengths, beam_size=args.beam) if args.beam > 1 else model.greedy(src, lengths))
    for number, (source, tokens) in enumerate(zip(args.sources, decoded.to_lists(model.eos_id))):
        output = tgt_vocab.decode(tokens)
        print(f"{source}\t{output}")
        if args.heatmap:
            path = args.heatmap if len(args.sources) == 1 else _numbered(args.heatmap, number)
            alignment_heatmap(source, output, decoded.attention[number], path, title=f"{source} → {output}")
            print(f"alignment heatmap: {path}", file=sys.stderr)
    return 0


def _numbered(path: str, number: int) -> str:
    stem, dot, extension = path.rpartition(".")
    return f"{stem}-{number}.{extension}" if dot else f"{path}-{number}"


def _evaluate(args) -> int:
    from .seq2seq.data import bleu, make_date_splits, read_tsv
    from .seq2seq.train import evaluate, load_checkpoint, translate

    model, src_vocab, tgt_vocab, info = load_checkpoint(args.checkpoint, args.device)
    if args.data_tsv:
        pairs = read_tsv(args.data_tsv)
    else:  # the date task's test split, from the seed the model was trained with
        data_seed = info["train_config"]["data_seed"]
        pairs = make_date_splits(seed=data_seed, sizes=(0, 0, args.test_size)).test
    scores = evaluate(model, pairs, src_vocab, tgt_vocab, device=args.device)
    line = f"{len(pairs)} pairs: exact match {scores['exact_match']:.4f}, char accuracy {scores['char_accuracy']:.4f}"
    if args.data_tsv:
        hypotheses = translate(model, [s for s, _ in pairs], src_vocab, tgt_vocab, device=args.device)
        line += f", BLEU {bleu(hypotheses, [t for _, t in pairs]):.2f}"
    print(line)
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

    translate = commands.add_parser("translate", help="decode sources with a trained checkpoint")
    translate.add_argument("sources", nargs="+", help="source strings, e.g. '25 июня 2009 г.'")
    translate.add_argument("--checkpoint", required=True, help="best.pt or last.pt of attn-fast train")
    translate.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    translate.add_argument("--heatmap", help="save the alignment heatmap here (numbered for several sources)")
    translate.add_argument("--device", default="cpu")
    translate.set_defaults(handler=_translate)

    evaluate = commands.add_parser("evaluate", help="exact match and character accuracy (and BLEU for TSV data)")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data-tsv", help="source<TAB>target pairs (default: the date task's test split)")
    evaluate.add_argument("--test-size", type=int, default=1000, help="date task: test examples")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(handler=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
