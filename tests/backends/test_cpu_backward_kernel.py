"""The fused numba tanh pass of the backward (attn_fast/backends/cpu_kernels/backward.py) against the float64
formula materialized at small shapes:

    t = tanh(q[b, i] + keys[index[b] or b, j] + extra[b, j]);   dE = 0 at keys j >= key_limits[b] (and j > i if causal)
    grad_query[b, i] = v sum_j dE (1 - t^2);  grad_row_keys[b, j] = v sum_i dE (1 - t^2);  grad_v = sum dE t

Fresh random inputs (never zeros); attention sizes that are not a multiple of the vector width, so that the
vectorized loops' remainders run too. The first run of this module compiles the kernels (about a minute on 2
cores); later runs load them from numba's cache.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from attn_fast.backends.cpu_kernels import backward
from attn_fast.backends.cpu_kernels.backward import tanh_pass_grads
from attn_fast.tolerances import gradient_tolerance, relative_error

DTYPES = {"fp32": (np.float32, torch.float32), "fp64": (np.float64, torch.float64)}


@dataclasses.dataclass
class Problem:
    """One call's arguments (numpy, in one dtype) and the sizes they came from."""

    query: np.ndarray  # [B_q, T, A]
    keys: np.ndarray  # [B_m, S, A]
    extra: np.ndarray | None  # [B_q, S, A]
    index: np.ndarray | None  # [B_q] int64
    v: np.ndarray  # [A]
    grad_scores: np.ndarray  # [B_q, T, S]
    key_limits: np.ndarray  # [B_q] int64
    causal: bool

    def call(self, factorized: bool, num_threads: int):
        return tanh_pass_grads(self.query, self.keys, self.extra, self.index, self.v, self.grad_scores,
                               self.key_limits, self.causal, factorized, num_threads)


def make_problem(dtype, *, query_rows=3, tgt_len=5, src_len=11, attn_dim=19, memory_rows=None, index=None,
                 extra=False, key_limits=None, causal=False, scale=1.0, seed=0) -> Problem:
    """Normal random inputs; `index` is a list of memory rows (repeats allowed), `key_limits` a list per query row
    (default S for every row); `scale` multiplies the query and key projections."""
    rng = np.random.default_rng(seed)
    memory_rows = query_rows if index is None else (memory_rows or max(index) + 1)
    limits = [src_len] * query_rows if key_limits is None else key_limits
    return Problem(
        query=(scale * rng.standard_normal((query_rows, tgt_len, attn_dim))).astype(dtype),
        keys=(scale * rng.standard_normal((memory_rows, src_len, attn_dim))).astype(dtype),
        extra=rng.standard_normal((query_rows, src_len, attn_dim)).astype(dtype) if extra else None,
        index=None if index is None else np.array(index, dtype=np.int64),
        v=rng.standard_normal(attn_dim).astype(dtype),
        grad_scores=rng.standard_normal((query_rows, tgt_len, src_len)).astype(dtype),
        key_limits=np.array(limits, dtype=np.int64),
        causal=causal,
    )


def reference(problem: Problem):
    """The formula in float64 torch, with the [B_q, T, S, A] tensor materialized."""
    def as64(array):
        return None if array is None else torch.from_numpy(array).double()

    query, keys, extra, v, grad_scores = map(as64, (problem.query, problem.keys, problem.extra, problem.v,
                                                    problem.grad_scores))
    _, tgt_len, src_len = grad_scores.shape
    row_keys = keys if problem.index is None else keys[torch.from_numpy(problem.index)]
    if extra is not None:
        row_keys = row_keys + extra
    visible = torch.arange(src_len)[None, None, :] < torch.from_numpy(problem.key_limits)[:, None, None]
    if problem.causal:
        visible = visible & (torch.arange(src_len)[None, :] <= torch.arange(tgt_len)[:, None])[None]
    grad_scores = torch.where(visible, grad_scores, torch.zeros(()))  # dE is 0 there; a NaN there is never read
    tanh = torch.tanh(query[:, :, None, :] + row_keys[:, None, :, :])
    weighted = grad_scores[..., None] * (1 - tanh * tanh)
    return v * weighted.sum(2), v * weighted.sum(1), (grad_scores[..., None] * tanh).sum((0, 1, 2))


