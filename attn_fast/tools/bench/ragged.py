"""Ragged batches: what `key_lengths` saves in the backward.

For each all-steps shape of the run (T > 1), each fast backend, forward + backward twice on the same inputs: once
with every key visible (key_lengths = S) and once with lengths drawn uniformly from [S/2, S], as in a real padded
batch. Both are checked against the float64 reference first, then timed like every bench case (CPU medians,
`do_bench` on GPU). The backward skips what lies past each row's length — the Triton kernel whole key tiles past
the row's length, the torch backend key blocks past the longest length of the block's rows — so the ragged call
costs less; the `saving` column is 1 − ragged / full time, next to the fraction of keys that are visible (the most
any skipping could save, since the forward skips past-length tiles as well).
"""
from __future__ import annotations

import math

import torch

from attn_fast.tools.bench.cases import CaseSpec, PreparedCase, check_case
from attn_fast.tools.bench.shapes import get_shape
from attn_fast.tools.bench.timing import time_cpu, time_cuda


def ragged_lengths(batch: int, src_len: int, *, seed: int = 0) -> torch.Tensor:
    """[batch] int64, uniform in [ceil(S/2), S]: a padded batch whose sources vary in length by up to half."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(math.ceil(src_len / 2), src_len + 1, (batch,), generator=generator)


def _variant(spec: CaseSpec, device: torch.device, lengths: torch.Tensor, *, target_s: float, seed: int) -> dict:
    """Check, then time, the forward + backward of `spec` with `lengths` as its key_lengths."""
    try:
        prepared = PreparedCase(spec, device, seed=seed)
        prepared.inputs.key_lengths = lengths.to(device)
        check = check_case(prepared)
        if not check.passed:
            return {"status": "failed", "error": "does not match the float64 reference", "errors": check.errors,
                    "tolerances": check.tolerances}
        if device.type == "cuda":
            timing = time_cuda([prepared.run])
        else:
            timing = time_cpu(prepared.run, target_s=target_s)
        return {"status": "ok", "median_s": timing["median_s"], "errors": check.errors, "method": timing["method"]}
    except Exception as error:  # a backend that cannot run here: reported, not fatal
        return {"status": "failed", "error": f"{type(error).__name__}: {error}"}


def run_ragged_bench(shape_names, dtype_name: str, backends, device: torch.device, *, target_s: float,
                     seed: int = 0) -> dict:
    """Rows of (shape, backend): full and ragged forward + backward times and the saving. `backends`: the fast
    ones only ("torch", "triton"); the eager reference computes every key whatever the lengths."""
    rows = []
    for shape_name in shape_names:
        shape = get_shape(shape_name)
        if shape.tgt_len == 1:  # a decode step has no backward in the bench
            continue
        ragged = ragged_lengths(shape.batch, shape.src_len, seed=seed)
        variants = {"full": torch.full((shape.batch,), shape.src_len, dtype=torch.int64), "ragged": ragged}
        for backend in backends:
            spec = CaseSpec(shape_name, dtype_name, "forward_backward", backend)
            row = {"shape": shape_name, "dtype": dtype_name, "backend": backend,
                   "visible_fraction": float(ragged.sum()) / (shape.batch * shape.src_len)}
            for name, lengths in variants.items():
                row[name] = _variant(spec, device, lengths, target_s=target_s, seed=seed)
            if row["full"]["status"] == "ok" and row["ragged"]["status"] == "ok":
                row["saving"] = 1.0 - row["ragged"]["median_s"] / row["full"]["median_s"]
            rows.append(row)
    return {"rows": rows, "lengths": "uniform in [ceil(S/2), S]"}

