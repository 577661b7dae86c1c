"""Launch configurations of the forward and backward kernels: small, readable, reproducible heuristics (no
autotuning). Each choice below was made on offline sm_90 compiles read with the issue model of docs/DESIGN.md
("Performance you can check without a GPU"); the measured figures behind them are in benchmarks/NOTES.md
("Static figures behind the kernel configurations") and benchmarks/results/static_sm90.json, not here.

Forward (`forward_config`):
- The score loop works on an A-major tile [BLOCK_A, BLOCK_T, BLOCK_S] per A-chunk, 64 x 32 x 8 with 8 warps next
  to a [BLOCK_T, BLOCK_D] fp32 context accumulator: the largest tile that keeps the accumulator in registers
  without spills. With D = 256 the accumulator needs more registers, so the query tile halves to 32 rows.
- Single-step decoding (T small) cannot share a key across query rows, so the tile is long in S instead:
  [16, 1, 128] (scores only) or [16, 1, 64] (fused: the [BLOCK_S, BLOCK_D] value tile sits in registers too, so
  D <= 128 there). fp32 decoding uses the exp tanh: the factorized one saves nothing with one row.
- Rows of a small batch cannot fill the GPU; then the keys are split across programs (flash-decoding) until about
  two programs per SM are running, each split keeping at least two key tiles.
- The P @ value product uses tl.dot (tensor cores). Larger value dims (and calls that return the weights) store
  the raw scores instead and compute weights and context in a second, tanh-free kernel tiled over D.
- NUM_STAGES is 1: pipelining the A-chunk loads raised the instruction count without saving registers; loads come
  from L1/L2 (each key chunk is reused by BLOCK_T query rows).

Backward tanh pass (`backward_config`, kernels/backward.py): program = (query row b, key tile of BLOCK_S keys,
A-chunk of BLOCK_A units); it walks the query rows BLOCK_T at a time and evaluates a key-major
[BLOCK_S, BLOCK_T, BLOCK_A] tile per step. Triton lays such a tile out with the lanes and warps along A (the last,
fastest dim) and the keys in each thread's registers, so that
- the sum over keys for grad_query_proj stays inside each thread (no SHFL, no shared memory),
- the grad_row_keys / grad_v accumulators [BLOCK_S, BLOCK_A] are elementwise per thread,
- a thread's dE values for one query row are contiguous: 128-bit loads, 1/4 load per element.
- BLOCK_A = 32 * num_warps: one attention unit per thread; 32 keys x 1 query row per step (more keys spill, fewer
  amortize the per-step work worse, two query rows per step break the 128-bit dE loads, and the forward's A-major
  orientation would move the per-row sum over keys across lanes).
- 4 warps (BLOCK_A = 128) when A >= 128; fewer for small A, so that no lane idles. Short sources: BLOCK_S = the
  next power of two of S (at least 4), 32 at most.
- Query-row splits: while B_q x key tiles x A-chunks gives fewer than two programs per SM, the query rows are split
  across programs too (at least MIN_ROWS_PER_SPLIT rows each): with one program per SM, nothing hides the latency
  of a step's loads.
- fp32 uses the factorized tanh (1 MUFU.RCP per element, fp32-accurate; e^{2q} once per query row and e^{2k} once
  per program), falling back to the exp form (2 MUFU ops) for a program whose |q| or |k| exceeds the factorized
  limit, and taking the exp form outright below FACTORIZED_MIN_ROWS query rows. fp16/bf16 use tanh.approx.f32.
"""
from __future__ import annotations

import dataclasses

import torch

from .launch import DEFAULT_SM_COUNT

