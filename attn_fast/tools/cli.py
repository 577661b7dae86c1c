"""The `attn-fast` command: checks and benchmarks of the attention backends, and the two example models.

    attn-fast verify                      every backend on this machine against the float64 reference (exit 1 on
                                          any failure)
    attn-fast bench                       every backend side by side (see attn_fast/tools/bench)
    attn-fast train                       train the Seq2Seq example (the date task, or TSV files of pairs)
    attn-fast translate, evaluate         decode sources with its checkpoint; score it on the date task's test split
                                          or a TSV file
    attn-fast train-captions              train the Show, Attend and Tell example on generated scenes
    attn-fast caption, evaluate-captions  caption PNG images with its checkpoint; score it on the test scenes

The options of the two train commands are the fields of their config dataclasses (`TrainConfig`,
`CaptionTrainConfig`), with the dataclasses' defaults.

Errors: a mistake in what the user gave (a flag, a file, a checkpoint) ends the command with one line on stderr,
`attn-fast <command>: error: <message>`, and exit status 2, argparse's own errors included; `--debug` (before or
after the command) or ATTN_FAST_DEBUG=1 shows the traceback instead. Anything else keeps its traceback: a bug.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

import torch

from attn_fast.examples.captioning.data import MIN_IMAGE_SIZE
from attn_fast.examples.captioning.model import INITIAL_STATES, ImageEncoder
from attn_fast.examples.captioning.train import CaptionTrainConfig
from attn_fast.examples.errors import UserError
from attn_fast.examples.seq2seq.model import DECODERS
from attn_fast.examples.seq2seq.train import TrainConfig
from attn_fast.examples.training import check_device
from attn_fast.validation import BACKENDS


def _verify(args) -> int:
    from attn_fast.cpu_warmup import warm_cpu_math
    from attn_fast.tools.verify import available_backends, interpreter_note, parse_dtypes, run_verify

    device = torch.device(args.device)  # (checked by main)
    warm_cpu_math()
    backends = args.backend or available_backends(device)
    failures = run_verify(device, backends, parse_dtypes(args.dtype, device), seed=args.seed)
    note = interpreter_note(device)
    if note and "triton" not in backends:
        print(note)
    return 1 if failures else 0


def _train(args) -> int:
    """`attn-fast train`: the Seq2Seq example."""
    from attn_fast.examples.seq2seq.train import TrainConfig, train

    train(_config_from(args, TrainConfig))  # (TrainConfig checks every option, train the files and --out-dir)
    return 0


def _translate(args) -> int:
    from attn_fast.examples.seq2seq.plots import alignment_heatmap
    from attn_fast.examples.seq2seq.train import decode_sources, load_checkpoint

    model, src_vocab, tgt_vocab, _ = load_checkpoint(args.checkpoint, args.device)
    translations = decode_sources(model, args.sources, src_vocab, tgt_vocab, beam_size=args.beam, device=args.device)
    for number, (source, (output, attention)) in enumerate(zip(args.sources, translations)):
        print(f"{source}\t{output}")
        if args.heatmap:
            path = args.heatmap if len(args.sources) == 1 else _numbered(args.heatmap, number)
            alignment_heatmap(source, output, attention, path, title=f"{source} → {output}")
            print(f"alignment heatmap: {path}", file=sys.stderr)
    return 0


def _evaluate(args) -> int:
    from attn_fast.examples.metrics import bleu
    from attn_fast.examples.seq2seq.data import make_date_splits, read_tsv
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


def _train_captions(args) -> int:
    """`attn-fast train-captions`: the Show, Attend and Tell example."""
    from attn_fast.examples.captioning.train import CaptionTrainConfig, train

    train(_config_from(args, CaptionTrainConfig))  # (checked as in _train)
    return 0


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


def _numbered(path: str, number: int) -> str:
    stem, dot, extension = path.rpartition(".")
    return f"{stem}-{number}.{extension}" if dot else f"{path}-{number}"


# The command-line form of the config fields (`attn-fast train`: TrainConfig, `attn-fast train-captions`:
# CaptionTrainConfig), by help group: argparse keywords besides the flag, type and default, which come from the
# dataclass field. A name means the same in both configs; every field of either must be here.
_CONFIG_OPTIONS = {
    "data": {
        "data_tsv": dict(metavar="TRAIN.tsv", help="training pairs, source<TAB>target per line (instead of the "
                                                   "date task, with --valid-tsv)"),
        "valid_tsv": dict(metavar="VALID.tsv", help="validation pairs, source<TAB>target per line"),
        "train_size": dict(help="training examples of the generated task"),
        "valid_size": dict(help="validation examples of the generated task"),
        "data_seed": dict(help="seed of the generated splits and examples"),
        "image_size": dict(help=f"side of the generated images (a multiple of {ImageEncoder.STRIDE}, at least "
                                f"{MIN_IMAGE_SIZE})"),
    },
    "model": {
        "decoder": dict(choices=list(DECODERS), help="parallel: one attention call for all steps; bahdanau: the "
                                                     "paper's step-by-step one"),
        "attention_backend": dict(choices=BACKENDS, help="backend of the AdditiveAttention layer"),
        "embed_dim": dict(help="token embedding size"),
        "hidden_dim": dict(help="recurrent state size (Seq2Seq encoder: per direction)"),
        "attn_dim": dict(help="attention hidden size"),
        "channels": dict(help="annotation size (CNN width)"),
        "initial_state": dict(choices=INITIAL_STATES, help="decoder's initial LSTM state: zeros, or from the mean "
                                                           "annotation (the paper's)"),
        "dropout": dict(help="on embeddings and the output layer"),
        "attention_reg": dict(help="λ of the doubly stochastic attention regularization (0: off)"),
    },
    "optimization": {
        "lr": dict(help="AdamW learning rate"),
        "weight_decay": dict(help="AdamW weight decay"),
        "batch_size": dict(help="training examples per step (per process under torchrun)"),
        "grad_clip": dict(help="max global gradient norm (0: off)"),
        "epochs": dict(help="passes over the training examples"),
        "max_steps": dict(help="total optimizer steps, counting those before --resume (overrides --epochs)"),
        "time_limit": dict(metavar="SECONDS", help="stop after this long"),
    },
    "run": {
        "seed": dict(help="model initialization, batch order, dropout"),
        "device": dict(help="torch device"),
        "out_dir": dict(help="where best.pt and last.pt are written"),
        "resume": dict(metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (its last.pt)"),
        "valid_batch_size": dict(help="examples per greedy-decoding batch of the validation"),
        "quiet": dict(help="no progress bar or per-epoch lines"),
        "overwrite": dict(help="start afresh in an --out-dir that holds files (its best.pt and last.pt are removed "
                               "first); without it (or --resume) such a directory is refused"),
    },
}


def _add_config_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One option per field of the dataclass `config_class`: --field-name, of the field's type, defaulting to the
    field's default (a bool field, False by default, is a flag), in the help groups of `_CONFIG_OPTIONS`."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = fields - {name for options in _CONFIG_OPTIONS.values() for name in options}
    if unknown:
        raise RuntimeError(f"{config_class.__name__} fields without a command-line form: {', '.join(sorted(unknown))}")
    defaults, types = config_class(), typing.get_type_hints(config_class)
    for title, options in _CONFIG_OPTIONS.items():
        group = parser.add_argument_group(title)
        for name in (name for name in options if name in fields):
            flag, default = "--" + name.replace("_", "-"), getattr(defaults, name)
            if types[name] is bool:
                group.add_argument(flag, action="store_true", default=default, **options[name])
            else:
                group.add_argument(flag, type=_value_type(types[name]), default=default, **options[name])


def _value_type(annotation) -> type:
    """The type an option's text converts to: `int` for `int` and for `int | None` (None is the absent option)."""
    members = [t for t in typing.get_args(annotation) if t is not type(None)]
    return members[0] if members else annotation


