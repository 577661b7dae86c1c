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
    """`attn-fast translate`: one `source<TAB>output` line per source on stdout, in order, both fields escaped
    (backslash, tab, newline, CR as \\\\, \\t, \\n, \\r). A source that cannot be translated (empty, longer than
    --max-source-length, not UTF-8, or longer than a heatmap shows with --heatmap) gets one error line on stderr
    and the others are still translated. Exit status: 2 when a source was refused, 1 when a heatmap could not be
    written, else 0."""
    from attn_fast.examples.figures import prepare_figure_path
    from attn_fast.examples.seq2seq.data import escape_tsv_field, source_problem
    from attn_fast.examples.seq2seq.plots import HEATMAP_MAX_SOURCE_LENGTH, alignment_heatmap
    from attn_fast.examples.seq2seq.train import decode_sources, load_checkpoint

    _require_positive(args.beam, "--beam")
    _require_positive(args.max_source_length, "--max-source-length")
    model, src_vocab, tgt_vocab, _ = load_checkpoint(args.checkpoint, args.device)
    if args.heatmap:  # a bad path or a missing directory: refused or made before any decoding, not after
        prepare_figure_path(args.heatmap, "--heatmap")
    problems = {}
    for number, source in enumerate(args.sources):
        problem = source_problem(source)
        if problem is None and len(source) > args.max_source_length:
            problem = f"the source has {len(source)} characters, more than --max-source-length {args.max_source_length}"
        if problem is None and args.heatmap and len(source) > HEATMAP_MAX_SOURCE_LENGTH:
            problem = (f"the source has {len(source)} characters, more than the {HEATMAP_MAX_SOURCE_LENGTH} a "
                       f"--heatmap shows")
        if problem is not None:
            problems[number] = problem
    accepted = [number for number in range(len(args.sources)) if number not in problems]
    # The attention history only for heatmaps: without it decoding memory grows linearly in the source length.
    decoded = decode_sources(model, [args.sources[number] for number in accepted], src_vocab, tgt_vocab,
                             beam_size=args.beam, device=args.device, need_attention=bool(args.heatmap))
    translations = dict(zip(accepted, decoded))
    status = 0
    for number, source in enumerate(args.sources):
        if number in problems:
            _input_error("translate", f"source {number + 1} {_quoted(source)}: {problems[number]}")
            status = 2
            continue
        output, attention = translations[number]
        print(f"{escape_tsv_field(source)}\t{escape_tsv_field(output)}", flush=True)
        if args.heatmap:
            path = args.heatmap if len(args.sources) == 1 else _numbered(args.heatmap, number)
            try:
                alignment_heatmap(source, output, attention, path,
                                  title=f"{escape_tsv_field(source)} → {escape_tsv_field(output)}")
            except OSError as error:  # a full disk, a directory removed meanwhile: this heatmap only
                _input_error("translate", f"source {number + 1}: cannot write the heatmap {path} "
                                          f"({error.strerror or error})")
                status = max(status, 1)
                continue
            print(f"alignment heatmap: {path}", file=sys.stderr)
    return status


def _evaluate(args) -> int:
    """`attn-fast evaluate`: exact match and character accuracy of greedy translations (and BLEU for --data-tsv),
    one decoding of every source. A TSV that holds no pair, or a malformed line or one whose source exceeds
    --max-source-length, is refused (with its line) before anything is decoded."""
    from attn_fast.examples.metrics import bleu, character_accuracy, exact_match
    from attn_fast.examples.seq2seq.data import make_date_splits, read_tsv
    from attn_fast.examples.seq2seq.train import load_checkpoint, translate

    _require_positive(args.test_size, "--test-size")
    _require_positive(args.max_source_length, "--max-source-length")
    if args.data_tsv:  # read first: a bad file fails before the checkpoint is even loaded
        pairs = read_tsv(args.data_tsv, max_source_length=args.max_source_length)
        if not pairs:
            raise UserError(f"--data-tsv {args.data_tsv}: no source<TAB>target pair in it (only blank lines, or "
                            f"empty)")
    model, src_vocab, tgt_vocab, info = load_checkpoint(args.checkpoint, args.device)
    if not args.data_tsv:  # the date task's test split, from the seed the model was trained with
        data_seed = info["train_config"]["data_seed"]
        pairs = make_date_splits(seed=data_seed, sizes=(0, 0, args.test_size)).test
    hypotheses = translate(model, [s for s, _ in pairs], src_vocab, tgt_vocab, device=args.device)
    references = [t for _, t in pairs]
    line = (f"{len(pairs)} pairs: exact match {exact_match(hypotheses, references):.4f}, char accuracy "
            f"{character_accuracy(hypotheses, references):.4f}")
    if args.data_tsv:
        line += f", BLEU {bleu(hypotheses, references):.2f}"
    print(line)
    return 0


