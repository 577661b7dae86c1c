"""The fused forward of the "cpu" backend: scores, masked softmax and context in one compiled loop per (query row,
decoder step), for all decoder steps at once and for a single decode step alike (T = 1 is the same loop).

    score[b, i, j] = Σ_a v[a] tanh(q[b, i, a] + k[m, j, a])                   m = key_row_of[b]
    P[b, i, :]     = softmax over the keys j visible to step i of row b
    context[b, i]  = Σ_j P[b, i, j] value[value_row_of[b], j, :]

Two tanh forms, chosen by the caller for the whole call (or by the kernel: `attention_forward`'s form
FACTORIZED_IF_IN_RANGE):
- factorized: tanh(x + y) = 1 - 2 / (1 + e^{2x} e^{2y}), with e^{2q} and e^{2k} computed once per query step and
  per key and work item here (`vector_math.vector_exp`, vectorized; or e^{2k} prepared with a decoding memory), so
  the score is sum(v) - 2 Σ_a v[a] / (1 + eq[a] ek[a]): a multiply, an add and a division per element, which LLVM
  vectorizes over A (a true `vdivps`: inside this prange loop it measured faster than `vector_math`'s Newton
  reciprocal, benchmarks/NOTES.md). Exact when e^{2x} stays finite for every operand (|x| <=
  common.EXP_SAFE_MAGNITUDE); a product that overflows to inf or underflows to 0 still gives tanh = +-1 exactly
  (1 / (1 + inf) = 0).
- direct: tanh(q + k) per element (a scalar libm call: no vectorized tanh without SVML), for saturated inputs.

Keys hidden from a step (j >= key_limits[b], a True `hidden` entry, or j > i with `causal`) are never read: their
values, NaN or inf included, cannot reach the row; their weights are written as 0. A row with no visible key gets
zero weights and a zero context.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from attn_fast.backends.cpu_kernels import FASTMATH
from attn_fast.backends.cpu_kernels.vector_math import vector_exp


@numba.njit(inline="always", cache=True)
def is_hidden(hidden, row, step, key) -> bool:
    """hidden [B_q, 1 or T, S] bool, or an empty [0, 1, 1] array for no padding mask."""
    if hidden.shape[0] == 0:
        return False
    return hidden[row, step if hidden.shape[1] > 1 else 0, key]


#: Values of `attention_forward`'s `form`.
DIRECT, FACTORIZED, FACTORIZED_IF_IN_RANGE = 0, 1, 2


@numba.njit(inline="always", fastmath=set(FASTMATH), cache=True)
def step_probabilities(query, row_keys, v, v_sum, limit, hidden, row, step, factorized, scores):
    """Scores of one (row, step) against its visible keys [0, limit) then, in place, their masked softmax: scores
    [S] ends up holding P[row, step, :], 0 at hidden keys. `query` [A]: e^{2q} of the step (factorized) or q;
    row_keys [>= limit, A]: e^{2k} (factorized) or k of the row's keys."""
    src_len = scores.shape[0]
    attn_dim = query.shape[0]
    zero = v.dtype.type(0.0)
    one = v.dtype.type(1.0)
    two = v.dtype.type(2.0)
    # A NaN score fails every comparison, so it never becomes the maximum; it turns the whole row into NaN through
    # exp below, as the reference's softmax does.
    row_max = -np.inf
    for key in range(src_len):
        if key >= limit or is_hidden(hidden, row, step, key):
            scores[key] = zero
            continue
        keys = row_keys[key]
        total = zero
        if factorized:
            for a in range(attn_dim):
                total += v[a] / (one + query[a] * keys[a])
            score = v_sum - two * total
        else:
            for a in range(attn_dim):
                total += v[a] * math.tanh(query[a] + keys[a])
            score = total
        scores[key] = score
        if score > row_max:
            row_max = score
    # As common.masked_softmax_: an infinite maximum (all visible scores -inf, or one +inf) is replaced by 0, and a
    # zero sum (no visible key) by 1, so that an empty row gets zero weights instead of NaN. The exponentials over
    # every key below the limit (vector_exp: no libm call, vectorized), then hidden keys back to 0.
    if not math.isfinite(row_max):
        row_max = zero
    for key in range(limit):
        scores[key] = vector_exp(scores[key] - row_max)
    if hidden.shape[0] != 0:
        for key in range(limit):
            if is_hidden(hidden, row, step, key):
                scores[key] = zero
    total_weight = zero
    for key in range(limit):
        total_weight += scores[key]
    if total_weight == zero:
        total_weight = one
    for key in range(limit):
        scores[key] = scores[key] / total_weight


