"""The `attn-fast` command: `attn-fast verify` checks every backend on this machine against the float64
reference and exits 1 on any failure; `attn-fast train` trains the Seq2Seq example model (the date task by
default) or, with `--task captions`, the Show, Attend and Tell example, whose checkpoints `attn-fast caption`
uses; `attn-fast bench` benchmarks every backend side by side (see attn_fast/bench)."""
from __future__ import annotations

import argparse
import sys

import torch


def _verify(args) -> int:
    from attn_fast.cpu_warmup import warm_cpu_math
    from attn_fast.tools.verify import available_backends, interpreter_note, parse_dtypes, run_verify

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

    from attn_fast.examples.seq2seq.train import TrainConfig, train

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("attn-fast train: --device cuda asked for, but CUDA is not available", file=sys.stderr)
        return 2
    if args.task == "captions":
        return _train_captions(args)
    misplaced = [flag for name, flag in _CAPTION_OPTIONS.items() if name in args.typed_options]
    if misplaced:
        print(f"attn-fast train: {', '.join(misplaced)} apply to --task captions only", file=sys.stderr)
        return 2
    if (args.data_tsv is None) != (args.valid_tsv is None):
        print("attn-fast train: give both --data-tsv and --valid-tsv, or neither (the date task)", file=sys.stderr)
        return 2
    train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}))
    return 0


# Options of `attn-fast train` that only one task understands (destination: flag).
_DATE_ONLY_OPTIONS = {"data_tsv": "--data-tsv", "valid_tsv": "--valid-tsv", "decoder": "--decoder"}
_CAPTION_OPTIONS = {"image_size": "--image-size", "channels": "--channels", "initial_state": "--initial-state",
                    "attention_reg": "--attention-reg"}


def _train_captions(args) -> int:
    """`attn-fast train --task captions`: the options typed on the command line, CaptionTrainConfig's defaults for
    the rest (the defaults --help shows are the date task's)."""
    import dataclasses

    from attn_fast.examples.captioning.train import CaptionTrainConfig, train

    typed = args.typed_options
    misplaced = [flag for name, flag in _DATE_ONLY_OPTIONS.items() if name in typed]
    if misplaced:
        print(f"attn-fast train: {', '.join(misplaced)} apply to the date task only, not --task captions",
              file=sys.stderr)
        return 2
    train(CaptionTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CaptionTrainConfig)
                                if f.name in typed or f.name in _CAPTION_OPTIONS}))
    return 0


