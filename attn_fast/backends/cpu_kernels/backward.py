"""The backward's one tanh pass on the CPU, compiled with numba: every reduction over the attention units A kept in
cache-resident rows, one pass over the [B, T, S, A] tanh tensor that is never stored.

With t = tanh(q[b, i] + k[b, j]) and k[b, j] = keys[index[b] or b, j] + extra[b, j] (docs/DESIGN.md, "Backward"):

    grad_v[a]               = sum_{b, i, j} dE[b, i, j] t[a]
    grad_query[b, i, a]     = v[a] sum_j dE[b, i, j] (1 - t[a]^2)
    grad_row_keys[b, j, a]  = v[a] sum_i dE[b, i, j] (1 - t[a]^2)     (per query row; the caller scatters to memory)

Two forms of t (the caller chooses, as the torch backend does, common.EXP_SAFE_MAGNITUDE):
  factorized  r = 1 / (1 + e^{2q} e^{2k}) with e^{2q}, e^{2k} computed once per query step / key of a tile:
              t = 1 - 2r, 1 - t^2 = 4 (r - r^2); per element one FMA, one reciprocal and five multiply-adds.
              The reciprocal is Newton steps from an exponent-bit seed, not a divide, and e^x a polynomial, not a
              libm call (`vector_reciprocal`, `vector_exp`): both vectorize, and both measured several times
              faster on this CPU (benchmarks/NOTES.md).
  per element (factorized=False; the torch backend's "direct" form, the kernels' "exp" form) the same r from
              e^{2(q + k)} per element, for inputs beyond the factorized range: e^{2x} = inf gives r = 0 and e^{2x}
              = 0 gives r = 1 exactly, so saturated elements give t = +-1 and 1 - t^2 = 0 exactly. (numba's tanh is
              a scalar libm call, measured 3-5x slower than the torch backend's pass; this form vectorizes.)

Work: items are (query row b, tile of TILE_KEYS keys), ordered by row then tile; the items are cut into one
contiguous range per thread with equal numbers of (step, key) pairs (causal and key_limits make items unequal). A
thread owns its items' grad_row_keys tiles outright; it sums a row's grad_query over its tiles in a private [T, A]
accumulator and writes it to grad_query when it holds the row's first item, else (a row split between threads,
at most one per thread) into its own partial, added afterwards in thread order. grad_v goes through per-thread
float64 partials summed in thread order. Nothing is atomic and every order is fixed by the thread count: repeated
calls with the same `num_threads` give bit-identical results. Each call is one parallel region (a thread computes
e^{2q} of the rows it visits itself), so that a decode step does not wait several times for every thread to be
scheduled on a busy machine.
"""
from __future__ import annotations

import numba
import numpy as np

from attn_fast.backends.cpu_kernels.vector_math import vector_exp, vector_reciprocal

#: Keys per work item: a thread keeps the tile's keys (or e^{2k}) and its grad_row_keys rows, [TILE_KEYS, A], in L1
#: next to one query row; fewer keys per tile when that is needed to give every thread work (`_tile_keys`).
TILE_KEYS = 16

#: LLVM fast-math flags of the compiled loops. "contract" fuses r - r*r and 1 - t*t into single-rounding FMAs (more
#: accurate than two roundings, and fewer instructions); "arcp" changed nothing measurable (LLVM keeps vdivps, and
#: the factorized loop divides no more). "reassoc" is not needed (no loop here reduces across A) and would break the
#: shifter rounding of `vector_exp`. "nnan"/"ninf" are left out: saturated inputs make e^{2q} e^{2k} infinite on purpose
#: (r = 0, t = 1 exactly), and NaN in dE must propagate.
FASTMATH = {"contract", "arcp"}


