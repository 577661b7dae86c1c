"""Fused forward of additive attention: Triton kernels and their launcher.

    E[b, i, j]       = sum_a v[a] * tanh(query_proj[b, i, a] + key_proj[m, j, a] (+ extra_key_term[b, j, a]))
    P[b, i, :]       = softmax of E[b, i, :] over the keys visible to query i
    context[b, i, :] = sum_j P[b, i, j] * value[m, j, :]          (m = index[b], or b without index)

Kernels (see DESIGN.md, "Forward kernel"):
- `_attention_forward_kernel`: program = (query row b, tile of BLOCK_T query rows, key split). It loops over key
  tiles of BLOCK_S, computes the scores chunk by chunk over A in registers (the [B, T, S, A] tanh tensor never
  exists), and then either
    fuse_context: keeps an online softmax (running max m, sum l) and the context accumulator acc += P @ value, or
    scores mode:  stores the raw scores E (-inf where hidden) and only the softmax statistics.
  With one split it writes the final context and lse; with several it writes partial (m, l, acc) per split.
- `_attention_forward_prepared_kernel`: the same program (`_attention_forward_program`) with prepared keys
  (HAS_KEY_EXP): a decoding memory's e^{2k}, or those `_key_exponentials_kernel` writes for an fp32 all-steps call
  (CHECK_KEY_RANGE); the factorized tanh loads e^{2k} and c e^{2q} from a per-program scratch row written in its
  prologue, 1 MUFU op per element (fp32 decode: instead of the exp form's 2).
- `_combine_splits_kernel`: merges the partial (m, l, acc) of the key splits of a fused context (flash-decoding);
  in scores mode the second pass merges the splits' (m, l) itself, so a call is at most three launches.
- `_context_from_scores_kernel`: scores mode's second pass, without tanh: P = exp(E - max) / sum (the row's
  softmax statistics, exact at any score magnitude), context = P @ value tiled over D, and the weights P when asked
  for.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import launch
from .configs import MAX_COMBINE_SPLITS, ForwardConfig, context_config, forward_config, next_power_of_2
from .tanh import (
    FACTORIZED_LIMIT,
    FACTORIZED_V_LIMIT,
    TANH_FORMS,
    chunk_scores,
    exp2x_accurate,
    reciprocal,
    score_bias,
    score_weights,
    uses_reciprocal_form,
)


@triton.jit
def _probs_times_value(probs, value_tile, acc, INTERPRET: tl.constexpr):
    """acc + probs @ value_tile on the tensor cores, fp32 accumulation.

    fp32: tf32x3 keeps fp32 accuracy on the tensor cores ("ieee" would move the product onto the FMA pipe the
    tanh loop needs, and plain tf32 costs ~1e-3). fp16/bf16: P is rounded to the value dtype as in FlashAttention.
    Under the interpreter (Triton 3.9) tl.dot on bf16 operands returns garbage, so everything is fp32 there."""
    if INTERPRET:
        return tl.dot(probs, value_tile.to(tl.float32), acc, input_precision="ieee")
    elif value_tile.dtype == tl.float32:
        return tl.dot(probs, value_tile, acc, input_precision="tf32x3")
    else:
        return tl.dot(probs.to(value_tile.dtype), value_tile, acc)


@triton.jit
def _score_vector_kernel(
    v, stride_va, score_vector, score_scalars, A, A_PADDED,
    TANH_FORM: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """One program: score_vector[a] = tanh.score_weights(v[a]) (fp32, contiguous, padded with the weight of v = 0
    up to A_PADDED, so the hot loop loads whole chunks without a mask), score_scalars = (score bias, max |v|).
    Done once per call so that the hot loop loads ready-made weights."""
    _write_score_vector(v, stride_va, score_vector, score_scalars, A, A_PADDED, TANH_FORM, INTERPRET, BLOCK_A)


@triton.jit
def _write_score_vector(
    v, stride_va, score_vector, score_scalars, A, A_PADDED,
    TANH_FORM: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """The body of `_score_vector_kernel` (also run by one program of `_key_exponentials_kernel`)."""
    v_total = tl.zeros([BLOCK_A], dtype=tl.float32)
    v_absmax = tl.zeros([BLOCK_A], dtype=tl.float32)
    for a_start in range(0, A_PADDED, BLOCK_A):
        offs_a = a_start + tl.arange(0, BLOCK_A)
        v_chunk = tl.load(v + offs_a.to(tl.int64) * stride_va, mask=offs_a < A, other=0.0).to(tl.float32)
        tl.store(score_vector + offs_a, score_weights(v_chunk, TANH_FORM, INTERPRET), mask=offs_a < A_PADDED)
        v_total += v_chunk
        v_absmax = tl.maximum(v_absmax, tl.abs(v_chunk))
    tl.store(score_scalars, score_bias(tl.sum(v_total, axis=0), TANH_FORM, INTERPRET))
    tl.store(score_scalars + 1, tl.max(v_absmax, axis=0))


@triton.jit
def _key_exponentials_kernel(
    key_proj, key_exp, key_absmax,  # [B_m, S, A] any strides; outputs [B_m, S, A] and [B_m, S] fp32, contiguous
    stride_kb, stride_ks, stride_ka, S, A,
    v, stride_va, score_vector, score_scalars, A_PADDED,  # WRITE_SCORE_VECTOR: as `_score_vector_kernel`'s
    WRITE_SCORE_VECTOR: tl.constexpr, TANH_FORM: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program = (memory row, tile of BLOCK_S keys): key_exp = e^{2 key_proj} (`tanh.exp2x_accurate`, the formula the
    score loop would use) and key_absmax[m, j] = max_a |key_proj[m, j, a]|, for all-steps calls whose fp32 score
    kernel loads the key factors instead of computing them in every query tile (`ForwardConfig.prepare_keys`). The
    score kernel checks key_absmax per key tile and takes the exp form from key_proj where a key is out of the
    factorized range, so nothing here needs to be in range.
    WRITE_SCORE_VECTOR: program (0, 0) also does the v pre-pass (`_score_vector_kernel`, BLOCK_V units a chunk), so
    that the key pre-pass adds no launch to the call."""
    if WRITE_SCORE_VECTOR:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            _write_score_vector(v, stride_va, score_vector, score_scalars, A, A_PADDED, TANH_FORM, INTERPRET,
                                BLOCK_V)
    memory = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_valid = offs_s < S
    key_rows = key_proj + memory * stride_kb + offs_s.to(tl.int64) * stride_ks  # [BS]
    exp_rows = key_exp + (memory * S + offs_s.to(tl.int64)) * A  # [BS]
    absmax = tl.zeros([BLOCK_S, BLOCK_A], dtype=tl.float32)
    for a_start in range(0, A, BLOCK_A):
        offs_a = a_start + tl.arange(0, BLOCK_A)
        valid = s_valid[:, None] & (offs_a < A)[None, :]
        keys = tl.load(key_rows[:, None] + offs_a.to(tl.int64)[None, :] * stride_ka, mask=valid,
                       other=0.0).to(tl.float32)
        tl.store(exp_rows[:, None] + offs_a[None, :], exp2x_accurate(keys), mask=valid)
        absmax = tl.maximum(absmax, tl.abs(keys))
    tl.store(key_absmax + memory * S + offs_s, tl.max(absmax, axis=1), mask=s_valid)


