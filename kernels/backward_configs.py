"""Launch configuration of the backward tanh pass (kernels/backward.py): one small, readable heuristic.

Program = (query row b, key tile of BLOCK_S keys, A-chunk of BLOCK_A units); it walks the query rows BLOCK_T at a
time and evaluates a key-major [BLOCK_S, BLOCK_T, BLOCK_A] tile per step. Triton lays such a tile out with the
lanes and warps along A (the last, fastest dim) and the keys in each thread's registers, so that
- the sum over keys for grad_query_proj stays inside each thread (no SHFL, no shared memory),
- the grad_row_keys / grad_v accumulators [BLOCK_S, BLOCK_A] are elementwise per thread,
- a thread's dE values for one query row are contiguous: 128-bit loads, 1/4 load per element.
Why these numbers (sm_90, Triton 3.9, offline compiles read with the issue model of DESIGN.md, "Performance you
can check without a GPU"; A = 256, fp32 factorized tanh; figures from kernels/backward.py `static_compile_targets`):
- BLOCK_A = 32 * num_warps: one attention unit per thread. 32 keys x 1 query row per step = 32 tanh per thread
  per step: 7.5-7.9 instructions per tanh on full key tiles, 240-255 registers, no spills (kernels/backward.py
  has the table). Measured alternatives (S = 256, A = 256, fp32): 64 keys spill (255 registers + 320 B of stack,
  8.7 per tanh); 16 keys cost 8.8 per tanh (the per-step work is amortized over half the elements); two query rows
  per step (2 x 16 keys) cost 11.0 (the [16, 2] dE tile no longer loads as whole 128-bit rows); the A-major
  orientation of the forward ([BLOCK_A, BLOCK_T, BLOCK_S], units in registers, keys across lanes) cost 26.6: the
  per-row sum over keys then crosses lanes (224 SHFL per 32 tanh).
- 4 warps (BLOCK_A = 128) when A >= 128; fewer for small A, so that no lane idles.
- Short sources: BLOCK_S = the next power of two of S (at least 4), 32 at most.
- Query-row splits: while B_q x key tiles x A-chunks gives fewer than two programs per SM, the query rows are split
  across programs too (at least MIN_ROWS_PER_SPLIT rows each). At 255 registers an SM holds two 4-warp programs;
  with one, nothing hides the latency of a step's loads. nmt_train (B = 32, S = 50, A = 256): 128 programs, so 3
  splits of 17 rows (384 programs).
- fp32 uses the factorized tanh (1 MUFU.RCP per element, fp32-accurate; e^{2q} once per query row and e^{2k} once
  per program), falling back to the exp form (2 MUFU ops, 13.3-13.5 instructions per tanh) for a program whose |q| or
  |k| exceeds 20, and taking the exp form outright below FACTORIZED_MIN_ROWS query rows. fp16/bf16 use
  tanh.approx.f32: 1 MUFU.TANH, 7.5-7.7 instructions per tanh.
"""
from __future__ import annotations

import dataclasses

import torch

from .configs import DEFAULT_SM_COUNT, next_power_of_2

#: tanh forms the backward supports (kernels/tanh.py names). "libdevice" is left out: 2 MUFU ops, no gain.
BACKWARD_TANH_FORMS = ("factorized", "exp", "approx")


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Everything the backward launcher needs besides the tensors."""

    block_t: int  # query rows per step of the program's loop
    block_s: int  # keys per program (the key tile)
    block_a: int  # attention units per program (the A-chunk)
    num_warps: int
    num_stages: int  # software pipelining of loops Triton pipelines by itself (the query loop is not one of them)
    tanh_form: str  # "factorized" (fp32), "exp", "approx" (fp16/bf16)
    num_splits: int = 1  # query rows split across this many programs (grad_row_keys then added, not stored)


#: Fewest query rows a split of the query rows keeps: a program pays its key chunk, e^{2k} and the grad_row_keys
#: atomics once per split, which 16 query steps amortize well.
MIN_ROWS_PER_SPLIT = 16

#: Fewest query rows for which fp32 takes the factorized form: a program pays one accurate e^{2k} (an EX2 and ~6
#: FMA-pipe instructions) per key it owns and saves one EX2 per element, i.e. per key and query row.
FACTORIZED_MIN_ROWS = 4


def default_backward_tanh_form(dtype: torch.dtype, tgt_len: int) -> str:
    """fp32 needs an fp32-accurate tanh (gradient tolerance 5e-5): the factorized form (1 MUFU op per element)
    once there are enough query rows to pay for the per-key exponentials, else the exp form (2 MUFU ops).
    fp16/bf16 tolerate tanh.approx (max relative error 2^-11): 1 MUFU op per element."""
    if dtype == torch.float32:
        return "factorized" if tgt_len >= FACTORIZED_MIN_ROWS else "exp"
    return "approx"


def backward_config(*, query_rows: int, tgt_len: int, src_len: int, attn_dim: int, dtype: torch.dtype,
                    sm_count: int = DEFAULT_SM_COUNT, tanh_form: str | None = None,
                    num_splits: int | None = None) -> BackwardConfig:
    """The configuration for one call; `tanh_form` and `num_splits` override the heuristic (tests, benchmarks).

    The query rows are walked in a loop, so their number changes the work per program, not the tile. When the
    (row, key tile, A-chunk) programs cannot give every SM two of them, the query rows are split across programs
    as well (at least MIN_ROWS_PER_SPLIT rows each): with one 4-warp program per SM, nothing hides the latency of
    each step's loads."""
    if tanh_form is not None and tanh_form not in BACKWARD_TANH_FORMS:
        raise ValueError(f"tanh_form must be one of {BACKWARD_TANH_FORMS}, got {tanh_form!r}")
    block_a = min(128, max(2, next_power_of_2(attn_dim)))
    block_s = min(32, max(4, next_power_of_2(src_len)))
    if num_splits is None:
        programs = query_rows * -(-src_len // block_s) * -(-attn_dim // block_a)
        num_splits = 1
        if 0 < programs < 2 * sm_count:
            num_splits = max(1, min(-(-2 * sm_count // programs), tgt_len // MIN_ROWS_PER_SPLIT))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return BackwardConfig(
        block_t=1,
        block_s=block_s,
        block_a=block_a,
        num_warps=max(1, block_a // 32),
        num_stages=1,
        tanh_form=tanh_form or default_backward_tanh_form(dtype, tgt_len),
        num_splits=num_splits,
    )
