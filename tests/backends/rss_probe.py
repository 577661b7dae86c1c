"""Run one attention call in this (fresh) process and print the growth of its peak RSS, in MiB, as JSON.

    python tests/backends/rss_probe.py BACKEND B T S A D [--backward]

Peak RSS is what the operating system charges the process, whatever allocator or cache holds the memory, so it
is what users see. The baseline is the RSS after the inputs exist and every library is loaded (a tiny warm-up
call of the same backend); the kernel's peak-RSS mark (VmHWM) is reset there (/proc/self/clear_refs, "5"), so
the growth is what the call itself needs, not a high-water mark left by building the inputs.
"""
import argparse
import json
import pathlib
import re

import torch

from attn_fast import additive_attention
from attn_fast.tools.testing import random_case


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    status = pathlib.Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def reset_peak_rss() -> None:
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("sizes", type=int, nargs=5, metavar="B T S A D")
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    batch, tgt_len, src_len, attn_dim, value_dim = args.sizes

    def run(case):
        context, weights = additive_attention(*case.inputs(), **case.options(), need_weights=True, backend=args.backend)
        if args.backward:
            (context.sum() + weights.sum()).backward()

    run(random_case(2, 3, 4, 5, 6, mask="lengths").cast(torch.float32, requires_grad=args.backward))
    case = random_case(batch, tgt_len, src_len, attn_dim, value_dim, mask="lengths")
    case = case.cast(torch.float32, requires_grad=args.backward)
    reset_peak_rss()
    before = status_mib("VmRSS")
    run(case)
    growth = status_mib("VmHWM") - before
    tanh_tensor = batch * tgt_len * src_len * attn_dim * 4 / 2**20
    print(json.dumps({"peak_rss_growth_mib": growth, "tanh_tensor_mib": tanh_tensor}))


if __name__ == "__main__":
    main()