@triton.jit
def memory_row(batch64, index, stride_index, HAS_INDEX: tl.constexpr):
    """The memory row (int64) that query row `batch64` reads: index[b] with beam search, else b itself."""
    if HAS_INDEX:
        return tl.load(index + batch64 * stride_index).to(tl.int64)
    else:
        return batch64


@triton.jit
def _load_key_chunk(key_base, extra_base, a_start, key_rows_offset, offs_s, s_valid, A, stride_ka, stride_xa,
                    stride_xs, HAS_EXTRA: tl.constexpr, BLOCK_A: tl.constexpr):
    """The key tile's A-chunk [BLOCK_A, BLOCK_S] fp32, with extra_key_term added (0 past A and past the keys)."""
    offs_a64 = (a_start + tl.arange(0, BLOCK_A)).to(tl.int64)
    a_valid = offs_a64 < A
    key_chunk = tl.load(
        key_base + offs_a64[:, None] * stride_ka + key_rows_offset[None, :],
        mask=a_valid[:, None] & s_valid[None, :], other=0.0,
    ).to(tl.float32)  # [BA, BS]
    if HAS_EXTRA:
        # Location/coverage term, added in registers: key_proj is shared by the beams, this is not.
        key_chunk += tl.load(
            extra_base + offs_a64[:, None] * stride_xa + offs_s.to(tl.int64)[None, :] * stride_xs,
            mask=a_valid[:, None] & s_valid[None, :], other=0.0,
        ).to(tl.float32)
    return key_chunk


@triton.jit
def _prepared_key_chunk_scores(query_factor_chunk, key_exp_chunk, weight_chunk, INTERPRET: tl.constexpr):
    """`tanh.chunk_scores` in the factorized form with both factors given: query_factor_chunk [BLOCK_A, BLOCK_T] =
    c e^{2q} (written once per program by `_attention_forward_kernel`'s prologue) and key_exp_chunk
    [BLOCK_A, BLOCK_S] = e^{2k} (the decoding memory's prepared keys, in range by `functional.prepare_key_exp`).
    Per element one FFMA, one MUFU.RCP and one add, and no exponential at all: with one query row per program each
    thread holds one key and all BLOCK_A units, so an e^{2q} computed here would cost one EX2 per element."""
    scale = weight_chunk  # c = -1 / (2 v)
    denominator = query_factor_chunk[:, :, None] * key_exp_chunk[:, None, :] + scale[:, None, None]  # one FFMA
    return tl.sum(reciprocal(denominator, INTERPRET), axis=0)


@triton.jit
def _key_tile_scores(
    tile_scores, query_base, key_base, extra_base, score_vector, query_rows_offset, t_valid,
    key_rows_offset, offs_s, s_valid, A, stride_qa, stride_ka, stride_xa, stride_xs,
    HAS_EXTRA: tl.constexpr, NUM_STAGES: tl.constexpr, FORM: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_A: tl.constexpr, PREPARED: tl.constexpr = False, key_exp_base=None, key_exp_rows_offset=None,
    stride_ea=0, query_factor_base=None, query_factor_rows_offset=None,
):
    """The hot loop: tile_scores [BLOCK_T, BLOCK_S] + the scores of one (query tile, key tile) pair, chunk by chunk
    over A in one tanh form (the caller checked the factorized form's ranges). PREPARED (factorized form only): the
    key operand e^{2k} is loaded from the memory's key_exp (`key_exp_base`, rows at `key_exp_rows_offset`, stride
    `stride_ea` along A) and the query operand c e^{2q} from the program's scratch (`query_factor_base`, rows at
    `query_factor_rows_offset`, contiguous along A, padded to whole chunks) instead of computed."""
    for a_start in tl.range(0, A, BLOCK_A, num_stages=NUM_STAGES):
        offs_a = a_start + tl.arange(0, BLOCK_A)
        a_valid = offs_a < A
        if PREPARED:
            query_factor_chunk = tl.load(
                query_factor_base + offs_a.to(tl.int64)[:, None] + query_factor_rows_offset[None, :],
                mask=t_valid[None, :], other=0.0,
            )  # [BA, BT] c e^{2q}, padded A included
            # e^{2k}; 1 = e^{2*0} past A and past the keys, as key_proj's 0 there would give.
            key_exp_chunk = tl.load(
                key_exp_base + offs_a.to(tl.int64)[:, None] * stride_ea + key_exp_rows_offset[None, :],
                mask=a_valid[:, None] & s_valid[None, :], other=1.0,
            ).to(tl.float32)  # [BA, BS]
            weight_chunk = tl.load(score_vector + offs_a)  # [BA] fp32, padded to whole chunks
            tile_scores += _prepared_key_chunk_scores(query_factor_chunk, key_exp_chunk, weight_chunk, INTERPRET)
        else:
            query_chunk = tl.load(
                query_base + offs_a.to(tl.int64)[:, None] * stride_qa + query_rows_offset[None, :],
                mask=a_valid[:, None] & t_valid[None, :], other=0.0,
            ).to(tl.float32)  # [BA, BT]
            key_chunk = _load_key_chunk(key_base, extra_base, a_start, key_rows_offset, offs_s, s_valid, A,
                                        stride_ka, stride_xa, stride_xs, HAS_EXTRA, BLOCK_A)
            weight_chunk = tl.load(score_vector + offs_a)  # [BA] fp32, padded to whole chunks
            tile_scores += chunk_scores(query_chunk, key_chunk, weight_chunk, FORM, INTERPRET)
    return tile_scores