def _train_captions(args) -> int:
    """`attn-fast train-captions`: the Show, Attend and Tell example."""
    from attn_fast.examples.captioning.train import CaptionTrainConfig, train

    train(_config_from(args, CaptionTrainConfig))  # (checked as in _train)
    return 0


def _caption(args) -> int:
    """`attn-fast caption`: one `image<TAB>caption` line per image on stdout, in order (the path escaped as
    translate's fields). An image that cannot be read or is not of the model's size gets one error line on stderr
    and the others are still captioned. Exit status: 2 when an image was refused, 1 when an overlay could not be
    written, else 0."""
    from attn_fast.examples.captioning.data import load_png
    from attn_fast.examples.captioning.plots import attention_overlay
    from attn_fast.examples.captioning.train import caption_images, load_checkpoint
    from attn_fast.examples.figures import prepare_figure_path
    from attn_fast.examples.seq2seq.data import escape_tsv_field

    if args.write_samples:
        return _write_caption_samples(args)
    if not args.images or not args.checkpoint:
        raise UserError("give IMAGE.png files and --checkpoint (or --write-samples DIR)")
    _require_positive(args.beam, "--beam")
    model, vocab, _ = load_checkpoint(args.checkpoint, args.device, attention_backend=args.attention_backend)
    if args.overlay:  # refused or its directory made before any decoding
        prepare_figure_path(args.overlay, "--overlay")
    size = model.encoder.image_size
    images, problems = {}, {}
    for number, path in enumerate(args.images):
        try:
            image = load_png(path)
        except UserError as error:
            problems[number] = str(error)
            continue
        if tuple(image.shape) != (3, size, size):
            problems[number] = f"{path} is {image.shape[2]}x{image.shape[1]} pixels, the model takes {size}x{size}"
        else:
            images[number] = image
    captions, attention = {}, {}
    if images:
        decoded_captions, decoded = caption_images(model, torch.stack(list(images.values())).to(args.device), vocab,
                                                   beam_size=args.beam, need_attention=bool(args.overlay))
        for row, number in enumerate(images):
            captions[number] = decoded_captions[row]
            attention[number] = decoded.attention[row] if args.overlay else None
    status = 0
    for number, path in enumerate(args.images):
        if number in problems:
            _input_error("caption", f"image {number + 1}: {problems[number]}")
            status = 2
            continue
        caption = captions[number]
        print(f"{escape_tsv_field(path)}\t{caption}", flush=True)
        if args.overlay:
            out = args.overlay if len(args.images) == 1 else _numbered(args.overlay, number)
            try:
                attention_overlay(images[number], caption.split(), attention[number], out, title=caption)
            except OSError as error:  # this overlay only
                _input_error("caption", f"image {number + 1}: cannot write the overlay {out} "
                                        f"({error.strerror or error})")
                status = max(status, 1)
                continue
            print(f"attention overlay: {out}", file=sys.stderr)
    return status