def assert_close(result, expected, dtype):
    names = ("grad_query", "grad_row_keys", "grad_v")
    for name, actual, wanted in zip(names, result, expected):
        assert actual.shape == tuple(wanted.shape), name
        error = relative_error(torch.from_numpy(np.ascontiguousarray(actual)), wanted)
        assert error <= gradient_tolerance(dtype), f"{name}: relative error {error:.2e}"


CASES = {
    "plain": {},
    "index_repeated_rows_extra": {"query_rows": 4, "index": [1, 0, 1, 1], "extra": True},
    "key_limits_0_and_S": {"key_limits": [0, 11, 4]},
    "causal": {"tgt_len": 9, "src_len": 13, "causal": True, "key_limits": [13, 6, 2]},
    "causal_more_keys_than_steps": {"tgt_len": 4, "src_len": 23, "causal": True},
    "one_step": {"tgt_len": 1, "src_len": 40, "attn_dim": 40},
    "one_key": {"src_len": 1, "tgt_len": 7},
    "one_row_long": {"query_rows": 1, "tgt_len": 6, "src_len": 70, "attn_dim": 33},
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "direct"])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_float64_formula(case, dtype_name, factorized, threads):
    dtype, torch_dtype = DTYPES[dtype_name]
    problem = make_problem(dtype, **CASES[case])
    result = problem.call(factorized, threads)
    for array in result:
        assert array.dtype == dtype and array.flags.c_contiguous
    assert_close(result, reference(problem), torch_dtype)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_direct_form_is_exact_on_saturated_units(dtype_name):
    """|q + k| ~ 1e4 on every other unit: t = +-1 exactly there, so those units' query and key gradients are exactly
    0; every gradient (grad_v = sum dE sign(q) on those units) stays within tolerance."""
    dtype, torch_dtype = DTYPES[dtype_name]
    problem = make_problem(dtype, query_rows=2, tgt_len=4, src_len=9, attn_dim=21)
    saturated = np.arange(21) % 2 == 0
    problem.query[..., saturated] = np.sign(problem.query[..., saturated]) * 1e4
    grad_query, grad_row_keys, grad_v = problem.call(False, 2)
    assert not grad_query[..., saturated].any() and not grad_row_keys[..., saturated].any()
    expected = reference(problem)
    assert_close((grad_query, grad_row_keys, grad_v), expected, torch_dtype)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_factorized_form_at_the_edge_of_its_range(dtype_name):
    """|q|, |k| up to common.EXP_SAFE_MAGNITUDE (40 in fp32, 300 in fp64): e^{2q} e^{2k} overflows or underflows
    for many elements, and the factorized form must still give t = +-1 and 1 - t^2 = 0 there."""
    dtype, torch_dtype = DTYPES[dtype_name]
    edge = 40.0 if dtype == np.float32 else 300.0
    problem = make_problem(dtype, tgt_len=6, src_len=10, attn_dim=24)
    rng = np.random.default_rng(1)
    problem.query = rng.uniform(-edge, edge, problem.query.shape).astype(dtype)
    problem.keys = rng.uniform(-edge, edge, problem.keys.shape).astype(dtype)
    problem.query[0, 0, :3] = [edge, -edge, 0.0]
    problem.keys[0, 0, :3] = [edge, -edge, -edge]
    result = problem.call(True, 2)
    assert all(np.isfinite(array).all() for array in result)
    assert_close(result, reference(problem), torch_dtype)