@triton.jit
def _attention_forward_program(
    # inputs (placeholders where the HAS_* flag is off); score_vector [A] and score_scalars [2] come from
    # _score_vector_kernel
    query_proj, key_proj, value, score_vector, score_scalars, extra_key_term, key_lengths, key_padding_mask, index,
    key_exp,  # e^{2 key_proj} fp32 [B_m, S, A]: a decoding memory's, or the key pre-pass's (HAS_KEY_EXP)
    key_absmax,  # CHECK_KEY_RANGE: max_a |key_proj| [B_m, S] fp32 from the key pre-pass, else a placeholder
    query_factor,  # HAS_KEY_EXP: scratch [splits, B_q * T, A padded to whole chunks] fp32 for c e^{2q}
    # outputs: context [B_q, T, D] and lse [B_q, T] (one split) or, with splits, fp32 partials
    # context [splits, B_q, T, D] (unnormalized), row_max / row_sum [splits, B_q, T]; scores [B_q, T, S] fp32, and
    # in scores mode row_max / row_sum [splits (1 without), B_q, T] for the second pass
    context, lse, row_max, row_sum, scores,
    stride_qb, stride_qt, stride_qa,
    stride_kb, stride_ks, stride_ka,
    stride_vb, stride_vs, stride_vd,
    stride_xb, stride_xs, stride_xa,
    stride_eb, stride_es, stride_ea,  # key_exp
    stride_mb, stride_mt, stride_ms,  # stride_mt = 0 for a [B_m, S] mask
    stride_lengths, stride_index,
    query_rows, T, S, A, D,
    keys_per_split,  # a multiple of BLOCK_S
    HAS_EXTRA: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_KEY_EXP: tl.constexpr, CHECK_KEY_RANGE: tl.constexpr, CAUSAL: tl.constexpr,
    FUSE_CONTEXT: tl.constexpr, WRITE_SCORES: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr, TANH_FORM: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The body of `_attention_forward_kernel` and `_attention_forward_prepared_kernel`. Program = (query row b,
    tile of BLOCK_T query rows) on axis 0, key split on axis 1. See the module docstring for what it writes; shapes
    of the inputs as in `attention_forward`, any strides."""
    num_t_tiles = tl.cdiv(T, BLOCK_T)
    batch = tl.program_id(0) // num_t_tiles  # query row b
    t_tile = tl.program_id(0) % num_t_tiles
    split = tl.program_id(1)

    # Batch offsets in int64: b * stride overflows int32 on large tensors. Row offsets below likewise.
    batch64 = batch.to(tl.int64)
    memory = memory_row(batch64, index, stride_index, HAS_INDEX)
    query_base = query_proj + batch64 * stride_qb
    key_base = key_proj + memory * stride_kb
    value_base = value + memory * stride_vb
    extra_base = extra_key_term + batch64 * stride_xb
    key_exp_base = key_exp + memory * stride_eb  # gathered through index like key_proj
    if MASK_PER_QUERY:
        mask_base = key_padding_mask + batch64 * stride_mb
    else:
        mask_base = key_padding_mask + memory * stride_mb

    offs_t = t_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = offs_t < T
    query_rows_offset = offs_t.to(tl.int64) * stride_qt  # [BT]
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    value_columns_offset = offs_d.to(tl.int64) * stride_vd  # [BD]

    # The keys this program looks at: its split, cut at the key length and, with causal, at the tile's last row:
    # tiles that are hidden entirely are never visited.
    key_end = S
    if HAS_LENGTHS:
        key_end = tl.minimum(key_end, tl.load(key_lengths + memory * stride_lengths).to(tl.int32))
    if CAUSAL:
        key_end = tl.minimum(key_end, t_tile * BLOCK_T + BLOCK_T)
    key_begin = split * keys_per_split
    key_end = tl.minimum(key_end, key_begin + keys_per_split)

    # The factorized tanh needs |q|, |k| and |v| within range (tanh.py): v and this query tile are checked once
    # here, each key tile once before its A loop (with HAS_KEY_EXP the keys were checked at precompute).
    if TANH_FORM == "factorized":
        if HAS_KEY_EXP:
            # c e^{2q} of this query tile, once per program, into its own scratch rows (padded A included): the hot
            # loop loads it, as it loads e^{2k}, rather than have every thread recompute the exponentials of its
            # A-chunk per key tile (one EX2 per element with one query row per program).
            a_padded = tl.cdiv(A, BLOCK_A) * BLOCK_A
            query_factor_base = query_factor + (split.to(tl.int64) * query_rows * T + batch64 * T) * a_padded
            query_factor_rows_offset = offs_t.to(tl.int64) * a_padded  # [BT]
        query_absmax = tl.zeros([BLOCK_A, BLOCK_T], dtype=tl.float32)
        for a_start in range(0, A, BLOCK_A):
            offs_a = a_start + tl.arange(0, BLOCK_A)
            query_chunk = tl.load(
                query_base + offs_a.to(tl.int64)[:, None] * stride_qa + query_rows_offset[None, :],
                mask=(offs_a < A)[:, None] & t_valid[None, :], other=0.0,
            ).to(tl.float32)
            query_absmax = tl.maximum(query_absmax, tl.abs(query_chunk))
            if HAS_KEY_EXP:
                weight_chunk = tl.load(score_vector + offs_a)  # padded to whole chunks
                tl.store(query_factor_base + offs_a.to(tl.int64)[:, None] + query_factor_rows_offset[None, :],
                         weight_chunk[:, None] * exp2x_accurate(query_chunk), mask=t_valid[None, :])
        query_in_range = ((tl.max(tl.max(query_absmax, axis=1), axis=0) <= FACTORIZED_LIMIT)
                          & (tl.load(score_scalars + 1) <= FACTORIZED_V_LIMIT))
        if HAS_KEY_EXP:
            tl.debug_barrier()  # the scratch rows written by every thread of the program, before the loop reads
    bias = tl.load(score_scalars)  # added to every score once (tanh.score_bias)

    row_max_run = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)  # m: running max of the visible scores
    row_sum_run = tl.zeros([BLOCK_T], dtype=tl.float32)  # l: running sum of exp(score - m)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # running sum of exp(score - m) * value

    for s_start in range(key_begin, key_end, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        s_valid = offs_s < key_end
        key_rows_offset = offs_s.to(tl.int64) * stride_ks  # [BS]

        # scores[i, j] = sum over A-chunks of sum_a v[a] tanh(q[a, i] + k[a, j]); A-major tiles, reduced over axis
        # 0, so the reduction stays in each thread's registers (no cross-lane shuffles).
        tile_scores = tl.zeros([BLOCK_T, BLOCK_S], dtype=tl.float32) + bias
        if TANH_FORM == "factorized" and HAS_KEY_EXP:
            # e^{2k} prepared with the memory, whose keys `prepare_key_exp` found within FACTORIZED_LIMIT once at
            # precompute (no key range check), or by the key pre-pass of an all-steps call (CHECK_KEY_RANGE: its
            # max |k| per key, checked here once per key tile). Out-of-range tiles take the exp form from key_proj.
            tile_in_range = query_in_range
            if CHECK_KEY_RANGE:
                tile_key_absmax = tl.load(key_absmax + memory * S + offs_s, mask=s_valid, other=0.0)
                tile_in_range = tile_in_range & (tl.max(tile_key_absmax, axis=0) <= FACTORIZED_LIMIT)
            if tile_in_range:
                tile_scores = _key_tile_scores(
                    tile_scores, query_base, key_base, extra_base, score_vector, query_rows_offset, t_valid,
                    key_rows_offset, offs_s, s_valid, A, stride_qa, stride_ka, stride_xa, stride_xs,
                    HAS_EXTRA, NUM_STAGES, "factorized", INTERPRET, BLOCK_A,
                    True, key_exp_base, offs_s.to(tl.int64) * stride_es, stride_ea, query_factor_base,
                    query_factor_rows_offset)
            else:
                tile_scores = _key_tile_scores(
                    tile_scores, query_base, key_base, extra_base, score_vector, query_rows_offset, t_valid,
                    key_rows_offset, offs_s, s_valid, A, stride_qa, stride_ka, stride_xa, stride_xs,
                    HAS_EXTRA, NUM_STAGES, "exp", INTERPRET, BLOCK_A)
        elif TANH_FORM == "factorized":
            # The factorized form needs |q|, |k| <= FACTORIZED_LIMIT; saturated inputs take the exp form. The key
            # tile is checked once, before the A loop (a block-wide max inside it cost SHFL and BAR.SYNC per chunk),
            # and the branch is taken once per key tile: neither A loop has a reduction or a branch.
            tile_key_absmax = tl.zeros([BLOCK_A, BLOCK_S], dtype=tl.float32)
            for a_start in range(0, A, BLOCK_A):
                key_chunk = _load_key_chunk(key_base, extra_base, a_start, key_rows_offset, offs_s, s_valid, A,
                                            stride_ka, stride_xa, stride_xs, HAS_EXTRA, BLOCK_A)
                tile_key_absmax = tl.maximum(tile_key_absmax, tl.abs(key_chunk))
            key_in_range = tl.max(tl.max(tile_key_absmax, axis=1), axis=0) <= FACTORIZED_LIMIT
            if query_in_range & key_in_range:
                tile_scores = _key_tile_scores(
                    tile_scores, query_base, key_base, extra_base, score_vector, query_rows_offset, t_valid,
                    key_rows_offset, offs_s, s_valid, A, stride_qa, stride_ka, stride_xa, stride_xs,
                    HAS_EXTRA, NUM_STAGES, "factorized", INTERPRET, BLOCK_A)
            else:
                tile_scores = _key_tile_scores(
                    tile_scores, query_base, key_base, extra_base, score_vector, query_rows_offset, t_valid,
                    key_rows_offset, offs_s, s_valid, A, stride_qa, stride_ka, stride_xa, stride_xs,
                    HAS_EXTRA, NUM_STAGES, "exp", INTERPRET, BLOCK_A)
        else:
            tile_scores = _key_tile_scores(
                tile_scores, query_base, key_base, extra_base, score_vector, query_rows_offset, t_valid,
                key_rows_offset, offs_s, s_valid, A, stride_qa, stride_ka, stride_xa, stride_xs,
                HAS_EXTRA, NUM_STAGES, TANH_FORM, INTERPRET, BLOCK_A)

        visible = t_valid[:, None] & s_valid[None, :]
        if CAUSAL:
            visible = visible & (offs_s[None, :] <= offs_t[:, None])
        if HAS_MASK:
            padding = tl.load(
                mask_base + offs_t.to(tl.int64)[:, None] * stride_mt + offs_s.to(tl.int64)[None, :] * stride_ms,
                mask=visible, other=1,
            )
            visible = visible & (padding == 0)
        tile_scores = tl.where(visible, tile_scores, float("-inf"))

        if WRITE_SCORES:
            score_rows = (batch64 * T + offs_t) * S
            tl.store(scores + score_rows[:, None] + offs_s[None, :], tile_scores,
                     mask=t_valid[:, None] & s_valid[None, :])

        # Online softmax. While a row has seen no visible key its max is -inf; subtracting 0 instead keeps
        # exp(-inf - base) = 0 rather than NaN.
        new_max = tl.maximum(row_max_run, tl.max(tile_scores, axis=1))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(row_max_run - base)
        probs = tl.exp(tile_scores - base[:, None])
        row_sum_run = row_sum_run * rescale + tl.sum(probs, axis=1)
        row_max_run = new_max
        if FUSE_CONTEXT:
            value_tile = tl.load(
                value_base + offs_s.to(tl.int64)[:, None] * stride_vs + value_columns_offset[None, :],
                mask=s_valid[:, None] & d_valid[None, :], other=0.0,
            )  # [BS, BD]; masked to 0: garbage * 0 could be NaN
            acc = _probs_times_value(probs, value_tile, acc * rescale[:, None], INTERPRET)

    out_rows = batch64 * T + offs_t  # [BT] row of [B_q, T]
    if SPLIT or WRITE_SCORES:
        # The softmax statistics themselves, not only their log-sum-exp: the second pass normalizes by the row sum
        # (exp(score - max) / sum), which stays exact at any score magnitude where an fp32 lse would not.
        part_rows = split.to(tl.int64) * query_rows * T + out_rows  # split = 0 without splits
        tl.store(row_max + part_rows, row_max_run, mask=t_valid)
        tl.store(row_sum + part_rows, row_sum_run, mask=t_valid)
    if SPLIT:
        if FUSE_CONTEXT:
            tl.store(context + part_rows[:, None] * D + offs_d[None, :], acc,
                     mask=t_valid[:, None] & d_valid[None, :])
    else:
        has_keys = row_sum_run > 0.0
        # A row with no visible key: lse = +inf, context = 0 (acc is 0 there).
        tl.store(lse + out_rows, _log_sum_exp(row_max_run, row_sum_run), mask=t_valid)
        if FUSE_CONTEXT:
            normalized = acc / tl.where(has_keys, row_sum_run, 1.0)[:, None]
            tl.store(context + out_rows[:, None] * D + offs_d[None, :],
                     normalized.to(context.dtype.element_ty), mask=t_valid[:, None] & d_valid[None, :])


@triton.jit
def _attention_forward_kernel(
    query_proj, key_proj, value, score_vector, score_scalars, extra_key_term, key_lengths, key_padding_mask, index,
    context, lse, row_max, row_sum, scores,
    stride_qb, stride_qt, stride_qa,
    stride_kb, stride_ks, stride_ka,
    stride_vb, stride_vs, stride_vd,
    stride_xb, stride_xs, stride_xa,
    stride_mb, stride_mt, stride_ms,
    stride_lengths, stride_index,
    query_rows, T, S, A, D,
    keys_per_split,
    HAS_EXTRA: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    HAS_INDEX: tl.constexpr, CAUSAL: tl.constexpr,
    FUSE_CONTEXT: tl.constexpr, WRITE_SCORES: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr, TANH_FORM: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The forward's score kernel (see `_attention_forward_program`; the arguments as there, without the prepared
    keys). Its signature is what the static report's saved launches record, so the prepared-keys variant is a
    kernel of its own rather than extra arguments here."""
    _attention_forward_program(
        query_proj, key_proj, value, score_vector, score_scalars, extra_key_term, key_lengths, key_padding_mask,
        index, query_proj, lse, lse, context, lse, row_max, row_sum, scores,
        stride_qb, stride_qt, stride_qa, stride_kb, stride_ks, stride_ka, stride_vb, stride_vs, stride_vd,
        stride_xb, stride_xs, stride_xa, 0, 0, 0, stride_mb, stride_mt, stride_ms,
        stride_lengths, stride_index, query_rows, T, S, A, D, keys_per_split,
        HAS_EXTRA, HAS_LENGTHS, HAS_MASK, MASK_PER_QUERY, HAS_INDEX, False, False, CAUSAL, FUSE_CONTEXT, WRITE_SCORES,
        SPLIT,
        BLOCK_T, BLOCK_S, BLOCK_A, BLOCK_D, NUM_STAGES, TANH_FORM, INTERPRET,
    )


@triton.jit
def _attention_forward_prepared_kernel(
    query_proj, key_proj, value, score_vector, score_scalars, extra_key_term, key_lengths, key_padding_mask, index,
    key_exp, key_absmax, query_factor,
    context, lse, row_max, row_sum, scores,
    stride_qb, stride_qt, stride_qa,
    stride_kb, stride_ks, stride_ka,
    stride_vb, stride_vs, stride_vd,
    stride_xb, stride_xs, stride_xa,
    stride_eb, stride_es, stride_ea,
    stride_mb, stride_mt, stride_ms,
    stride_lengths, stride_index,
    query_rows, T, S, A, D,
    keys_per_split,
    HAS_EXTRA: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_KEY_EXP: tl.constexpr, CHECK_KEY_RANGE: tl.constexpr, CAUSAL: tl.constexpr,
    FUSE_CONTEXT: tl.constexpr, WRITE_SCORES: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr, TANH_FORM: tl.constexpr, INTERPRET: tl.constexpr,
):
    """`_attention_forward_kernel` with prepared keys: key_exp = e^{2 key_proj} fp32 [B_m, S, A] (a decoding memory's,
    or with CHECK_KEY_RANGE the key pre-pass's, whose key_absmax [B_m, S] the program checks per key tile) and the
    scratch query_factor [splits, B_q * T, A padded] for c e^{2q}; HAS_KEY_EXP is True in every launch
    `plan_forward` makes (the factorized form loads both factors, see `_attention_forward_program`)."""
    _attention_forward_program(
        query_proj, key_proj, value, score_vector, score_scalars, extra_key_term, key_lengths, key_padding_mask,
        index, key_exp, key_absmax, query_factor, context, lse, row_max, row_sum, scores,
        stride_qb, stride_qt, stride_qa, stride_kb, stride_ks, stride_ka, stride_vb, stride_vs, stride_vd,
        stride_xb, stride_xs, stride_xa, stride_eb, stride_es, stride_ea, stride_mb, stride_mt, stride_ms,
        stride_lengths, stride_index, query_rows, T, S, A, D, keys_per_split,
        HAS_EXTRA, HAS_LENGTHS, HAS_MASK, MASK_PER_QUERY, HAS_INDEX, HAS_KEY_EXP, CHECK_KEY_RANGE, CAUSAL,
        FUSE_CONTEXT, WRITE_SCORES, SPLIT,
        BLOCK_T, BLOCK_S, BLOCK_A, BLOCK_D, NUM_STAGES, TANH_FORM, INTERPRET,
    )


@triton.jit
def _merged_split_stats(split_max, split_sum):
    """The softmax statistics of rows computed in key splits, merged over axis 0 (the splits): split_max and
    split_sum [splits] or [splits, rows] (-inf and 0 for splits that saw no visible key). Returns (base, total,
    split_weight): the row max (0 for a row without visible key, so that nothing is -inf - -inf), the row sum
    sum_s l_s e^{m_s - base} and each split's factor e^{m_s - base}."""
    total_max = tl.max(split_max, axis=0)
    base = tl.where(total_max == float("-inf"), 0.0, total_max)
    split_weight = tl.exp(split_max - base)  # 0 for splits that saw no visible key
    return base, tl.sum(split_sum * split_weight, axis=0), split_weight


@triton.jit
def _log_sum_exp(row_max, row_sum):
    """lse = max + log(sum) of rows, +inf for a row without visible key (sum 0)."""
    has_keys = row_sum > 0.0
    return tl.where(has_keys, row_max + tl.log(tl.where(has_keys, row_sum, 1.0)), float("inf"))


@triton.jit
def _combine_splits_kernel(
    row_max, row_sum, partial_context,  # [splits, rows], [splits, rows], [splits, rows, D] fp32
    context, lse,  # [rows, D] in the input dtype, [rows] fp32
    rows, D, NUM_SPLITS,
    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Fused context with key splits, one program per (query row, step): lse = log sum_s l_s e^{m_s},
    context = sum_s e^{m_s} acc_s / sum_s l_s e^{m_s}. (Scores mode needs no such pass: `_context_from_scores_kernel`
    merges the splits' statistics itself.)"""
    row = tl.program_id(0).to(tl.int64)
    offs_split = tl.arange(0, BLOCK_SPLITS)
    split_valid = offs_split < NUM_SPLITS
    part_rows = offs_split.to(tl.int64) * rows + row
    split_max = tl.load(row_max + part_rows, mask=split_valid, other=float("-inf"))
    split_sum = tl.load(row_sum + part_rows, mask=split_valid, other=0.0)
    base, total_sum, split_weight = _merged_split_stats(split_max, split_sum)
    tl.store(lse + row, _log_sum_exp(base, total_sum))
    has_keys = total_sum > 0.0
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    partial = tl.load(partial_context + part_rows[:, None] * D + offs_d[None, :],
                      mask=split_valid[:, None] & d_valid[None, :], other=0.0)
    combined = tl.sum(partial * split_weight[:, None], axis=0) / tl.where(has_keys, total_sum, 1.0)
    tl.store(context + row * D + offs_d, combined.to(context.dtype.element_ty), mask=d_valid)


@triton.jit
def _context_from_scores_kernel(
    # scores [B_q, T, S] fp32 (-inf where hidden); row_max, row_sum [splits, B_q, T] fp32: the softmax statistics
    # of each key split (one split without SPLIT)
    scores, row_max, row_sum, value, key_lengths, index,
    context, weights, lse,  # [B_q, T, D], [B_q, T, S] in the input dtype; lse [B_q, T] fp32, written with SPLIT
    stride_vb, stride_vs, stride_vd, stride_lengths, stride_index,
    query_rows, T, S, D, NUM_SPLITS,
    HAS_LENGTHS: tl.constexpr, HAS_INDEX: tl.constexpr, CAUSAL: tl.constexpr, WRITE_WEIGHTS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program = (query row b, tile of query rows, tile of D): weights = exp(scores - max) / sum (normalized by the
    row sum itself: exp(scores - lse) with an fp32 lse is off by lse's rounding, 3e-5 relative at |score| ~ 300),
    context = weights @ value. SPLIT: the row's max and sum are merged here from the NUM_SPLITS key splits' partial
    statistics (what `_combine_splits_kernel` does for the fused context), and the first D-tile writes lse, so a
    scores-mode call with key splits needs no combine launch.

    The score kernel stored every position of the key tiles it visited; keys beyond the key length or (causal)
    after the query are hidden elementwise here, so the two kernels may tile T differently."""
    num_t_tiles = tl.cdiv(T, BLOCK_T)
    batch = tl.program_id(0) // num_t_tiles
    t_tile = tl.program_id(0) % num_t_tiles
    d_tile = tl.program_id(1)
    batch64 = batch.to(tl.int64)
    if HAS_INDEX:
        memory = tl.load(index + batch64 * stride_index).to(tl.int64)
    else:
        memory = batch64
    value_base = value + memory * stride_vb

    offs_t = t_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = offs_t < T
    rows = batch64 * T + offs_t
    offs_d = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    first_d_tile = d_tile == 0  # the one D-tile that writes the weights (and, with splits, lse)
    # A row without visible key has sum 0 (and max -inf): P = 0 there.
    if SPLIT:
        offs_split = tl.arange(0, BLOCK_SPLITS)
        part_rows = offs_split.to(tl.int64)[:, None] * query_rows * T + rows[None, :]  # [splits, BT]
        part_valid = (offs_split < NUM_SPLITS)[:, None] & t_valid[None, :]
        split_max = tl.load(row_max + part_rows, mask=part_valid, other=float("-inf"))  # [splits, BT]
        split_sum = tl.load(row_sum + part_rows, mask=part_valid, other=0.0)
        row_base, row_total, _ = _merged_split_stats(split_max, split_sum)
        if first_d_tile:
            tl.store(lse + rows, _log_sum_exp(row_base, row_total), mask=t_valid)
    else:
        row_base = tl.load(row_max + rows, mask=t_valid, other=0.0)
        row_base = tl.where(row_base == float("-inf"), 0.0, row_base)
        row_total = tl.load(row_sum + rows, mask=t_valid, other=0.0)
    row_scale = tl.where(row_total > 0.0, 1.0 / tl.where(row_total > 0.0, row_total, 1.0), 0.0)

    key_end = S
    if HAS_LENGTHS:
        key_end = tl.minimum(key_end, tl.load(key_lengths + memory * stride_lengths).to(tl.int32))
    if CAUSAL:
        key_end = tl.minimum(key_end, t_tile * BLOCK_T + BLOCK_T)

    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for s_start in range(0, key_end, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        stored = t_valid[:, None] & (offs_s < key_end)[None, :]
        if CAUSAL:
            stored = stored & (offs_s[None, :] <= offs_t[:, None])
        tile_scores = tl.load(scores + rows[:, None] * S + offs_s[None, :], mask=stored, other=float("-inf"))
        probs = tl.exp(tile_scores - row_base[:, None]) * row_scale[:, None]
        if WRITE_WEIGHTS:
            if first_d_tile:
                tl.store(weights + rows[:, None] * S + offs_s[None, :], probs.to(weights.dtype.element_ty),
                         mask=t_valid[:, None] & (offs_s < S)[None, :])
        value_tile = tl.load(
            value_base + offs_s.to(tl.int64)[:, None] * stride_vs + offs_d.to(tl.int64)[None, :] * stride_vd,
            mask=(offs_s < key_end)[:, None] & d_valid[None, :], other=0.0,
        )
        acc = _probs_times_value(probs, value_tile, acc, INTERPRET)
    if WRITE_WEIGHTS:
        if first_d_tile:
            # Key tiles never visited (beyond the key length, or after the tile's last query row) hold weight 0.
            for s_start in range(tl.cdiv(key_end, BLOCK_S) * BLOCK_S, S, BLOCK_S):
                offs_s = s_start + tl.arange(0, BLOCK_S)
                tl.store(weights + rows[:, None] * S + offs_s[None, :],
                         tl.zeros([BLOCK_T, BLOCK_S], dtype=weights.dtype.element_ty),
                         mask=t_valid[:, None] & (offs_s < S)[None, :])
    tl.store(context + rows[:, None] * D + offs_d[None, :], acc.to(context.dtype.element_ty),
             mask=t_valid[:, None] & d_valid[None, :])


@dataclasses.dataclass
class ForwardPlan:
    """The outputs (allocated, not yet written) and the launches that write them."""

    context: torch.Tensor  # [B_q, T, D], input dtype
    lse: torch.Tensor  # [B_q, T] fp32
    weights: torch.Tensor | None  # [B_q, T, S], input dtype
    config: ForwardConfig
    launches: list[launch.KernelLaunch]


def _mask_strides(key_padding_mask: torch.Tensor | None) -> tuple[int, int, int]:
    if key_padding_mask is None:
        return 0, 0, 0
    if key_padding_mask.dim() == 2:  # [B_m, S]: the same row for every query step
        return key_padding_mask.stride(0), 0, key_padding_mask.stride(1)
    return key_padding_mask.stride(0), key_padding_mask.stride(1), key_padding_mask.stride(2)


#: The key pre-pass's tile (`_key_exponentials_kernel`): 16 keys x 128 units per chunk, 4 warps.
KEY_PREPASS_BLOCK_S = 16
KEY_PREPASS_BLOCK_A = 128

#: Prepared score weights (`prepare_score_weights`) hold v's per-a weights padded along A to a multiple of this,
#: then the two score scalars: every forward tile's BLOCK_A divides it, so one prepared buffer serves every launch.
SCORE_WEIGHTS_ALIGNMENT = 64


def score_weights_reciprocal(dtype: torch.dtype, interpret: bool) -> bool:
    """Which weights `prepare_score_weights` prepares for calls in `dtype`: c = -1 / (2 v) for the reciprocal tanh
    forms (fp32 takes "exp" or "factorized"; every form is computed that way under the interpreter), v itself for
    fp16/bf16's tanh.approx. `plan_forward` uses prepared weights only where its tanh form wants the same kind."""
    return interpret or dtype == torch.float32


def _score_vector_arguments(v: torch.Tensor, score_vector: torch.Tensor, score_scalars: torch.Tensor,
                            attn_dim_padded: int, block_name: str) -> dict:
    """The v pre-pass's arguments, for `_score_vector_kernel` (`block_name` "BLOCK_A") or program (0, 0) of
    `_key_exponentials_kernel` ("BLOCK_V")."""
    return {"v": v, "stride_va": v.stride(0), "score_vector": score_vector, "score_scalars": score_scalars,
            "A_PADDED": attn_dim_padded, block_name: min(1024, next_power_of_2(v.shape[0]))}


def _score_vector_launch(v: torch.Tensor, score_vector: torch.Tensor, score_scalars: torch.Tensor,
                         attn_dim_padded: int, tanh_form: str, interpret: bool) -> launch.KernelLaunch:
    return launch.KernelLaunch(
        kernel=_score_vector_kernel,
        grid=(1,),
        arguments=dict(**_score_vector_arguments(v, score_vector, score_scalars, attn_dim_padded, "BLOCK_A"),
                       A=v.shape[0], TANH_FORM=tanh_form, INTERPRET=interpret),
        num_warps=4,
    )


def prepare_score_weights(v: torch.Tensor, dtype: torch.dtype, *, wrap=None) -> torch.Tensor:
    """The forward's per-call v pre-pass, done once for a decoding memory: fp32 [cdiv(A, 64) * 64 + 2] holding
    `tanh.score_weights(v)` (zero-weight padding up to a multiple of SCORE_WEIGHTS_ALIGNMENT), then the score bias
    and max |v|, for calls computing in `dtype` (`score_weights_reciprocal` says which weights). Passed to every step
    as `AttentionCall.score_weights`, it saves each step the pre-pass launch; valid while v keeps its values.
    v [A] in any floating dtype and stride, on a device the kernels run on. `wrap`: see `launch.run_launches`."""
    interpret = launch.require_runnable(v.device)
    attn_dim = v.shape[0]
    aligned = triton.cdiv(max(attn_dim, 1), SCORE_WEIGHTS_ALIGNMENT) * SCORE_WEIGHTS_ALIGNMENT
    weights = launch.empty_buffer((aligned + 2,), torch.float32, v.device)
    tanh_form = "exp" if score_weights_reciprocal(dtype, interpret) else "approx"
    launch.run_launches([_score_vector_launch(v, weights[:aligned], weights[aligned:], aligned, tanh_form,
                                              interpret)], v.device, wrap)
    return weights


def plan_forward(
    call,
    *,
    weights_dtype: torch.dtype | None = None,
    tanh_form: str | None = None,
    num_splits: int | None = None,
    prepare_keys: bool | None = None,
    interpret: bool = False,
    config: ForwardConfig | None = None,
) -> ForwardPlan:
    """Allocate the outputs and scratch of `attention_forward(call)` and list its kernel launches (works on meta
    tensors too, which is how the static report gets real launch arguments without a GPU).

    `weights_dtype` (e.g. torch.float32) returns the weights in another floating dtype than the input's: the
    probabilities are computed in fp32, and a backward pass may want them unrounded.
    `tanh_form` ("exp", "factorized", "approx", "libdevice") and `num_splits` (key splits, >= 1) override the
    heuristic of kernels/configs.py, and so does `prepare_keys` (fp32 all-steps: the key pre-pass on or off); leave
    them None in normal use. `config` replaces the heuristic entirely
    (benchmarks and the static report compare configurations with it). `interpret`: the kernels' INTERPRET switch.
    `call.key_exp` (a decoding memory's e^{2 key_proj}, fp32, every |key_proj| within FACTORIZED_LIMIT as
    `functional.prepare_key_exp` checked once at precompute): fp32 decode tiles then take the factorized form, and
    in that form the kernel loads e^{2k} through the memory row instead of computing it, with no key range check
    (HAS_KEY_EXP). Ignored with an extra key term or in any other tanh form.
    `call.score_weights` (if the call has it: `prepare_score_weights` of its v, made once with a decoding memory)
    replaces the per-call v pre-pass launch whenever it holds the kind of weights the chosen tanh form needs.
    """
    if tanh_form is not None and tanh_form not in TANH_FORMS:
        raise ValueError(f"tanh_form must be one of {TANH_FORMS}, got {tanh_form!r}")
    query_proj, key_proj, value, v = call.query_proj, call.key_proj, call.value, call.v
    key_lengths, key_padding_mask, index, extra_key_term = (call.key_lengths, call.key_padding_mask, call.index,
                                                            call.extra_key_term)
    need_weights, causal = call.need_weights, call.causal
    query_rows, tgt_len, attn_dim = call.query_rows, call.tgt_len, call.attn_dim
    src_len, value_dim = call.src_len, call.value_dim
    dtype, device = call.dtype, call.device
    # The memory's prepared e^{2 key_proj} (AttentionCall.key_exp): ignored with an extra key term, which changes
    # the keys. Loaded by the kernel only in the factorized form (HAS_KEY_EXP).
    key_exp = call.key_exp if extra_key_term is None else None

    if config is None:
        config = forward_config(
            query_rows=query_rows, tgt_len=tgt_len, src_len=src_len, attn_dim=attn_dim, value_dim=value_dim,
            dtype=dtype, need_weights=need_weights, sm_count=launch.sm_count(device), tanh_form=tanh_form,
            num_splits=num_splits, has_key_exp=key_exp is not None,
            can_prepare_keys=extra_key_term is None and dtype == torch.float32, memory_rows=key_proj.shape[0],
            prepare_keys=prepare_keys,
        )
    elif need_weights and config.fuse_context:
        raise ValueError("need_weights requires a configuration with fuse_context=False")
    context = launch.empty_buffer((query_rows, tgt_len, value_dim), dtype, device)
    lse = launch.empty_buffer((query_rows, tgt_len), torch.float32, device)
    weights = (launch.empty_buffer((query_rows, tgt_len, src_len), weights_dtype or dtype, device)
               if need_weights else None)
    plan = ForwardPlan(context, lse, weights, config, [])
    if query_rows == 0 or tgt_len == 0:
        return plan
    if config.tanh_form != "factorized":
        key_exp = None  # only the factorized form has a key operand e^{2k}

    # Each split covers whole key tiles; splits that would be empty are dropped. One combine pass merges at most
    # MAX_COMBINE_SPLITS (its [splits, BLOCK_D] tile spills beyond): more key tiles make longer splits.
    key_tiles = triton.cdiv(max(src_len, 1), config.block_s)
    tiles_per_split = triton.cdiv(key_tiles, min(config.num_splits, MAX_COMBINE_SPLITS))
    splits = triton.cdiv(key_tiles, tiles_per_split)
    split = splits > 1
    rows = query_rows * tgt_len
    scores = None if config.fuse_context else launch.empty_buffer((query_rows, tgt_len, src_len), torch.float32, device)
    # Softmax statistics: partials of the splits, and in scores mode the (merged) row max and sum that the second
    # pass normalizes by.
    keep_stats = split or not config.fuse_context
    if keep_stats:
        row_max = launch.empty_buffer((splits, rows), torch.float32, device)
        row_sum = launch.empty_buffer((splits, rows), torch.float32, device)
    if split:
        partial_context = (
            launch.empty_buffer((splits, rows, value_dim), torch.float32, device) if config.fuse_context else None
        )

    def pointer(tensor: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
        # Absent tensors get a stand-in pointer: the kernels never touch it (their HAS_* flag is off).
        return stand_in if tensor is None else tensor

    # v turned into the per-a weights of the score loop (tanh.score_weights), padded to whole A-chunks: prepared
    # once with a decoding memory (`prepare_score_weights`, when made for this tanh form's kind of weights), else by
    # a one-program pre-pass launched here.
    attn_dim_padded = triton.cdiv(attn_dim, config.block_a) * config.block_a
    prepared_weights = getattr(call, "score_weights", None)
    score_vector_launch = None
    if (prepared_weights is not None and SCORE_WEIGHTS_ALIGNMENT % config.block_a == 0
            and uses_reciprocal_form(config.tanh_form, interpret) == score_weights_reciprocal(dtype, interpret)):
        aligned = triton.cdiv(attn_dim, SCORE_WEIGHTS_ALIGNMENT) * SCORE_WEIGHTS_ALIGNMENT
        score_vector, score_scalars = prepared_weights[:aligned], prepared_weights[aligned:aligned + 2]
    else:
        score_vector = launch.empty_buffer((attn_dim_padded,), torch.float32, device)
        score_scalars = launch.empty_buffer((2,), torch.float32, device)
        score_vector_launch = _score_vector_launch(v, score_vector, score_scalars, attn_dim_padded, config.tanh_form,
                                                   interpret)
    # An fp32 all-steps configuration with prepared keys: a pre-pass writes e^{2k} and max |k| per key, which the
    # score kernel checks per key tile (CHECK_KEY_RANGE), and does the v pre-pass in the same launch. A decoding
    # memory's key_exp was range-checked at precompute.
    key_absmax = None
    if config.prepare_keys and key_exp is None and extra_key_term is None and config.tanh_form == "factorized":
        memory_rows = key_proj.shape[0]
        key_exp = launch.empty_buffer((memory_rows, src_len, attn_dim), torch.float32, device)
        key_absmax = launch.empty_buffer((memory_rows, src_len), torch.float32, device)
        vector_arguments = _score_vector_arguments(v, score_vector, score_scalars, attn_dim_padded, "BLOCK_V")
        plan.launches.append(launch.KernelLaunch(
            kernel=_key_exponentials_kernel,
            grid=(memory_rows, triton.cdiv(src_len, KEY_PREPASS_BLOCK_S)),
            arguments=dict(
                key_proj=key_proj, key_exp=key_exp, key_absmax=key_absmax,
                **dict(zip(("stride_kb", "stride_ks", "stride_ka"), key_proj.stride())), S=src_len, A=attn_dim,
                **vector_arguments, WRITE_SCORE_VECTOR=score_vector_launch is not None,
                TANH_FORM=config.tanh_form, INTERPRET=interpret,
                BLOCK_S=KEY_PREPASS_BLOCK_S, BLOCK_A=min(KEY_PREPASS_BLOCK_A, next_power_of_2(attn_dim)),
            ),
            num_warps=4,
        ))
    elif score_vector_launch is not None:
        plan.launches.append(score_vector_launch)
    # With prepared keys, each program's c e^{2q} (written in its prologue, read by its score loop).
    query_factor = (launch.empty_buffer((splits, rows, attn_dim_padded), torch.float32, device)
                    if key_exp is not None else None)
    prepared = {}  # the prepared-keys kernel's extra arguments
    if key_exp is not None:
        prepared = dict(key_exp=key_exp, key_absmax=pointer(key_absmax, key_exp), query_factor=query_factor,
                        HAS_KEY_EXP=True, CHECK_KEY_RANGE=key_absmax is not None,
                        **dict(zip(("stride_eb", "stride_es", "stride_ea"), key_exp.stride())))
    plan.launches.append(launch.KernelLaunch(
        kernel=_attention_forward_kernel if key_exp is None else _attention_forward_prepared_kernel,
        grid=(query_rows * triton.cdiv(tgt_len, config.block_t), splits),
        arguments=dict(
            **prepared,
            query_proj=query_proj, key_proj=key_proj, value=value,
            score_vector=score_vector, score_scalars=score_scalars,
            extra_key_term=pointer(extra_key_term, query_proj),
            key_lengths=pointer(key_lengths, query_proj),
            key_padding_mask=pointer(None if key_padding_mask is None else key_padding_mask.view(torch.uint8),
                                     query_proj),
            index=pointer(index, query_proj),
            context=partial_context if split and config.fuse_context else context,
            lse=lse,
            row_max=row_max if keep_stats else lse,
            row_sum=row_sum if keep_stats else lse,
            scores=pointer(scores, lse),
            **dict(zip(("stride_qb", "stride_qt", "stride_qa"), query_proj.stride())),
            **dict(zip(("stride_kb", "stride_ks", "stride_ka"), key_proj.stride())),
            **dict(zip(("stride_vb", "stride_vs", "stride_vd"), value.stride())),
            **dict(zip(("stride_xb", "stride_xs", "stride_xa"),
                       (0, 0, 0) if extra_key_term is None else extra_key_term.stride())),
            **dict(zip(("stride_mb", "stride_mt", "stride_ms"), _mask_strides(key_padding_mask))),
            stride_lengths=0 if key_lengths is None else key_lengths.stride(0),
            stride_index=0 if index is None else index.stride(0),
            query_rows=query_rows, T=tgt_len, S=src_len, A=attn_dim, D=value_dim,
            keys_per_split=tiles_per_split * config.block_s,
            HAS_EXTRA=extra_key_term is not None,
            HAS_LENGTHS=key_lengths is not None,
            HAS_MASK=key_padding_mask is not None,
            MASK_PER_QUERY=key_padding_mask is not None and key_padding_mask.dim() == 3,
            HAS_INDEX=index is not None,
            CAUSAL=causal,
            FUSE_CONTEXT=config.fuse_context,
            WRITE_SCORES=not config.fuse_context,
            SPLIT=split,
            BLOCK_T=config.block_t, BLOCK_S=config.block_s, BLOCK_A=config.block_a, BLOCK_D=config.block_d,
            NUM_STAGES=config.num_stages, TANH_FORM=config.tanh_form, INTERPRET=interpret,
        ),
        num_warps=config.num_warps,
    ))
    if split and config.fuse_context:
        plan.launches.append(launch.KernelLaunch(
            kernel=_combine_splits_kernel,
            grid=(rows,),
            arguments=dict(
                row_max=row_max, row_sum=row_sum, partial_context=partial_context,
                context=context, lse=lse, rows=rows, D=value_dim, NUM_SPLITS=splits,
                BLOCK_SPLITS=next_power_of_2(splits), BLOCK_D=config.block_d,
            ),
            num_warps=4 if config.block_d >= 256 else 1,
        ))
    if not config.fuse_context:
        second = context_config(tgt_len=tgt_len, value_dim=value_dim, need_weights=need_weights, dtype=dtype)
        plan.launches.append(launch.KernelLaunch(
            kernel=_context_from_scores_kernel,
            grid=(query_rows * triton.cdiv(tgt_len, second.block_t), max(1, triton.cdiv(value_dim, second.block_d))),
            arguments=dict(
                scores=scores, row_max=row_max, row_sum=row_sum, value=value,
                key_lengths=pointer(key_lengths, lse), index=pointer(index, lse),
                context=context, weights=pointer(weights, context), lse=lse,
                stride_vb=value.stride(0), stride_vs=value.stride(1), stride_vd=value.stride(2),
                stride_lengths=0 if key_lengths is None else key_lengths.stride(0),
                stride_index=0 if index is None else index.stride(0),
                query_rows=query_rows, T=tgt_len, S=src_len, D=value_dim, NUM_SPLITS=splits,
                HAS_LENGTHS=key_lengths is not None, HAS_INDEX=index is not None, CAUSAL=causal,
                WRITE_WEIGHTS=need_weights, SPLIT=split, BLOCK_SPLITS=next_power_of_2(splits),
                BLOCK_T=second.block_t, BLOCK_S=second.block_s, BLOCK_D=second.block_d, INTERPRET=interpret,
            ),
            num_warps=second.num_warps,
            num_stages=second.num_stages,
        ))
    return plan


def attention_forward(call, *, wrap=None, **tuning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Additive attention forward of a validated call (`attn_fast.validation.AttentionCall`, built by
    `attention_call`; its docstring has the shapes and rules): one float dtype, any strides.

    Returns (context [B_q, T, D] in the input dtype, lse [B_q, T] fp32, weights [B_q, T, S] in the input dtype, or
    None unless `call.need_weights`): lse is the natural log-sum-exp of the visible scores, +inf for a row without
    visible key (whose context and weights are 0). Inputs are not modified; nothing of size B*T*S*A is allocated.
    `tuning`: weights_dtype, tanh_form, num_splits, prepare_keys, as in `plan_forward`. `wrap`: see
    `launch.run_launches`.
    """
    plan = plan_forward(call, interpret=launch.require_runnable(call.device), **tuning)
    launch.run_launches(plan.launches, call.device, wrap)
    return plan.context, plan.lse, plan.weights