@numba.njit(inline="always", fastmath=set(FASTMATH), cache=True)
def exponentials(x, out):
    """out[a] = e^{2 x[a]} over one [A] row (vectorized: nothing else in the loop)."""
    two = x.dtype.type(2.0)
    for a in range(x.shape[0]):
        out[a] = vector_exp(two * x[a])


@numba.njit(inline="always", fastmath=set(FASTMATH), cache=True)
def beyond(x, largest) -> int:
    """How many of one [A] row's values are beyond `largest` in magnitude, NaN included (0 when largest is inf:
    not checked)."""
    if largest == np.inf:
        return 0
    count = 0
    for a in range(x.shape[0]):
        count += 0 if abs(x[a]) <= largest else 1
    return count


@numba.njit(inline="always", fastmath=set(FASTMATH), cache=True)
def forward_item(item, query, keys, keys_are_exp, key_row_of, v, v_sum, value, value_row_of, key_limits, hidden,
                 causal, factorized, largest, step_block, fuse_context, probs, context, key_scratch) -> int:
    """One work item of `attention_forward`: P (and the context) of query row item // blocks, steps [first,
    first + step_block) of its block. Returns the number of operands it found beyond `largest` (factorized forms;
    NaN included; 0 when `largest` is inf)."""
    query_rows, steps, attn_dim = query.shape
    src_len = keys.shape[1]
    value_dim = value.shape[2]
    dtype = v.dtype
    blocks = (steps + step_block - 1) // step_block
    row = item // blocks
    first = (item - row * blocks) * step_block
    last = min(first + step_block, steps)
    row_limit = min(key_limits[row], src_len)
    if causal:
        row_limit = min(row_limit, last)
    row_limit = max(row_limit, 0)
    bad = 0
    # e^{2k} of the keys the block's steps can see, once per item, into the worker's [S, A] block `key_scratch`,
    # which stays in cache while the block's steps read it. The exponentials and the range check are separate loops
    # over one key: together in one loop (a count beside a store) LLVM left both scalar, ~2.8 ns per key element,
    # a quarter of the kernel at caption; apart they vectorize (benchmarks/NOTES.md, "Issue 13, second pass").
    if factorized and not keys_are_exp:
        source = keys[key_row_of[row]]
        for j in range(row_limit):
            exponentials(source[j], key_scratch[j])
            bad += beyond(source[j], largest)
        row_keys = key_scratch
    else:
        row_keys = keys[key_row_of[row]]
    query_row = np.empty(attn_dim if factorized else 0, dtype)
    for step in range(first, last):
        limit = min(row_limit, step + 1) if causal else row_limit
        scores = probs[row, step]
        if factorized:
            exponentials(query[row, step], query_row)
            bad += beyond(query[row, step], largest)
            step_probabilities(query_row, row_keys, v, v_sum, limit, hidden, row, step, True, scores)
        else:
            step_probabilities(query[row, step], row_keys, v, v_sum, limit, hidden, row, step, False, scores)
        if fuse_context:
            out = context[row, step]
            for d in range(value_dim):
                out[d] = 0.0
            values = value[value_row_of[row]]
            for key in range(limit):
                # A key hidden from the step is skipped, never multiplied by its zero weight: a NaN or inf value
                # there must not reach the step.
                if not is_hidden(hidden, row, step, key):
                    weight = scores[key]
                    for d in range(value_dim):
                        out[d] += weight * values[key, d]
    return bad


@numba.njit(parallel=True, fastmath=set(FASTMATH), cache=True)
def attention_forward(query, keys, keys_are_exp, key_row_of, v, value, value_row_of, key_limits, hidden, causal,
                      form, magnitude_limit, step_block, fuse_context, probs, context, threads):
    """`forward_items` on `threads` numba workers (a parallel launch: for a launch on one thread, take
    `attention_forward_serial`)."""
    return forward_items(query, keys, keys_are_exp, key_row_of, v, value, value_row_of, key_limits, hidden, causal,
                         form, magnitude_limit, step_block, fuse_context, probs, context, threads)