@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "direct"])
def test_nan_in_grad_scores_propagates_at_visible_keys_only(factorized):
    problem = make_problem(np.float32, query_rows=3, tgt_len=5, src_len=11, key_limits=[11, 6, 11], causal=True)
    problem.grad_scores[0, 3, 2] = np.nan  # visible: j <= i, j < limit
    problem.grad_scores[1, 4, 8] = np.nan  # beyond row 1's key limit: never read
    problem.grad_scores[2, 1, 4] = np.nan  # j > i under causal: never read
    grad_query, grad_row_keys, grad_v = problem.call(factorized, 2)
    assert np.isnan(grad_query[0, 3]).all() and np.isnan(grad_row_keys[0, 2]).all() and np.isnan(grad_v).all()
    finite_query = np.ones(grad_query.shape[:2], dtype=bool)
    finite_query[0, 3] = False
    finite_keys = np.ones(grad_row_keys.shape[:2], dtype=bool)
    finite_keys[0, 2] = False
    assert np.isfinite(grad_query[finite_query]).all() and np.isfinite(grad_row_keys[finite_keys]).all()


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", [{"query_rows": 1, "tgt_len": 8, "src_len": 150, "attn_dim": 37},
                                   {"query_rows": 5, "tgt_len": 3, "src_len": 30, "causal": True}],
                         ids=["one_row_split_between_threads", "rows"])
def test_bit_identical_on_repeat_per_thread_count(shape, dtype_name):
    """No atomics, no races: the same thread count gives the same bits; other thread counts (other split points,
    other summation orders) agree within tolerance."""
    dtype, torch_dtype = DTYPES[dtype_name]
    problem = make_problem(dtype, **shape)
    results = {}
    for threads in (1, 2):
        first = problem.call(True, threads)
        for _ in range(3):
            again = problem.call(True, threads)
            assert all(np.array_equal(a, b) for a, b in zip(first, again)), f"{threads} thread(s) not repeatable"
        results[threads] = first
    for array_1, array_2 in zip(results[1], results[2]):
        assert relative_error(torch.from_numpy(array_2), torch.from_numpy(array_1)) <= gradient_tolerance(torch_dtype)


@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "direct"])
@pytest.mark.parametrize("case", ["key_limits_0_and_S", "causal_more_keys_than_steps", "one_row_long"])
def test_every_output_element_is_written(monkeypatch, case, factorized):
    """Outputs and partial buffers start as NaN (`empty_output` poisoned): the results must not change."""
    problem = make_problem(np.float64, **CASES[case])
    clean = problem.call(factorized, 2)

    def poisoned(shape, dtype):
        return np.full(shape, np.nan, dtype=dtype)

    monkeypatch.setattr(backward, "empty_output", poisoned)
    for threads in (1, 2):
        dirty = problem.call(factorized, threads)
        if threads == 2:
            assert all(np.array_equal(a, b) for a, b in zip(clean, dirty))
        assert all(np.isfinite(array).all() for array in dirty)


def test_inputs_are_not_modified_and_thread_count_is_restored():
    import numba

    problem = make_problem(np.float32, index=[0, 0, 1], extra=True)
    copies = {name: None if value is None else value.copy() for name, value in dataclasses.asdict(problem).items()
              if isinstance(value, np.ndarray)}
    before = numba.get_num_threads()
    problem.call(True, 1)
    assert numba.get_num_threads() == before
    for name, copy in copies.items():
        assert np.array_equal(getattr(problem, name), copy), name


def test_mixed_dtypes_and_strided_arrays_are_refused():
    problem = make_problem(np.float32)
    with pytest.raises(TypeError, match="grad_scores"):
        dataclasses.replace(problem, grad_scores=problem.grad_scores.astype(np.float64)).call(True, 1)
    with pytest.raises(TypeError, match="keys"):
        dataclasses.replace(problem, keys=np.asfortranarray(problem.keys)).call(True, 1)
    with pytest.raises(TypeError, match="key_limits"):
        dataclasses.replace(problem, key_limits=problem.key_limits.astype(np.int32)).call(True, 1)
    with pytest.raises(ValueError, match="v has shape"):
        dataclasses.replace(problem, v=problem.v[:-1].copy()).call(True, 1)
