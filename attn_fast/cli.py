"""The `attn-fast` command: `attn-fast verify` checks every backend on this machine against the float64
reference and exits 1 on any failure."""
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