# error_model="numpy": numba's default ("python") checks every division for a zero divisor so as to raise
# ZeroDivisionError, a branch that keeps LLVM from vectorizing the score loop (scalar vdivss, 6x slower); parallel
# loops get the numpy model anyway. A one-thread launch this way skips waking numba's pool: a decode step at
# nmt_train took 0.13 ms here and 0.42 ms through the parallel launch on one thread (benchmarks/NOTES.md, "Issue 13,
# second pass").
@numba.njit(fastmath=set(FASTMATH), error_model="numpy", cache=True)
def attention_forward_serial(query, keys, keys_are_exp, key_row_of, v, value, value_row_of, key_limits, hidden,
                             causal, form, magnitude_limit, step_block, fuse_context, probs, context, threads):
    """`forward_items` in the calling thread (numba.prange is a plain range here); `threads` must be 1."""
    return forward_items(query, keys, keys_are_exp, key_row_of, v, value, value_row_of, key_limits, hidden, causal,
                         form, magnitude_limit, step_block, fuse_context, probs, context, 1)


@numba.njit(inline="always", fastmath=set(FASTMATH), cache=True)
def forward_items(query, keys, keys_are_exp, key_row_of, v, value, value_row_of, key_limits, hidden, causal,
                  form, magnitude_limit, step_block, fuse_context, probs, context, threads):
    """Fill probs P [B_q, T, S] and, with `fuse_context`, context [B_q, T, D] (both in the compute dtype, every
    element written). With form FACTORIZED_IF_IN_RANGE, returns the number of operands it met beyond
    `magnitude_limit` (NaN included): when it is not 0, P and the context are not valid and the caller runs the
    DIRECT form instead (other forms: the count of NaN operands, to be ignored).

    query [B_q, T, A]: query_proj. The factorized forms take e^{2q} of each step in its work item (`vector_exp`).
    keys [B_k, S, A]: the keys, or their e^{2k} when `keys_are_exp` (a prepared memory; factorized forms only);
        else the factorized forms compute e^{2k} of the keys a work item's steps can see, once per item, into the
        worker's [S, A] block, which stays in cache. Key row key_row_of[b] (int64 [B_q]) serves query row b (the
        memory row through `index`, or b itself when the keys are per query row).
    form: DIRECT (tanh per element), FACTORIZED, or FACTORIZED_IF_IN_RANGE: factorized, checking every |q| and
        |k| it exponentiates against magnitude_limit (common.EXP_SAFE_MAGNITUDE: e^{2x} finite), which spares the
        caller a separate scan of the inputs (keys no step can see are not checked: they reach nothing).
    step_block: steps per work item (item = (query row, block of steps)); the caller picks blocks small enough to
        give every thread several items, large enough that e^{2k} per item costs little.
    v [A]; value [B_m, S, D] read at row value_row_of[b] (int64 [B_q]).
    key_limits int64 [B_q]: keys j >= key_limits[b] are hidden (key_lengths through `index`, else S).
    hidden bool [B_q, 1 or T, S] (True = hidden) or [0, 1, 1] for none; causal: keys j > i are hidden.
    All float arrays share one dtype (float32 or float64) and are C-contiguous.

    threads: numba's thread count for this launch (`cpu_kernels.launching`); one worker per thread takes the work
    items round-robin.

    Work items: (query row, block of steps), in parallel (`forward_item`); inlined into both launchers, so that
    the prange is numba's parallel loop in `attention_forward` and a plain loop in `attention_forward_serial`.
    The fused context reads the whole [S, D] value row once per step: right for a decode step (T = 1: a
    matrix-vector product anyway, and no gather of the memory rows), several times slower than a batched matrix
    product for many steps (benchmarks/NOTES.md), where the caller leaves it to torch's products on P.
    """
    factorized = form != DIRECT
    largest = v.dtype.type(magnitude_limit if form == FACTORIZED_IF_IN_RANGE else np.inf)
    v_sum = v.dtype.type(0.0)
    for a in range(v.shape[0]):
        v_sum += v[a]
    query_rows, steps, _ = query.shape
    items = query_rows * ((steps + step_block - 1) // step_block)
    out_of_range = np.empty(items, np.int64)  # per item (a prange reduction over the inlined item failed to compile)
    # One [S, A] block of e^{2k} per worker, not one allocation per item: an item's block is up to 400 KiB
    # (S = 196, A = 512), which malloc serves by mmap, page faults and all, every time. Workers take items round-robin
    # (rows of different lengths spread over the workers).
    make_key_exp = factorized and not keys_are_exp
    workers = max(1, min(threads, items))
    key_scratch = np.empty((workers, keys.shape[1] if make_key_exp else 0, v.shape[0]), v.dtype)
    for worker in numba.prange(workers):
        for item in range(worker, items, workers):
            out_of_range[item] = forward_item(item, query, keys, keys_are_exp, key_row_of, v, v_sum, value,
                                              value_row_of, key_limits, hidden, causal, factorized, largest,
                                              step_block, fuse_context, probs, context, key_scratch[worker])
    return out_of_range.sum()