def empty_output(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Every array this module returns or reduces into is allocated here, uninitialized: the kernels write each
    element. Tests replace it with one that fills NaN, to prove that claim."""
    return np.empty(shape, dtype=dtype)


@numba.njit(cache=True)
def _plan_items(key_limits, tgt_len, src_len, tile_keys, causal, num_workers):
    """Work items and their split among workers.

    Returns item_rows [N], item_starts [N] (first key of each item's tile), covered [B_q] (keys [0, covered[b])
    are written by items; the rest of grad_row_keys[b] is zero) and worker_bounds [W + 1] (worker w takes items
    worker_bounds[w]:worker_bounds[w + 1]), cut where the running count of (step, key) pairs crosses w / W of the
    total.
    """
    query_rows = key_limits.shape[0]
    covered = np.zeros(query_rows, np.int64)
    count = 0
    for b in range(query_rows):
        limit = min(max(key_limits[b], 0), src_len)
        if causal:  # key j is seen by steps i >= j only: keys from T on are seen by no step
            limit = min(limit, tgt_len)
        covered[b] = limit
        count += (limit + tile_keys - 1) // tile_keys
    item_rows = np.empty(count, np.int64)
    item_starts = np.empty(count, np.int64)
    cost = np.empty(count + 1, np.float64)  # running (step, key) pairs before each item
    cost[0] = 0.0
    n = 0
    for b in range(query_rows):
        for start in range(0, covered[b], tile_keys):
            stop = min(start + tile_keys, covered[b])
            pairs = 0
            for j in range(start, stop):
                pairs += tgt_len - j if causal else tgt_len
            item_rows[n] = b
            item_starts[n] = start
            cost[n + 1] = cost[n] + pairs
            n += 1
    worker_bounds = np.empty(num_workers + 1, np.int64)
    worker_bounds[0] = 0
    item = 0
    for w in range(1, num_workers):
        target = cost[count] * w / num_workers
        while item < count and cost[item + 1] <= target:
            item += 1
        worker_bounds[w] = item
    worker_bounds[num_workers] = count
    return item_rows, item_starts, covered, worker_bounds


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _tanh_pass(query, keys, extra, has_extra, key_rows, v, grad_scores, causal, factorized, consts,
               item_rows, item_starts, covered, worker_bounds, tile_keys,
               grad_query, grad_row_keys, query_partials, gv_partials, weight_sums):
    """`_tanh_pass_items` on numba's thread pool."""
    _tanh_pass_items(query, keys, extra, has_extra, key_rows, v, grad_scores, causal, factorized, consts,
                     item_rows, item_starts, covered, worker_bounds, tile_keys,
                     grad_query, grad_row_keys, query_partials, gv_partials, weight_sums)


# The one-thread build: no thread pool (a forked child must not start one; cpu_kernels.THREADING_LAYER_PRIORITY),
# and error_model="numpy" so that its loops vectorize as the parallel build's do (cpu_kernels/forward.py).
@numba.njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _tanh_pass_serial(query, keys, extra, has_extra, key_rows, v, grad_scores, causal, factorized, consts,
                      item_rows, item_starts, covered, worker_bounds, tile_keys,
                      grad_query, grad_row_keys, query_partials, gv_partials, weight_sums):
    """`_tanh_pass_items` in the calling thread (one worker)."""
    _tanh_pass_items(query, keys, extra, has_extra, key_rows, v, grad_scores, causal, factorized, consts,
                     item_rows, item_starts, covered, worker_bounds, tile_keys,
                     grad_query, grad_row_keys, query_partials, gv_partials, weight_sums)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _tanh_pass_items(query, keys, extra, has_extra, key_rows, v, grad_scores, causal, factorized, consts,
                     item_rows, item_starts, covered, worker_bounds, tile_keys,
                     grad_query, grad_row_keys, query_partials, gv_partials, weight_sums):
    """The pass itself; see the module docstring. consts = [1, 2, 4] in the input dtype (4: 1 - t^2 = 4 (r - r^2)),
    so that no float64 literal widens fp32 arithmetic. tanh_sums collects sum dE r (t = 1 - 2r) in both forms."""
    query_rows, tgt_len, attn_dim = query.shape
    src_len = keys.shape[1]
    num_workers = worker_bounds.shape[0] - 1
    one = consts[0]
    two = consts[1]
    scale = consts[2]

    # Everything no item writes: keys past a row's coverage, and the grad_query rows of rows without items. On the
    # calling thread: one parallel region per call (on a busy machine each region waits for every thread to be
    # scheduled, which cost a decode step more than its work).
    for b in range(query_rows):
        for j in range(covered[b], src_len):
            for a in range(attn_dim):
                grad_row_keys[b, j, a] = 0
        if covered[b] == 0:
            for i in range(tgt_len):
                for a in range(attn_dim):
                    grad_query[b, i, a] = 0

    for w in numba.prange(num_workers):
        dtype = query.dtype
        key_tile = np.empty((tile_keys, attn_dim), dtype)  # e^{2k} or k of the tile's keys
        key_grads = np.empty((tile_keys, attn_dim), dtype)
        row_query = np.empty((tgt_len, attn_dim), dtype)  # e^{2q} or q of the worker's current row
        row_grads = np.empty((tgt_len, attn_dim), dtype)  # this worker's sum over keys for its row
        tanh_sums = np.zeros(attn_dim, dtype)  # sum dE r over one item (t = 1 - 2r)
        weight_sum = 0.0  # sum of dE, float64
        owns_row = True
        for a in range(attn_dim):
            gv_partials[w, a] = 0
        first, last = worker_bounds[w], worker_bounds[w + 1]
        for item in range(first, last):
            b = item_rows[item]
            if item == first or item_rows[item - 1] != b:  # the worker's first item of row b
                row_grads[:, :] = 0
                owns_row = item_starts[item] == 0
                # e^{2q} once per row and worker (twice only for a row split between workers); the later items of
                # the row start at later keys, hence (causal) at later steps.
                for i in range(item_starts[item] if causal else 0, tgt_len):
                    for a in range(attn_dim):
                        row_query[i, a] = vector_exp(two * query[b, i, a]) if factorized else query[b, i, a]
            key_start = item_starts[item]
            key_stop = min(key_start + tile_keys, covered[b])
            keys_in_tile = key_stop - key_start
            memory_row = key_rows[b]
            for jj in range(keys_in_tile):
                for a in range(attn_dim):
                    k = keys[memory_row, key_start + jj, a]
                    if has_extra:
                        k += extra[b, key_start + jj, a]
                    key_tile[jj, a] = vector_exp(two * k) if factorized else k
                    key_grads[jj, a] = 0
            step_start = key_start if causal else 0
            for i in range(step_start, tgt_len):
                q_row = row_query[i]
                g_row = row_grads[i]
                stop = min(keys_in_tile, i + 1 - key_start) if causal else keys_in_tile
                for jj in range(stop):
                    weight = grad_scores[b, i, key_start + jj]
                    weight_sum += weight
                    k_row = key_tile[jj]
                    gk_row = key_grads[jj]
                    if factorized:
                        for a in range(attn_dim):
                            r = vector_reciprocal(one + q_row[a] * k_row[a])
                            tanh_sums[a] += weight * r
                            d = weight * (r - r * r)
                            g_row[a] += d
                            gk_row[a] += d
                    else:
                        for a in range(attn_dim):
                            r = vector_reciprocal(one + vector_exp(two * (q_row[a] + k_row[a])))
                            tanh_sums[a] += weight * r
                            d = weight * (r - r * r)
                            g_row[a] += d
                            gk_row[a] += d
            for jj in range(keys_in_tile):
                for a in range(attn_dim):
                    grad_row_keys[b, key_start + jj, a] = scale * v[a] * key_grads[jj, a]
            for a in range(attn_dim):
                gv_partials[w, a] += tanh_sums[a]
                tanh_sums[a] = 0
            if item == last - 1 or item_rows[item + 1] != b:  # the worker's last item of row b: flush the row
                # The worker that holds a row's first tile writes grad_query; a row split between workers
                # reaches the others as their first row, which they leave in their partial.
                target = grad_query[b] if owns_row else query_partials[w]
                for i in range(tgt_len):
                    for a in range(attn_dim):
                        target[i, a] = scale * v[a] * row_grads[i, a]
        weight_sums[w] = weight_sum

    # Rows split between workers: the later workers' shares, added in worker order.
    for w in range(num_workers):
        first = worker_bounds[w]
        if first < worker_bounds[w + 1] and item_starts[first] != 0:
            b = item_rows[first]
            for i in range(tgt_len):
                for a in range(attn_dim):
                    grad_query[b, i, a] += query_partials[w, i, a]


def _tile_keys(query_rows: int, src_len: int, num_threads: int) -> int:
    """TILE_KEYS, or fewer keys per tile when a few long rows would otherwise leave threads without items (at
    least 4 items per thread where the keys allow it)."""
    tiles_wanted = -(-4 * num_threads // max(query_rows, 1))
    return max(1, min(TILE_KEYS, src_len // tiles_wanted if tiles_wanted > 1 else TILE_KEYS))


def _check_arrays(query, keys, extra, index, v, grad_scores, key_limits) -> None:
    """One float dtype, C-contiguous, int64 indices, matching sizes: anything else would compile a slower
    specialization (or read out of bounds) instead of failing."""
    if query.dtype not in (np.float32, np.float64):
        raise TypeError(f"query must be float32 or float64, got {query.dtype}")
    query_rows, tgt_len, attn_dim = query.shape
    expected = {"keys": (None, None, attn_dim), "extra": (query_rows, keys.shape[1], attn_dim), "v": (attn_dim,),
                "grad_scores": (query_rows, tgt_len, keys.shape[1])}
    for name, array in (("keys", keys), ("extra", extra), ("v", v), ("grad_scores", grad_scores)):
        if array is None:
            continue
        if array.dtype != query.dtype or not array.flags.c_contiguous:
            raise TypeError(f"{name} must be C-contiguous {query.dtype}, got {array.dtype}"
                            f"{'' if array.flags.c_contiguous else ' (not C-contiguous)'}")
        shape = expected[name]
        if len(array.shape) != len(shape) or any(want not in (None, got) for want, got in zip(shape, array.shape)):
            raise ValueError(f"{name} has shape {array.shape}, expected {shape} (None: any)")
    if not query.flags.c_contiguous:
        raise TypeError("query must be C-contiguous")
    for name, array, length in (("index", index, query_rows), ("key_limits", key_limits, query_rows)):
        if array is not None and (array.dtype != np.int64 or array.shape != (length,)):
            raise TypeError(f"{name} must be int64 of shape ({length},), got {array.dtype} {array.shape}")


def tanh_pass_grads(query, keys, extra, index, v, grad_scores, key_limits, causal, factorized, num_threads):
    """The tanh pass of the backward: (grad_query [B_q, T, A], grad_row_keys [B_q, S, A], grad_v [A]).

    numpy arrays of one float dtype (float32 or float64), C-contiguous: query [B_q, T, A], keys [B_m, S, A],
    extra [B_q, S, A] or None, index int64 [B_q] or None (the memory row of each query row; None: row b reads
    keys[b]), v [A], grad_scores dE [B_q, T, S], key_limits int64 [B_q] (keys j >= key_limits[b] are skipped: the
    caller guarantees dE = 0 there). `causal` skips j > i. `factorized` takes the e^{2q} e^{2k} form, valid while
    every |q| and |k| (keys + extra) stays within common.EXP_SAFE_MAGNITUDE; else r from e^{2(q + k)} per element
    (any range; exact at saturation).

    Runs on `num_threads` numba threads (at most numba.config.NUMBA_NUM_THREADS; the previous count is restored);
    the result is bit-identical on repeat for one thread count. Returns new arrays in the input dtype, accumulated
    in it (grad_v through float64 partials). grad_row_keys is per query row: the caller sums it into memory rows
    through `index` (it is also the gradient of `extra`).
    """
    _check_arrays(query, keys, extra, index, v, grad_scores, key_limits)
    # More threads than numba started cannot run; the count used decides the summation order (and so the bits).
    num_threads = max(1, min(int(num_threads), numba.config.NUMBA_NUM_THREADS))
    dtype = query.dtype
    query_rows, tgt_len, attn_dim = query.shape
    src_len = keys.shape[1]
    key_rows = np.arange(query_rows, dtype=np.int64) if index is None else index
    has_extra = extra is not None
    extra_arg = extra if has_extra else keys[:0]  # a typed stand-in, never read
    tile_keys = _tile_keys(query_rows, src_len, num_threads)
    consts = np.array([1.0, 2.0, 4.0], dtype=dtype)

    previous_threads = numba.get_num_threads()
    numba.set_num_threads(num_threads)
    try:
        item_rows, item_starts, covered, worker_bounds = _plan_items(
            key_limits, tgt_len, src_len, tile_keys, causal, num_threads)
        grad_query = empty_output((query_rows, tgt_len, attn_dim), dtype)
        grad_row_keys = empty_output((query_rows, src_len, attn_dim), dtype)
        query_partials = empty_output((num_threads, tgt_len, attn_dim), dtype)
        gv_partials = empty_output((num_threads, attn_dim), np.float64)
        weight_sums = empty_output((num_threads,), np.float64)
        tanh_pass = _tanh_pass_serial if num_threads == 1 else _tanh_pass
        tanh_pass(query, keys, extra_arg, has_extra, key_rows, v, grad_scores, causal, factorized, consts,
                  item_rows, item_starts, covered, worker_bounds, tile_keys,
                  grad_query, grad_row_keys, query_partials, gv_partials, weight_sums)
    finally:
        numba.set_num_threads(previous_threads)
    tanh_sums = gv_partials.sum(axis=0)
    grad_v = weight_sums.sum() - 2.0 * tanh_sums  # sum dE t = sum dE (1 - 2r)
    return grad_query, grad_row_keys, grad_v.astype(dtype)