#: Largest power-of-two padded value dim whose [BLOCK_T, BLOCK_D] fp32 accumulator stays in registers
#: (BLOCK_T >= 16), and for decoding, where the [BLOCK_S, BLOCK_D] value tile is the larger one.
MAX_FUSED_VALUE_DIM = 256
MAX_FUSED_VALUE_DIM_DECODE = 128
#: Query steps (T) up to which a call is tiled like single-step decoding (few query rows per program).
DECODE_MAX_TGT_LEN = 8


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Everything the forward launcher needs to know besides the tensors."""

    block_t: int  # query rows per program
    block_s: int  # keys per inner-loop tile
    block_a: int  # attention-dim chunk of the A-major tanh tile
    block_d: int  # value dim, padded to a power of two (one tile in the fused kernel)
    num_warps: int
    num_stages: int  # software-pipelining depth of the A-chunk loop (query/key projection loads)
    tanh_form: str  # see kernels/tanh.py
    num_splits: int  # key ranges processed by separate programs, combined afterwards (1 = no split)
    fuse_context: bool  # True: online softmax + P @ value in the score kernel; False: scores, then a second kernel


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """Configuration of the tanh-free kernel that turns stored scores into weights and context."""

    block_t: int
    block_s: int
    block_d: int
    num_warps: int
    num_stages: int  # Triton's software pipelining of the key loop (cp.async prefetch of scores and value)


def default_tanh_form(dtype: torch.dtype, block_t: int) -> str:
    """fp32 needs an fp32-accurate tanh (tolerance 1e-5): the factorized form costs 1 MUFU op per element when a
    tile has many query rows to share the per-row exponentials, and the exp form otherwise (decoding). fp16/bf16
    tolerate tanh.approx (max relative error 2^-11), 1 MUFU op per element."""
    if dtype == torch.float32:
        return "factorized" if block_t >= 16 else "exp"
    return "approx"


def forward_config(
    *,
    query_rows: int,
    tgt_len: int,
    src_len: int,
    attn_dim: int,
    value_dim: int,
    dtype: torch.dtype,
    need_weights: bool,
    sm_count: int = DEFAULT_SM_COUNT,
    tanh_form: str | None = None,
    num_splits: int | None = None,
) -> ForwardConfig:
    """The configuration for one call. `tanh_form` and `num_splits` override the heuristic (tests, benchmarks)."""
    block_d = max(16, next_power_of_2(value_dim))
    attn_pow2 = next_power_of_2(attn_dim)

    if tgt_len <= DECODE_MAX_TGT_LEN:
        # Decoding: few query rows share each key, so the tile is long in S instead: [16, 1, 128] for T = 1.
        # Fused, the [BLOCK_S, BLOCK_D] value tile must fit in registers too: half the keys, D <= 128.
        block_t = next_power_of_2(tgt_len)
        fuse_context = not need_weights and block_d <= MAX_FUSED_VALUE_DIM_DECODE
        block_s = 64 if fuse_context else 128
        block_a = min(attn_pow2, max(2, 16 // block_t))
        num_warps = 4
    else:
        # 64 x 32 x 8 A-major tiles (128 tanh per thread per chunk with 8 warps): ~4.6 instructions per tanh.
        # With D = 256 the fp32 accumulator takes 64 more registers per thread: half the query rows.
        fuse_context = not need_weights and block_d <= MAX_FUSED_VALUE_DIM
        block_t = min(64, max(16, next_power_of_2(tgt_len)))
        if fuse_context and block_d > 128:
            block_t = min(block_t, 32)
        block_s = 32
        block_a = min(attn_pow2, 8)
        num_warps = 8 if block_t == 64 or (fuse_context and block_t * block_d >= 8192) else 4
    num_stages = 1  # see the module docstring

    if num_splits is None:
        programs = query_rows * -(-tgt_len // block_t)
        key_tiles = -(-src_len // block_s)
        num_splits = 1
        if 0 < programs < sm_count and key_tiles >= 4:
            num_splits = min(-(-2 * sm_count // programs), key_tiles // 2)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    return ForwardConfig(
        block_t=block_t,
        block_s=block_s,
        block_a=block_a,
        block_d=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
        tanh_form=tanh_form or default_tanh_form(dtype, block_t),
        num_splits=num_splits,
        fuse_context=fuse_context,
    )


def context_config(*, tgt_len: int, value_dim: int) -> ContextConfig:
    """Scores -> weights and context: tensor-core tiles, D split across programs in chunks of <= 64. No tanh here,
    so loads are the cost: 2 pipeline stages (3 left a spilled register around the loop at BT = 32). These
    tiles compile without spills (64 x 64 x 128 with 4 warps spilled ~1 KB with need_weights)."""
    block_t = min(64, next_power_of_2(tgt_len))
    return ContextConfig(
        block_t=block_t,
        block_s=32,
        block_d=min(64, max(16, next_power_of_2(value_dim))),
        num_warps=8 if block_t == 64 else 4,
        num_stages=2,
    )


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