def _typed_options(argv: list[str]) -> set[str]:
    """The destinations of the options present in `argv` (parsed again with every default suppressed)."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
            elif action.dest != "help":
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _caption(args) -> int:
    from attn_fast.examples.captioning.data import load_png
    from attn_fast.examples.captioning.plots import attention_overlay
    from attn_fast.examples.captioning.train import caption_images, load_checkpoint

    if args.write_samples:
        return _write_caption_samples(args)
    if not args.images or not args.checkpoint:
        print("attn-fast caption: give IMAGE.png files and --checkpoint (or --write-samples DIR)", file=sys.stderr)
        return 2
    model, vocab, _ = load_checkpoint(args.checkpoint, args.device, attention_backend=args.attention_backend)
    size = model.encoder.image_size
    images = [load_png(path) for path in args.images]
    for path, image in zip(args.images, images):
        if tuple(image.shape) != (3, size, size):
            print(f"attn-fast caption: {path} is {image.shape[2]}x{image.shape[1]} pixels, the model takes "
                  f"{size}x{size}", file=sys.stderr)
            return 2
    captions, decoded = caption_images(model, torch.stack(images).to(args.device), vocab, beam_size=args.beam)
    for number, (path, caption) in enumerate(zip(args.images, captions)):
        print(f"{path}\t{caption}")
        if args.overlay:
            out = args.overlay if len(args.images) == 1 else _numbered(args.overlay, number)
            attention_overlay(images[number], caption.split(), decoded.attention[number], out, title=caption)
            print(f"attention overlay: {out}", file=sys.stderr)
    return 0


def _write_caption_samples(args) -> int:
    """`attn-fast caption --write-samples DIR`: scenes of a split as PNG files, and DIR/captions.tsv
    (file<TAB>reference caption). The data seed and image size are the checkpoint's when one is given."""
    from pathlib import Path

    from attn_fast.examples.captioning.data import make_scene_splits, render_scene, save_png

    data_seed, image_size = args.data_seed, args.image_size
    if args.checkpoint:
        from attn_fast.examples.captioning.train import load_checkpoint

        _, _, info = load_checkpoint(args.checkpoint)
        data_seed, image_size = info["train_config"]["data_seed"], info["train_config"]["image_size"]
    sizes = {"train": (args.count, 0, 0), "valid": (0, args.count, 0), "test": (0, 0, args.count)}[args.split]
    scenes = getattr(make_scene_splits(data_seed, sizes, image_size), args.split)
    out_dir = Path(args.write_samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, scene in enumerate(scenes):
        path = out_dir / f"{args.split}-{number:03d}.png"
        save_png(render_scene(scene), path)
        lines.append(f"{path}\t{scene.caption}\n")
    (out_dir / "captions.tsv").write_text("".join(lines), encoding="utf-8")
    print("".join(lines), end="")
    return 0


def _translate(args) -> int:
    from attn_fast.examples.seq2seq.data import batches
    from attn_fast.examples.seq2seq.plots import alignment_heatmap
    from attn_fast.examples.seq2seq.train import load_checkpoint

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


def _evaluate_captions(args) -> int:
    from attn_fast.examples.captioning.data import make_scene_splits
    from attn_fast.examples.captioning.train import evaluate, load_checkpoint

    model, vocab, info = load_checkpoint(args.checkpoint, args.device)
    config = info["train_config"]
    scenes = make_scene_splits(config["data_seed"], (0, 0, args.test_size), config["image_size"]).test
    scores = evaluate(model, scenes, vocab, device=args.device, beam_size=args.beam)
    print(f"{len(scenes)} scenes: exact match {scores['exact_match']:.4f}, BLEU {scores['bleu']:.2f}, "
          f"grounding {scores['grounding']:.3f} (chance {scores['chance']:.3f}; {scores['matched']} shape words, "
          f"{scores['unmatched']} naming no shape in the image); colour words: grounding "
          f"{scores['colour_grounding']:.3f} (chance {scores['colour_chance']:.3f})")
    return 0


def _evaluate(args) -> int:
    from attn_fast.examples.seq2seq.data import bleu, make_date_splits, read_tsv

    if args.task == "captions":
        if args.data_tsv:
            print("attn-fast evaluate: --data-tsv applies to the date task only", file=sys.stderr)
            return 2
        return _evaluate_captions(args)
    if args.beam != 1:
        print("attn-fast evaluate: --beam applies to --task captions only", file=sys.stderr)
        return 2
    from attn_fast.examples.seq2seq.train import evaluate, load_checkpoint, translate

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

    # Defaults mirror attn_fast.examples.seq2seq.train.TrainConfig (a test checks that they agree).
    train = commands.add_parser(
        "train", help="train the Seq2Seq example model (date task, or TSV files) or the captioning model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Defaults shown are the date task's; with --task captions, options not given take "
                    "attn_fast.examples.captioning.train.CaptionTrainConfig's defaults (out dir runs/captions).")
    train.add_argument("--task", choices=["dates", "captions"], default="dates",
                       help="dates: the Seq2Seq date task (or TSV files); captions: Show, Attend and Tell on "
                            "generated scenes")
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
    captions = train.add_argument_group("captions (--task captions only)")
    captions.add_argument("--image-size", type=int, default=64, help="side of the generated images (multiple of 8)")
    captions.add_argument("--channels", type=int, default=64, help="annotation size (CNN width)")
    captions.add_argument("--initial-state", choices=["zeros", "mean"], default="zeros",
                          help="decoder's initial LSTM state: zeros, or from the mean annotation (the paper's)")
    captions.add_argument("--attention-reg", type=float, default=0.01,
                          help="λ of the doubly stochastic attention regularization (0: off)")
    train.set_defaults(handler=_train)

    translate = commands.add_parser("translate", help="decode sources with a trained checkpoint")
    translate.add_argument("sources", nargs="+", help="source strings, e.g. '25 июня 2009 г.'")
    translate.add_argument("--checkpoint", required=True, help="best.pt or last.pt of attn-fast train")
    translate.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    translate.add_argument("--heatmap", help="save the alignment heatmap here (numbered for several sources)")
    translate.add_argument("--device", default="cpu")
    translate.set_defaults(handler=_translate)

    evaluate = commands.add_parser("evaluate", help="exact match and character accuracy (and BLEU for TSV data); "
                                                    "captions: exact match, BLEU, attention grounding")
    evaluate.add_argument("--task", choices=["dates", "captions"], default="dates",
                          help="the task the checkpoint was trained on")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data-tsv", help="source<TAB>target pairs (default: the date task's test split)")
    evaluate.add_argument("--test-size", type=int, default=1000, help="test examples (the test split's first)")
    evaluate.add_argument("--beam", type=int, default=1, help="captions: beam size (1: greedy)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(handler=_evaluate)

    caption = commands.add_parser("caption", help="caption PNG images with a checkpoint of train --task captions")
    caption.add_argument("images", nargs="*", metavar="IMAGE.png", help="images of the model's size")
    caption.add_argument("--checkpoint", help="best.pt or last.pt of attn-fast train --task captions")
    caption.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    caption.add_argument("--overlay", metavar="OUT.png",
                         help="save the per-word attention overlay here (numbered for several images)")
    caption.add_argument("--attention-backend", choices=["auto", "triton", "torch", "reference"],
                         help="override the checkpoint's attention backend")
    caption.add_argument("--device", default="cpu")
    samples = caption.add_argument_group("sample images (instead of captioning)")
    samples.add_argument("--write-samples", metavar="DIR",
                         help="write generated scenes as DIR/SPLIT-NNN.png and DIR/captions.tsv, then exit")
    samples.add_argument("--split", choices=["train", "valid", "test"], default="test")
    samples.add_argument("--count", type=int, default=8, help="scenes to write")
    samples.add_argument("--data-seed", type=int, default=0, help="(the checkpoint's, when one is given)")
    samples.add_argument("--image-size", type=int, default=64, help="(the checkpoint's, when one is given)")
    caption.set_defaults(handler=_caption)

    from attn_fast.tools.bench.cli import add_bench_parser  # (light: the benchmark's heavy modules load when it runs)

    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.typed_options = _typed_options(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