def _write_caption_samples(args) -> int:
    """`attn-fast caption --write-samples DIR`: scenes of a split as PNG files, and DIR/captions.tsv
    (file<TAB>reference caption). The data seed and image size are the checkpoint's when one is given."""
    from pathlib import Path

    from attn_fast.examples.captioning.data import MIN_IMAGE_SIZE, make_scene_splits, render_scene, save_png
    from attn_fast.examples.seq2seq.data import escape_tsv_field

    _require_positive(args.count, "--count")
    data_seed, image_size = args.data_seed, args.image_size
    if args.checkpoint:
        from attn_fast.examples.captioning.train import load_checkpoint

        _, _, info = load_checkpoint(args.checkpoint)
        data_seed, image_size = info["train_config"]["data_seed"], info["train_config"]["image_size"]
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size must be at least {MIN_IMAGE_SIZE} (room for three shapes), got {image_size}")
    out_dir = Path(args.write_samples)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--write-samples {args.write_samples}: a file is in the way; give a directory")
    sizes = {"train": (args.count, 0, 0), "valid": (0, args.count, 0), "test": (0, 0, args.count)}[args.split]
    scenes = getattr(make_scene_splits(data_seed, sizes, image_size), args.split)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, scene in enumerate(scenes):
        path = out_dir / f"{args.split}-{number:03d}.png"
        save_png(render_scene(scene), path)
        lines.append(f"{escape_tsv_field(str(path))}\t{scene.caption}\n")
    (out_dir / "captions.tsv").write_text("".join(lines), encoding="utf-8")
    print("".join(lines), end="")
    return 0


def _evaluate_captions(args) -> int:
    from attn_fast.examples.captioning.data import make_scene_splits
    from attn_fast.examples.captioning.train import evaluate, load_checkpoint

    _require_positive(args.test_size, "--test-size")
    _require_positive(args.beam, "--beam")
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


#: --max-source-length of translate and evaluate, in characters. Decoding is linear in memory but quadratic in
#: time (up to 2 S + 10 steps over S keys), and the date task's sources are under 60 characters.
DEFAULT_MAX_SOURCE_LENGTH = 1000


def _require_positive(value: int, flag: str) -> None:
    """UserError naming `flag` unless `value` is an integer >= 1."""
    if value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value}")


def _input_error(command: str, message: str) -> None:
    """One input of `command` refused (the others go on): its line on stderr, in main()'s one-line error form."""
    print(f"attn-fast {command}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _quoted(text: str, limit: int = 40) -> str:
    """`text` for an error message: quoted, cut to `limit` characters, escapes visible (repr)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


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
    verify.add_argument("--backend", action="append", choices=["reference", "torch", "cpu", "triton"],
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
    translate.add_argument("--heatmap", metavar="OUT.png",
                           help="save the alignment heatmap here, .png, .svg or .pdf (numbered for several sources; "
                                "its directory is made if missing; sources of up to 200 characters)")
    translate.add_argument("--max-source-length", type=int, default=DEFAULT_MAX_SOURCE_LENGTH, metavar="CHARS",
                           help=f"refuse longer sources (default {DEFAULT_MAX_SOURCE_LENGTH}; decoding time grows "
                                f"with its square)")
    translate.add_argument("--device", default="cpu")
    translate.set_defaults(handler=_translate)

    evaluate = _add_evaluate_parser(commands, "evaluate", "train", _evaluate,
                                    scores="exact match and character accuracy (and BLEU for TSV data)")
    evaluate.add_argument("--data-tsv", help="source<TAB>target pairs (default: the date task's test split)")
    evaluate.add_argument("--max-source-length", type=int, default=DEFAULT_MAX_SOURCE_LENGTH, metavar="CHARS",
                          help=f"refuse a --data-tsv with longer sources (default {DEFAULT_MAX_SOURCE_LENGTH})")

    _add_train_parser(commands, "train-captions", CaptionTrainConfig, _train_captions,
                      summary="train the Show, Attend and Tell example model on generated scenes",
                      description="Train the Show, Attend and Tell example model on generated scenes of coloured "
                                  "shapes.")

    caption = commands.add_parser("caption", help="caption PNG images with a checkpoint of attn-fast train-captions")
    caption.add_argument("images", nargs="*", metavar="IMAGE.png", help="images of the model's size")
    caption.add_argument("--checkpoint", help="best.pt or last.pt of attn-fast train-captions")
    caption.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    caption.add_argument("--overlay", metavar="OUT.png",
                         help="save the per-word attention overlay here, .png, .svg or .pdf (numbered for several "
                              "images; its directory is made if missing)")
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
