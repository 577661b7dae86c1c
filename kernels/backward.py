"""Fused backward tanh pass of additive attention: one recomputed tanh per element, never materialized.

Given dE = dLoss/dE [B_q, T, S] (computed without any tanh, see DESIGN.md "Backward"), and with
    t[b, i, j, a] = tanh(query_proj[b, i, a] + key_proj[m, j, a] (+ extra_key_term[b, j, a])),  m = index[b] or b,
this pass computes, in fp32,
    grad_query_proj[b, i, a] = v[a] * sum_j dE[b, i, j] * (1 - t^2)
    grad_row_keys[b, j, a]   = v[a] * sum_i dE[b, i, j] * (1 - t^2)       (per query row b: the caller scatters it
                                                                           into memory rows and uses it as d_extra)
    grad_v[a]                = sum_{b, i, j} dE[b, i, j] * t

Layout (`_attention_backward_kernel`): program = (query row b, key tile of BLOCK_S keys, A-chunk of BLOCK_A).
The key chunk (or its e^{2k}) is loaded once; the program walks the query rows in steps of BLOCK_T and, per step,
evaluates a key-major [BLOCK_S, BLOCK_T, BLOCK_A] tile. Triton spreads the last (A) dim over lanes and warps and
keeps the keys in each thread's registers (kernels/configs.py: one unit and all 32 keys per thread), so:
- grad_row_keys[tile, chunk] and the grad_v partial are accumulated elementwise in [BLOCK_S, BLOCK_A] registers and
  written once at the end;
- each query row's terms are reduced over the key tile inside each thread (no SHFL), giving this tile's share of
  grad_query_proj[rows, chunk], which is added across the key-tile programs with fp32 atomics into a zeroed
  buffer. In deterministic mode each key tile adds into its own zeroed partial [num_key_tiles, B_q, T, A] instead
  (one add onto 0 per element: exact, so order-free) and the launcher sums the partials in a fixed order.
- grad_v: each program stores its [BLOCK_A] partial in a [B_q * num_splits * num_key_tiles, A] buffer that the
  launcher sums with one `.sum(0)`: deterministic in both modes, and free of the contention that thousands of
  programs atomically adding into the same A addresses would cause. The buffer is small next to the gradients
  (192 KB for B = 32, S = 50, A = 256 with 3 splits).
- Small grids (fewer than two programs per SM) also split the query rows across programs (`num_splits`, rows in
  multiples of BLOCK_T); grad_row_keys is then added into a zeroed buffer with atomics, or into per-split zeroed
  partials [num_splits, B_q, S, A] in deterministic mode. One 4-warp program per SM would leave nothing to hide
  the latency of each step's loads.

The last key tile of a source whose length S is not a multiple of BLOCK_S (but at least BLOCK_S: KEYS_FIT) is
shifted back to end at key S: it covers keys S - BLOCK_S .. S - 1 and owns only those past the previous tile. Its dE
loads then need no key mask (every key it reads exists): its loop is the full tiles' loop without their 128-bit dE
loads (its first key is not a multiple of BLOCK_S). The keys it reads but does not own are made +inf, so that they
add nothing (1 - t^2 = 0, and in the reciprocal forms below r = 0). Only a source shorter than one tile
(S < BLOCK_S) masks its dE loads (predicated loads: keys past S read 0). Clamping the dE addresses of the keys past
S to key S - 1 instead (an earlier version) held BLOCK_S 64-bit addresses across the loop and cost 2 integer
instructions per element per step; with those masked loops in the kernel, the fp32 kernel spilled 24 B on sm_80
(issue 12).

With causal=True, dE is zero for j > i, so a key tile whose first owned key is s0 skips every query step that ends
before row s0: the tanh work is halved for T = S. With key_lengths, dE is zero at keys j >= key_lengths[m]: a key tile
lying entirely there walks no query step (its outputs are written as zeros).

tanh forms (kernels/tanh.py): the kernel evaluates one MUFU op per element on the fast path and never a second one
for the derivative.
- "factorized" (fp32): r = 1 / (1 + e^{2q} e^{2k}) with e^{2q} per query step and e^{2k} per program; then
  t = 1 - 2r and 1 - t^2 = 4 r (1 - r) = 4 fma(-r, r, r). Needs |q|, |k| <= FACTORIZED_LIMIT: checked once per
  program (all its query rows, its key chunk), else the program takes the "exp" form.
- "exp": the same r from r = 1 / (1 + e^{2(q + k)}) (2 MUFU ops), valid for any input: e^{2x} = inf gives r = 0
  and e^{2x} = 0 gives r = 1, so saturated units give t = +-1 and 1 - t^2 = 0, never NaN.
- "approx" (fp16/bf16): t = tanh.approx.f32(q + k) (1 MUFU.TANH), 1 - t^2 = fma(-t, t, 1).
Under the interpreter, "approx" evaluates the "exp" formula (inline asm cannot run there).

So the loop accumulates `hidden` h and `derivative` d with t = TANH_OFFSET + TANH_SCALE * h and
1 - t^2 = DERIVATIVE_SCALE * d; the constant factors are applied once per output, not per element:
    grad_v = TANH_OFFSET * sum(dE) + TANH_SCALE * sum(dE * h),  grad_* = DERIVATIVE_SCALE * v * sum(dE * d).

The static sm_90 figures of this kernel (registers, spills, instructions per tanh per shape and dtype) are in
benchmarks/NOTES.md ("Static figures behind the kernel configurations") and benchmarks/results/static_sm90.json.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import launch
from .configs import BACKWARD_TANH_FORMS, BackwardConfig, backward_config
from .forward import memory_row
from .tanh import FACTORIZED_LIMIT, exp2_fast, exp2x_accurate, reciprocal, tanh_pointwise, uses_reciprocal_form

_TWO_LOG2E = tl.constexpr(2.8853900817779268)  # 2 log2(e)


@triton.constexpr_function
def _tanh_offset(form: str, interpret: bool) -> float:
    """t = TANH_OFFSET + TANH_SCALE * h: the reciprocal forms give h = r with t = 1 - 2r, "approx" gives h = t."""
    return 1.0 if uses_reciprocal_form(form, interpret) else 0.0


@triton.constexpr_function
def _tanh_scale(form: str, interpret: bool) -> float:
    return -2.0 if uses_reciprocal_form(form, interpret) else 1.0


@triton.constexpr_function
def _derivative_scale(form: str, interpret: bool) -> float:
    """1 - t^2 = DERIVATIVE_SCALE * d: 4 r (1 - r) for the reciprocal forms, (1 - t^2) itself for "approx"."""
    return 4.0 if uses_reciprocal_form(form, interpret) else 1.0


@triton.jit
def _tanh_and_derivative(query_chunk, key_chunk, key_exp, FORM: tl.constexpr, INTERPRET: tl.constexpr):
    """(h, d) [BLOCK_S, BLOCK_T, BLOCK_A] fp32 for query_chunk [BLOCK_T, BLOCK_A] and key_chunk [BLOCK_S, BLOCK_A]
    (key_exp = e^{2k}, used by "factorized" only), with t = tanh(q + k) = TANH_OFFSET + TANH_SCALE * h and
    1 - t^2 = DERIVATIVE_SCALE * d. One MUFU op per element ("exp": two); the derivative is one FFMA."""
    if FORM == "factorized":
        query_exp = exp2x_accurate(query_chunk)  # [BT, BA]: e^{2q}, once per query row and unit
        r = reciprocal(key_exp[:, None, :] * query_exp[None, :, :] + 1.0, INTERPRET)  # FFMA + MUFU.RCP
        return r, r - r * r  # r (1 - r): one FFMA
    elif uses_reciprocal_form(FORM, INTERPRET):
        # q + k first: exact enough even at |q|, |k| ~ 1e4 (scaling each by 2 log2 e first would not be).
        summed = key_chunk[:, None, :] + query_chunk[None, :, :]
        r = reciprocal(exp2_fast(summed * _TWO_LOG2E, INTERPRET) + 1.0, INTERPRET)
        return r, r - r * r
    else:
        t = tanh_pointwise(key_chunk[:, None, :] + query_chunk[None, :, :], FORM, INTERPRET)
        return t, 1.0 - t * t  # fma(-t, t, 1)


@triton.jit
def _walk_query_rows(
    query_base, grad_scores_base, grad_query_base, key_chunk, key_exp, output_scale,
    offs_s64, s_valid, offs_a64, a_valid, t_begin, t_end, S, T, A, stride_qt, stride_qa, stride_et, stride_es,
    FORM: tl.constexpr, MASK_KEYS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The hot loop: query rows t_begin..t_end-1 in steps of BLOCK_T against one key tile and A-chunk.

    key_chunk, key_exp [BLOCK_S, BLOCK_A] fp32 (key_exp = e^{2k} for FORM == "factorized"); output_scale [BLOCK_A]
    = DERIVATIVE_SCALE * v. grad_query_base [BLOCK_A] points at grad_query[b, 0, chunk] (or this key tile's partial);
    each step atomically adds grad_query of its rows there. Returns the accumulators
    (sum_i dE d [BS, BA], sum_i dE h [BS, BA], sum_i dE [BS, BT]); the last two still include the keys the
    program does not own.

    MASK_KEYS=False promises that every key of the tile exists (offs_s64 < S); the keys the program does not own
    were made +inf by the caller, which makes 1 - t^2 exactly 0 in every form (and t = 0 in the reciprocal forms),
    so they add nothing to grad_query_proj or grad_row_keys. With MASK_KEYS (S < BLOCK_S only), keys past S
    read dE = 0 (predicated loads).
    """
    grad_keys_acc = tl.zeros([BLOCK_S, BLOCK_A], dtype=tl.float32)
    grad_v_acc = tl.zeros([BLOCK_S, BLOCK_A], dtype=tl.float32)
    grad_scores_acc = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    grad_scores_rows = grad_scores_base + offs_s64 * stride_es  # [BS]: dE[b, 0, tile]
    if MASK_KEYS:
        load_mask = s_valid
    else:
        load_mask = tl.full([BLOCK_S], True, tl.int1)
    query_columns = query_base + offs_a64 * stride_qa  # [BA]: query_proj[b, 0, chunk]
    for t_start in range(t_begin, t_end, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        t_valid = offs_t < T  # all true for BLOCK_T = 1 (the default); t_end is a multiple of BLOCK_T or T
        offs_t64 = offs_t.to(tl.int64)
        query_chunk = tl.load(query_columns[None, :] + offs_t64[:, None] * stride_qt,
                              mask=t_valid[:, None] & a_valid[None, :], other=0.0).to(tl.float32)  # [BT, BA]
        # [BS, BT] fp32; rows past T read 0 (only with BLOCK_T > 1), keys past S (MASK_KEYS) too
        grad_scores_tile = tl.load(grad_scores_rows[:, None] + offs_t64[None, :] * stride_et,
                                   mask=load_mask[:, None] & t_valid[None, :], other=0.0)
        hidden, derivative = _tanh_and_derivative(query_chunk, key_chunk, key_exp, FORM, INTERPRET)

        weighted = grad_scores_tile[:, :, None] * derivative  # dE d  [BS, BT, BA]
        grad_keys_acc += tl.sum(weighted, axis=1)
        grad_v_acc += tl.sum(grad_scores_tile[:, :, None] * hidden, axis=1)
        grad_scores_acc += grad_scores_tile

        # This key tile's share of grad_query_proj[b, rows, chunk]: reduced over the keys (inside each thread),
        # added across the key-tile programs.
        grad_query_tile = tl.sum(weighted, axis=0) * output_scale[None, :]  # [BT, BA]
        query_pointers = grad_query_base[None, :] + offs_t64[:, None] * A
        # Into a zeroed buffer. In deterministic mode the buffer is this key tile's own partial: each element then
        # gets exactly one add onto 0, which is exact, so the order of the programs cannot change the result. (With
        # a plain store there instead, an earlier version of this kernel got capped at 168 registers by ptxas and
        # spilled; one code path for both modes also means one compiled kernel.)
        tl.atomic_add(query_pointers, grad_query_tile, mask=t_valid[:, None] & a_valid[None, :], sem="relaxed")
    return grad_keys_acc, grad_v_acc, grad_scores_acc


@triton.jit
def _attention_backward_kernel(
    # inputs: query_proj [B_q, T, A], key_proj [B_m, S, A], v [A], extra_key_term [B_q, S, A] (placeholder without
    # HAS_EXTRA), index [B_q] (placeholder without HAS_INDEX), key_lengths [B_m] (placeholder without HAS_LENGTHS),
    # grad_scores dE [B_q, T, S] fp32
    query_proj, key_proj, v, extra_key_term, index, key_lengths, grad_scores,
    # outputs, fp32, contiguous: grad_query [B_q, T, A] or its per-key-tile partials [num_key_tiles, B_q, T, A]
    # (deterministic mode; stride_gq_tile = B_q * T * A, else 0), zero-initialized; grad_row_keys [B_q, S, A],
    # or with SPLIT_ROWS zero-initialized and, in deterministic mode, per-split partials [num_splits, B_q, S, A]
    # (stride_gk_split = B_q * S * A); grad_v_partial [B_q * num_key_tiles * num_splits, A]
    grad_query, grad_row_keys, grad_v_partial,
    stride_qb, stride_qt, stride_qa,
    stride_kb, stride_ks, stride_ka,
    stride_xb, stride_xs, stride_xa,
    stride_eb, stride_et, stride_es,
    stride_va, stride_index, stride_lengths, stride_gq_tile, stride_gk_split,
    T, S, A, rows_per_split, num_splits,
    HAS_EXTRA: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr, CAUSAL: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, KEYS_FIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    TANH_FORM: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program = (query row b, split of the query rows, key tile, A-chunk), on one grid axis with the A-chunk
    fastest: the programs that read the same dE rows run side by side (L2 reuse). KEYS_FIT promises S >= BLOCK_S
    (the last key tile is shifted back instead of masked). See the module docstring."""
    num_a_chunks = tl.cdiv(A, BLOCK_A)
    num_key_tiles = tl.cdiv(S, BLOCK_S)
    pid = tl.program_id(0)
    a_chunk = pid % num_a_chunks
    key_tile = (pid // num_a_chunks) % num_key_tiles
    split = (pid // (num_a_chunks * num_key_tiles)) % num_splits
    batch = pid // (num_a_chunks * num_key_tiles * num_splits)  # query row b

    # Batch and row offsets in int64: b * stride overflows int32 on large tensors.
    batch64 = batch.to(tl.int64)
    memory = memory_row(batch64, index, stride_index, HAS_INDEX)
    query_base = query_proj + batch64 * stride_qb
    grad_scores_base = grad_scores + batch64 * stride_eb

    # Unit and key offsets in int64 too: they multiply strides below.
    offs_a64 = a_chunk.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_valid = offs_a64 < A
    # The keys this program owns start at tile_start; it reads the BLOCK_S keys from key_start: the same, except for
    # the last tile with KEYS_FIT, which ends at key S instead of past it (module docstring).
    tile_start = key_tile * BLOCK_S
    tile_offsets = tile_start.to(tl.int64) + tl.arange(0, BLOCK_S)  # known multiple of BLOCK_S: aligned dE loads
    if KEYS_FIT:
        key_start = tl.minimum(tile_start, S - BLOCK_S)
        offs_s64 = key_start.to(tl.int64) + tl.arange(0, BLOCK_S)
        s_valid = offs_s64 >= tile_start  # the keys this program owns (every key read exists)
    else:
        offs_s64 = tile_offsets
        s_valid = offs_s64 < S

    # The key chunk [BS, BA], loaded once. Units past A read 0 (finite; their outputs are masked). Keys not owned
    # (the shifted last tile's first keys, or keys past S) become +inf: t = 1 and 1 - t^2 = 0 exactly in every form
    # (1 / (1 + inf) = 0, tanh(inf) = 1), so the hot loop needs no key mask (see _walk_query_rows).
    key_mask = s_valid[:, None] & a_valid[None, :]

    if HAS_LENGTHS:
        # dE[b, :, j] = 0 for keys at or beyond the memory row's length: a key tile lying entirely there does no
        # tanh work. Its outputs are written as zeros (grad_query and split-row grad_row_keys are zeroed buffers)
        # and the program ends here. (An early return rather than an empty query walk: cutting the walk's bound
        # instead cost 0.6-0.75 instructions per tanh and 8-16 B of spills on sm_90.)
        key_length = tl.load(key_lengths + memory * stride_lengths).to(tl.int32)
        if tile_start >= key_length:
            if not SPLIT_ROWS:
                tl.store(grad_row_keys + (batch64 * S + offs_s64[:, None]) * A + offs_a64[None, :],
                         tl.zeros([BLOCK_S, BLOCK_A], dtype=tl.float32), mask=key_mask)
            partial_row = (batch64 * num_splits + split) * num_key_tiles + key_tile
            tl.store(grad_v_partial + partial_row * A + offs_a64, tl.zeros([BLOCK_A], dtype=tl.float32),
                     mask=a_valid)
            return
    key_chunk = tl.load(
        key_proj + memory * stride_kb + offs_s64[:, None] * stride_ks + offs_a64[None, :] * stride_ka,
        mask=key_mask, other=0.0,
    ).to(tl.float32)
    if HAS_EXTRA:
        key_chunk += tl.load(
            extra_key_term + batch64 * stride_xb + offs_s64[:, None] * stride_xs + offs_a64[None, :] * stride_xa,
            mask=key_mask, other=0.0,
        ).to(tl.float32)
    key_magnitude = tl.abs(key_chunk)  # 0 at the keys not owned
    key_chunk = tl.where(s_valid[:, None], key_chunk, float("inf"))

    # This program's query rows: its split (a multiple of BLOCK_T rows). With causal, dE[i, j] = 0 for j > i:
    # query steps that end before the tile's first key contribute nothing and are skipped.
    t_begin = split * rows_per_split
    t_end = tl.minimum(t_begin + rows_per_split, T)
    if CAUSAL:
        t_begin = tl.maximum(t_begin, tile_start // BLOCK_T * BLOCK_T)

    # The factorized form needs |q|, |k| <= FACTORIZED_LIMIT (kernels/tanh.py): checked once for the whole program
    # (its key chunk and every query row it visits), so the hot loop branches on a program-uniform flag.
    if TANH_FORM == "factorized":
        # e^{2k} [BS, BA], +inf at the keys not owned; the clamp only keeps out-of-range keys (which take the exp
        # form) finite.
        key_exp = exp2x_accurate(tl.minimum(tl.maximum(key_chunk, -FACTORIZED_LIMIT), FACTORIZED_LIMIT))
        key_exp = tl.where(s_valid[:, None], key_exp, float("inf"))
        query_absmax = tl.zeros([BLOCK_T, BLOCK_A], dtype=tl.float32)
        for t_start in range(t_begin, t_end, BLOCK_T):
            offs_t = t_start + tl.arange(0, BLOCK_T)
            query_chunk = tl.load(
                query_base + offs_t.to(tl.int64)[:, None] * stride_qt + offs_a64[None, :] * stride_qa,
                mask=(offs_t < T)[:, None] & a_valid[None, :], other=0.0,
            ).to(tl.float32)
            query_absmax = tl.maximum(query_absmax, tl.abs(query_chunk))
        in_range = ((tl.max(tl.max(query_absmax, axis=1), axis=0) <= FACTORIZED_LIMIT)
                    & (tl.max(tl.max(key_magnitude, axis=1), axis=0) <= FACTORIZED_LIMIT))
    else:
        key_exp = key_chunk  # unused

    # Per-output factors, applied once per output element instead of once per tanh.
    v_chunk = tl.load(v + offs_a64 * stride_va, mask=a_valid, other=0.0).to(tl.float32)
    output_scale = v_chunk * _derivative_scale(TANH_FORM, INTERPRET)  # [BA]

    # The branches are taken once per program, outside the query loop: a branch inside it made Triton re-convert
    # the loop-invariant key tile through shared memory on every step. Full key tiles (all but the last) load dE
    # from offsets known to be multiples of BLOCK_S (128-bit loads); the shifted last tile loads it unaligned and,
    # like full tiles, without a key mask; only S < BLOCK_S masks (MASK_KEYS = not KEYS_FIT).
    # [BA]: grad_query[b, 0, chunk], or this key tile's partial (stride_gq_tile = 0 with atomics)
    query_offsets = key_tile.to(tl.int64) * stride_gq_tile + batch64 * T * A + offs_a64
    full_tile = (key_tile + 1) * BLOCK_S <= S
    if TANH_FORM == "factorized":
        if in_range:
            if full_tile:
                grad_keys_acc, grad_v_acc, grad_scores_acc = _walk_query_rows(
                    query_base, grad_scores_base, grad_query + query_offsets, key_chunk, key_exp, output_scale,
                    tile_offsets, s_valid, offs_a64, a_valid, t_begin, t_end, S, T, A,
                    stride_qt, stride_qa, stride_et, stride_es,
                    "factorized", False, BLOCK_T, BLOCK_S, BLOCK_A, INTERPRET)
            else:
                grad_keys_acc, grad_v_acc, grad_scores_acc = _walk_query_rows(
                    query_base, grad_scores_base, grad_query + query_offsets, key_chunk, key_exp, output_scale,
                    offs_s64, s_valid, offs_a64, a_valid, t_begin, t_end, S, T, A,
                    stride_qt, stride_qa, stride_et, stride_es,
                    "factorized", not KEYS_FIT, BLOCK_T, BLOCK_S, BLOCK_A, INTERPRET)
        else:  # saturated inputs: the exp form, which is rare enough to take one loop for every tile
            grad_keys_acc, grad_v_acc, grad_scores_acc = _walk_query_rows(
                query_base, grad_scores_base, grad_query + query_offsets, key_chunk, key_exp, output_scale,
                offs_s64, s_valid, offs_a64, a_valid, t_begin, t_end, S, T, A,
                stride_qt, stride_qa, stride_et, stride_es,
                "exp", not KEYS_FIT, BLOCK_T, BLOCK_S, BLOCK_A, INTERPRET)
    else:
        if full_tile:
            grad_keys_acc, grad_v_acc, grad_scores_acc = _walk_query_rows(
                query_base, grad_scores_base, grad_query + query_offsets, key_chunk, key_exp, output_scale,
                tile_offsets, s_valid, offs_a64, a_valid, t_begin, t_end, S, T, A,
                stride_qt, stride_qa, stride_et, stride_es,
                TANH_FORM, False, BLOCK_T, BLOCK_S, BLOCK_A, INTERPRET)
        else:
            grad_keys_acc, grad_v_acc, grad_scores_acc = _walk_query_rows(
                query_base, grad_scores_base, grad_query + query_offsets, key_chunk, key_exp, output_scale,
                offs_s64, s_valid, offs_a64, a_valid, t_begin, t_end, S, T, A,
                stride_qt, stride_qa, stride_et, stride_es,
                TANH_FORM, not KEYS_FIT, BLOCK_T, BLOCK_S, BLOCK_A, INTERPRET)

    # grad_row_keys[b, j, a]: every element of the tile is written (zeros for a tile no query row reaches). With
    # split rows, the splits add into a zeroed buffer, or into their own zeroed partial (deterministic mode).
    grad_keys = grad_keys_acc * output_scale[None, :]
    grad_keys_pointers = (grad_row_keys + split.to(tl.int64) * stride_gk_split
                          + (batch64 * S + offs_s64[:, None]) * A + offs_a64[None, :])
    if SPLIT_ROWS:
        tl.atomic_add(grad_keys_pointers, grad_keys, mask=key_mask, sem="relaxed")
    else:
        tl.store(grad_keys_pointers, grad_keys, mask=key_mask)

    # grad_v partial of this program: sum over its keys (not those it does not own, which read another's dE),
    # then the constant part TANH_OFFSET * sum(dE).
    grad_v_acc = tl.where(s_valid[:, None], grad_v_acc, 0.0)
    grad_scores_total = tl.sum(tl.sum(tl.where(s_valid[:, None], grad_scores_acc, 0.0), axis=1), axis=0)
    grad_v = (_tanh_offset(TANH_FORM, INTERPRET) * grad_scores_total
              + _tanh_scale(TANH_FORM, INTERPRET) * tl.sum(grad_v_acc, axis=0))
    partial_row = (batch64 * num_splits + split) * num_key_tiles + key_tile
    tl.store(grad_v_partial + partial_row * A + offs_a64, grad_v, mask=a_valid)


@dataclasses.dataclass
class BackwardPlan:
    """The outputs (allocated, not yet written), the launches that write them, and the buffers summed after."""

    grad_query: torch.Tensor  # [1 or num_key_tiles (deterministic), B_q, T, A] fp32, summed over dim 0 after
    grad_row_keys: torch.Tensor  # [1 or num_splits (split rows and deterministic), B_q, S, A] fp32, likewise
    grad_v_partial: torch.Tensor  # [B_q * num_splits * num_key_tiles, A] fp32, likewise
    deterministic: bool
    config: BackwardConfig
    launches: list[launch.KernelLaunch]


def plan_backward(query_proj, key_proj, v, grad_scores, *, index=None, extra_key_term=None, key_lengths=None,
                  causal=False, deterministic=False, interpret=False, tanh_form=None, num_splits=None,
                  config=None) -> BackwardPlan:
    """Allocate the outputs of `attention_backward_tanh_pass` and list its launch (works on meta tensors, which
    is how benchmarks/static_report.py gets real launch arguments without a GPU). `config` replaces the heuristic."""
    query_rows, tgt_len, attn_dim = query_proj.shape
    src_len = key_proj.shape[1]
    device = query_proj.device
    if config is None:
        config = backward_config(query_rows=query_rows, tgt_len=tgt_len, src_len=src_len, attn_dim=attn_dim,
                                 dtype=query_proj.dtype, sm_count=launch.sm_count(device), tanh_form=tanh_form,
                                 num_splits=num_splits)
    if config.tanh_form not in BACKWARD_TANH_FORMS:
        raise ValueError(f"tanh_form must be one of {BACKWARD_TANH_FORMS}, got {config.tanh_form!r}")
    num_key_tiles = triton.cdiv(src_len, config.block_s)
    num_a_chunks = triton.cdiv(attn_dim, config.block_a)
    # Each split covers whole query steps; splits that would be empty are dropped.
    rows_per_split = triton.cdiv(triton.cdiv(max(tgt_len, 1), config.num_splits), config.block_t) * config.block_t
    num_splits = max(1, triton.cdiv(tgt_len, rows_per_split))  # T = 0: one (empty) split writes the zeros
    split_rows = num_splits > 1

    # Atomics need a zeroed target; partials are zero where causal skips a (key tile, query step) pair. Every
    # other buffer is written in full by the kernel.
    def zeros(*shape):
        return torch.zeros(shape, dtype=torch.float32, device=device)

    partials = num_key_tiles if deterministic else 1
    grad_query = zeros(partials, query_rows, tgt_len, attn_dim)
    if split_rows:
        grad_row_keys = zeros(num_splits if deterministic else 1, query_rows, src_len, attn_dim)
    else:
        grad_row_keys = launch.empty_buffer((1, query_rows, src_len, attn_dim), torch.float32, device)
    grad_v_partial = launch.empty_buffer((query_rows * num_splits * num_key_tiles, attn_dim), torch.float32,
                                           device)
    plan = BackwardPlan(grad_query, grad_row_keys, grad_v_partial, deterministic, config, [])
    programs = query_rows * num_splits * num_key_tiles * num_a_chunks
    if programs == 0:
        return plan

    def strides(tensor, count=3):
        return (0,) * count if tensor is None else tensor.stride()

    plan.launches.append(launch.KernelLaunch(
        kernel=_attention_backward_kernel,
        grid=(programs,),
        arguments=dict(
            query_proj=query_proj, key_proj=key_proj, v=v,
            extra_key_term=query_proj if extra_key_term is None else extra_key_term,
            index=query_proj if index is None else index,
            key_lengths=query_proj if key_lengths is None else key_lengths,
            grad_scores=grad_scores,
            grad_query=grad_query, grad_row_keys=grad_row_keys, grad_v_partial=grad_v_partial,
            **dict(zip(("stride_qb", "stride_qt", "stride_qa"), query_proj.stride())),
            **dict(zip(("stride_kb", "stride_ks", "stride_ka"), key_proj.stride())),
            **dict(zip(("stride_xb", "stride_xs", "stride_xa"), strides(extra_key_term))),
            **dict(zip(("stride_eb", "stride_et", "stride_es"), grad_scores.stride())),
            stride_va=v.stride(0), stride_index=0 if index is None else index.stride(0),
            stride_lengths=0 if key_lengths is None else key_lengths.stride(0),
            stride_gq_tile=query_rows * tgt_len * attn_dim if deterministic else 0,
            stride_gk_split=query_rows * src_len * attn_dim if deterministic and split_rows else 0,
            T=tgt_len, S=src_len, A=attn_dim, rows_per_split=rows_per_split, num_splits=num_splits,
            HAS_EXTRA=extra_key_term is not None, HAS_INDEX=index is not None, HAS_LENGTHS=key_lengths is not None,
            CAUSAL=causal, SPLIT_ROWS=split_rows, KEYS_FIT=src_len >= config.block_s,
            BLOCK_T=config.block_t, BLOCK_S=config.block_s, BLOCK_A=config.block_a,
            TANH_FORM=config.tanh_form, INTERPRET=interpret,
        ),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    ))
    return plan


#: dE rows padded to a multiple of this many fp32 elements (64 bytes) let Triton prove 16-byte alignment: a thread's
#: 32 dE values of a row then load as 8 x 128-bit instead of 32 scalar loads (nmt_train, S = 50: 7.84 instead of
#: 8.56 instructions per tanh in the full-tile loop).
GRAD_SCORES_ROW_ALIGN = 16


def grad_scores_buffer(query_rows: int, tgt_len: int, src_len: int, device) -> torch.Tensor:
    """An uninitialized fp32 [B_q, T, S] tensor for dE whose row stride is a multiple of GRAD_SCORES_ROW_ALIGN
    (a view of a [B_q, T, S_padded] buffer; the kernel never reads the padding). Writing dE into it (e.g. with
    `out=`) instead of passing a contiguous [B_q, T, S] tensor makes the backward's dE loads vectorized when S is
    not already a multiple of 16."""
    padded = triton.cdiv(src_len, GRAD_SCORES_ROW_ALIGN) * GRAD_SCORES_ROW_ALIGN
    return launch.empty_buffer((query_rows, tgt_len, padded), torch.float32, device)[:, :, :src_len]


def _check_inputs(query_proj, key_proj, v, grad_scores, index, extra_key_term, key_lengths=None):
    query_rows, tgt_len, attn_dim = query_proj.shape
    if key_proj.dim() != 3 or key_proj.shape[2] != attn_dim:
        raise ValueError(f"key_proj must be [B_m, S, {attn_dim}], got {tuple(key_proj.shape)}")
    src_len = key_proj.shape[1]
    if v.shape != (attn_dim,):
        raise ValueError(f"v must be [{attn_dim}], got {tuple(v.shape)}")
    if grad_scores.shape != (query_rows, tgt_len, src_len) or grad_scores.dtype != torch.float32:
        raise ValueError(f"grad_scores must be fp32 [{query_rows}, {tgt_len}, {src_len}], "
                         f"got {grad_scores.dtype} {tuple(grad_scores.shape)}")
    for name, tensor in (("key_proj", key_proj), ("v", v), ("extra_key_term", extra_key_term)):
        if tensor is not None and tensor.dtype != query_proj.dtype:
            raise ValueError(f"{name} must have the dtype of query_proj ({query_proj.dtype}), got {tensor.dtype}")
    if query_proj.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton kernels take fp32, fp16 or bf16, got {query_proj.dtype}")
    if extra_key_term is not None and extra_key_term.shape != (query_rows, src_len, attn_dim):
        raise ValueError(f"extra_key_term must be [{query_rows}, {src_len}, {attn_dim}], "
                         f"got {tuple(extra_key_term.shape)}")
    if index is None:
        if key_proj.shape[0] != query_rows:
            raise ValueError("without index, key_proj must have one row per query row")
    elif index.shape != (query_rows,) or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"index must be an integer tensor [{query_rows}], got {index.dtype} {tuple(index.shape)}")
    if key_lengths is not None and (key_lengths.shape != (key_proj.shape[0],) or key_lengths.dtype.is_floating_point
                                    or key_lengths.dtype == torch.bool):
        raise ValueError(f"key_lengths must be an integer tensor [{key_proj.shape[0]}], "
                         f"got {key_lengths.dtype} {tuple(key_lengths.shape)}")


def attention_backward_tanh_pass(query_proj, key_proj, v, grad_scores, *, index=None, extra_key_term=None,
                                 key_lengths=None, causal=False, deterministic=None, tanh_form=None, num_splits=None,
                                 config=None, wrap=None):
    """The one tanh pass of the backward: gradients through t = tanh(query_proj + key_proj (+ extra_key_term)).

    query_proj [B_q, T, A], key_proj [B_m, S, A], v [A], extra_key_term [B_q, S, A] or None: one dtype among
    fp32/fp16/bf16, any strides. index [B_q] integer or None: query row b reads key row index[b].
    grad_scores dE [B_q, T, S] fp32, any strides, already 0 at hidden positions and in rows without visible key.
    causal=True promises dE[b, i, j] = 0 for j > i, and skips that work. key_lengths [B_m] integer or None promises
    dE[b, :, j] = 0 for j >= key_lengths[m] (m = index[b] or b): key tiles lying entirely there are skipped (their
    outputs are zeros, whatever dE holds there).
    deterministic: None follows `torch.are_deterministic_algorithms_enabled()`. True: each key tile adds into its
    own zeroed partial of grad_query_proj (one add per element: exact) and the partials are summed in a fixed
    order, so results are bit-identical on repeat; False: all key tiles add into one buffer with fp32 atomics.
    tanh_form / num_splits / config override kernels/configs.py (tests, benchmarks). wrap: see
    `kernels.launch.run_launches`.

    Returns (grad_query_proj [B_q, T, A], grad_row_keys [B_q, S, A], grad_v [A]), fp32 — see the module
    docstring for the formulas. grad_row_keys is per query row: the caller scatters it into the memory rows
    (index_add) and uses it as the gradient of extra_key_term. Nothing of size B*T*S*A is allocated.
    """
    _check_inputs(query_proj, key_proj, v, grad_scores, index, extra_key_term, key_lengths)
    device = query_proj.device
    interpret = launch.require_runnable(device)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    plan = plan_backward(query_proj, key_proj, v, grad_scores, index=index, extra_key_term=extra_key_term,
                         key_lengths=key_lengths, causal=causal, deterministic=deterministic, interpret=interpret,
                         tanh_form=tanh_form, num_splits=num_splits, config=config)
    launch.run_launches(plan.launches, device, wrap)
    # Fixed-order sums (deterministic on every device) of the partials; a single partial is just unwrapped.
    def total(partials):
        return partials[0] if partials.shape[0] == 1 else partials.sum(0)

    return total(plan.grad_query), total(plan.grad_row_keys), plan.grad_v_partial.sum(0)