def _config_from(args: argparse.Namespace, config_class: type):
    """An instance of `config_class` from the options `_add_config_options` added."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def _add_train_parser(commands, name: str, config_class: type, handler, *, summary: str, description: str) -> None:
    """The subcommand `name` that trains with `config_class`'s fields as its options."""
    parser = commands.add_parser(name, help=summary, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description=f"{description} The options are the fields of "
                                             f"{config_class.__module__}.{config_class.__name__}.")
    _add_config_options(parser, config_class)
    parser.set_defaults(handler=handler)


def _add_evaluate_parser(commands, name: str, train_command: str, handler, *,
                         scores: str) -> argparse.ArgumentParser:
    """The subcommand `name` that scores a checkpoint of `attn-fast train_command` on test data (`scores`: which
    scores, for its help line)."""
    parser = commands.add_parser(name, help=f"score a checkpoint of attn-fast {train_command}: {scores}")
    parser.add_argument("--checkpoint", required=True, help=f"best.pt or last.pt of attn-fast {train_command}")
    parser.add_argument("--test-size", type=int, default=1000, help="test examples (the test split's first)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(handler=handler)
    return parser


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser, its usage errors in the CLI's form: one line on stderr, `PROG: error: MESSAGE`, exit
    status 2 (argparse's), without the usage block (`--help` shows it). Subcommand parsers are of this class too
    (argparse makes them of the parent's class)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="attn-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: ATTN_FAST_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every available backend against the float64 reference")
    verify.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    verify.add_argument("--backend", action="append", choices=["reference", "torch", "triton"],
                        help="repeat to pick several (default: all available on the device)")
    verify.add_argument("--dtype", action="append", choices=["float64", "float32", "float16", "bfloat16"],
                        help="repeat to pick several (default: all the device supports)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    verify.set_defaults(handler=_verify)

    _add_train_parser(commands, "train", TrainConfig, _train,
                      summary="train the Seq2Seq example model (the date task, or TSV files of pairs)",
                      description="Train the Seq2Seq example model on the date task, or on --data-tsv and "
                                  "--valid-tsv.")

    translate = commands.add_parser("translate", help="decode sources with a checkpoint of attn-fast train")
    translate.add_argument("sources", nargs="+", help="source strings, e.g. '25 июня 2009 г.'")
    translate.add_argument("--checkpoint", required=True, help="best.pt or last.pt of attn-fast train")
    translate.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    translate.add_argument("--heatmap", help="save the alignment heatmap here (numbered for several sources)")
    translate.add_argument("--device", default="cpu")
    translate.set_defaults(handler=_translate)

    evaluate = _add_evaluate_parser(commands, "evaluate", "train", _evaluate,
                                    scores="exact match and character accuracy (and BLEU for TSV data)")
    evaluate.add_argument("--data-tsv", help="source<TAB>target pairs (default: the date task's test split)")

    _add_train_parser(commands, "train-captions", CaptionTrainConfig, _train_captions,
                      summary="train the Show, Attend and Tell example model on generated scenes",
                      description="Train the Show, Attend and Tell example model on generated scenes of coloured "
                                  "shapes.")

    caption = commands.add_parser("caption", help="caption PNG images with a checkpoint of attn-fast train-captions")
    caption.add_argument("images", nargs="*", metavar="IMAGE.png", help="images of the model's size")
    caption.add_argument("--checkpoint", help="best.pt or last.pt of attn-fast train-captions")
    caption.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    caption.add_argument("--overlay", metavar="OUT.png",
                         help="save the per-word attention overlay here (numbered for several images)")
    caption.add_argument("--attention-backend", choices=BACKENDS, help="override the checkpoint's attention backend")
    caption.add_argument("--device", default="cpu")
    samples = caption.add_argument_group("sample images (instead of captioning)")
    samples.add_argument("--write-samples", metavar="DIR",
                         help="write generated scenes as DIR/SPLIT-NNN.png and DIR/captions.tsv, then exit")
    samples.add_argument("--split", choices=["train", "valid", "test"], default="test")
    samples.add_argument("--count", type=int, default=8, help="scenes to write")
    samples.add_argument("--data-seed", type=int, default=0, help="(the checkpoint's, when one is given)")
    samples.add_argument("--image-size", type=int, default=64, help="(the checkpoint's, when one is given)")
    caption.set_defaults(handler=_caption)

    evaluate_captions = _add_evaluate_parser(commands, "evaluate-captions", "train-captions", _evaluate_captions,
                                             scores="exact match, BLEU, attention grounding")
    evaluate_captions.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")

    from attn_fast.tools.bench.cli import add_bench_parser  # (light: the benchmark's heavy modules load when it runs)

    add_bench_parser(commands)
    for command_parser in commands.choices.values():
        # Also after the command. SUPPRESS: absent there, it leaves the value the top-level parser set.
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                    help="show the traceback of an error (also: ATTN_FAST_DEBUG=1)")
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def _debugging(args: argparse.Namespace) -> bool:
    """True when errors must keep their traceback: --debug, or ATTN_FAST_DEBUG set to anything but "" or "0"."""
    return args.debug or os.environ.get("ATTN_FAST_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run the command of `argv` (default: sys.argv[1:]); returns the exit status. A `UserError` becomes one line
    on stderr and status 2; an OSError (a file that cannot be read or written, a full disk) one line and status 1;
    Ctrl-C one line and status 130. --debug / ATTN_FAST_DEBUG=1 re-raise them with their traceback."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the command's parser, which names the command and its --help
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command = f"attn-fast {args.command}"
    try:
        if getattr(args, "device", None) is not None:  # every command's --device, before any work
            check_device(args.device)
        return args.handler(args)
    except UserError as error:
        if _debugging(args):
            raise
        print(f"{command}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:
        if _debugging(args):
            raise
        print(f"{command}: error: {_one_line(_describe_os_error(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if _debugging(args):
            raise
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    """`message` with its line breaks folded into spaces: the error stays one line of stderr."""
    return " ".join(message.split())


def _describe_os_error(error: OSError) -> str:
    """"PATH: REASON" (e.g. "runs/x.png: Permission denied") when the error names a file, else its text."""
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
