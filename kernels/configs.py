"""Launch configurations of the forward kernels: one small, readable, reproducible heuristic (no autotuning).

Why these numbers (sm_90, Triton 3.9, measured with `python -m benchmarks.static_report`; the figures are in
benchmarks/results/static_sm90.json):
- The score loop works on an A-major tile [BLOCK_A, BLOCK_T, BLOCK_S] per A-chunk. 64 x 32 x 8 with 8 warps (64
  tanh per thread per chunk) runs at ~4.6 SASS instructions per tanh next to a [64, 128] fp32 context accumulator
  (226 registers, no spills); 4 warps spill there, and 64 x 64 x 8 reaches 255 registers. With D = 256 the
  accumulator needs 64 more registers per thread, so the query tile halves to 32 rows.
- Single-step decoding (T small) cannot share a key across query rows, so the tile is long in S instead:
  [16, 1, 128] (scores only) or [16, 1, 64] (fused: the [BLOCK_S, BLOCK_D] value tile sits in registers too, so
  D <= 128 there). fp32 decoding uses the exp tanh (2 MUFU ops): the factorized one saves nothing with one row.
- Rows of a small batch cannot fill the GPU; then the keys are split across programs (flash-decoding) until about
  two programs per SM are running, each split keeping at least two key tiles.
- The P @ value product uses tl.dot (tensor cores). Larger value dims (and calls that return the weights) store
  the raw scores instead and compute weights and context in a second, tanh-free kernel tiled over D.
- Pipelining the A-chunk loads (tl.range num_stages=2) raised the instruction count (5.0 vs 4.6 per tanh) without
  saving registers, so NUM_STAGES is 1; loads come from L1/L2 (each key chunk is reused by BLOCK_T query rows).
"""
from __future__ import annotations

import dataclasses

import torch

#: SM count assumed where there is no GPU to ask (the interpreter): an H100 SXM. Keeps choices reproducible.
DEFAULT_SM_COUNT = 132
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
