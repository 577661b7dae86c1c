"""The memory-bounded torch backend against the float64 reference: forward and gradients, over a seeded random
grid of shapes, masks, layouts, dtypes, block sizes and both tanh forms."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_fast import additive_attention
from attn_fast.backends import common, torch_backend
from attn_fast.backends.torch_backend import _DirectTanh, _FactorizedTanh, _Operands, plan_blocks
from attn_fast.tolerances import forward_tolerance, gradient_tolerance
from attn_fast.tools.testing import MASK_KINDS, errors_against_reference, random_case
from attn_fast.validation import attention_call


def additive_attention_torch(query_proj, key_proj, value, v, *, tanh_form="auto",
                             chunk_elements=common.DEFAULT_CHUNK_ELEMENTS, **options):
    """The torch backend on a validated call, with its tuning knobs (tanh form, block size) exposed."""
    return torch_backend.attend(attention_call(query_proj, key_proj, value, v, **options), tanh_form=tanh_form,
                                chunk_elements=chunk_elements)


@pytest.fixture(autouse=True)
def poisoned_buffers(poison):
    """Every uninitialized buffer of the backend starts as NaN: an element the loops forget to write shows up."""
    return poison(common)


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (B, T, S, A, D): single step, single key, odd sizes, A and D not powers of two.
SHAPES = [(1, 1, 1, 1, 1), (2, 1, 7, 5, 3), (3, 5, 1, 6, 4), (2, 9, 13, 17, 11), (2, 16, 32, 24, 40), (1, 33, 3, 7, 2)]


def random_grid(count, seed) -> list:
    """`count` random cases (a list: pytest may iterate parameters more than once, a generator only once)."""
    rng = random.Random(seed)
    return [
        pytest.param(
            dict(
                shape=rng.choice(SHAPES), mask=MASK_KINDS[number % len(MASK_KINDS)], dtype=rng.choice(DTYPES),
                fully_masked_rows=rng.random() < 0.5, beam=rng.choice([0, 0, 3]), extra=rng.random() < 0.3,
                noncontiguous=rng.random() < 0.4, tanh_form=rng.choice(["auto", "direct", "factorized"]),
                chunk=rng.choice([1, 50, 1000, 1 << 20]), seed=number,
            ),
            id=f"case{number}",
        )
        for number in range(count)
    ]


def check_case(params, saturate=None):
    case = random_case(*params["shape"], mask=params["mask"], fully_masked_rows=params["fully_masked_rows"],
                       beam=params["beam"], extra_key_term=params["extra"], noncontiguous=params["noncontiguous"],
                       saturate=saturate, seed=params["seed"])

    def run(*inputs, **options):
        return additive_attention_torch(*inputs, **options, tanh_form=params["tanh_form"],
                                        chunk_elements=params["chunk"])

    errors = errors_against_reference(case, params["dtype"], run, seed=params["seed"])
    for name, error in errors.items():
        if name in ("context", "weights"):
            tolerance = forward_tolerance(params["dtype"])
        else:
            tolerance = gradient_tolerance(params["dtype"])
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:.1g} ({params})"


@pytest.mark.parametrize("params", random_grid(72, seed=2024))
def test_matches_reference(params):
    check_case(params)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["none", "mixed"])
def test_saturated_inputs(dtype, mask):
    """|q + k| up to ~1e4: tanh is +-1 almost everywhere; auto must fall back to the direct form."""
    params = dict(shape=(2, 6, 9, 10, 5), mask=mask, dtype=dtype, fully_masked_rows=True, beam=0, extra=False,
                  noncontiguous=False, tanh_form="auto", chunk=100, seed=3)
    check_case(params, saturate=3e3)


def test_auto_form_switches_on_magnitude():
    def form_for(scale, extra_scale=0.0):
        case = random_case(2, 3, 4, 5, 6, seed=1, extra_key_term=extra_scale > 0)
        query = case.query_proj * scale
        extra = None if case.extra_key_term is None else case.extra_key_term * extra_scale
        call = attention_call(query, case.key_proj, case.value, case.v, extra_key_term=extra)
        return _Operands(call, "auto", 1 << 20).form

    assert form_for(1.0) is _FactorizedTanh
    assert form_for(1e3) is _DirectTanh
    assert form_for(1.0, extra_scale=1e3) is _DirectTanh


def test_gradcheck_float64():
    case = random_case(2, 3, 5, 4, 3, mask="mixed", fully_masked_rows=True, beam=2, extra_key_term=True,
                       noncontiguous=True, dtype=torch.float64, seed=11).cast(torch.float64, requires_grad=True)
    names = list(case.float_tensors())

    def function(*tensors):
        options = case.options() | {"extra_key_term": tensors[4]}
        return additive_attention_torch(*tensors[:4], **options, need_weights=True, chunk_elements=30)

    assert torch.autograd.gradcheck(function, [getattr(case, name) for name in names], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 7, 64, 5000])
def test_block_plan_stays_within_budget(chunk):
    for rows, tgt_len, src_len, attn_dim in [(4, 5, 6, 7), (1, 1, 100, 3), (32, 50, 50, 256), (2, 3, 1, 1)]:
        blocks = plan_blocks(rows, tgt_len, src_len, attn_dim, chunk)
        assert blocks.elements_per_attn_dim * attn_dim <= max(chunk, attn_dim)
        assert 1 <= blocks.rows <= rows and 1 <= blocks.steps <= tgt_len and 1 <= blocks.keys <= src_len


def test_results_do_not_depend_on_block_size():
    case = random_case(3, 7, 11, 6, 5, mask="mixed", beam=2, extra_key_term=True, dtype=torch.float64, seed=5)
    results = [additive_attention_torch(*case.inputs(), **case.options(), need_weights=True, chunk_elements=chunk)
               for chunk in (1, 13, 100, 1 << 20)]
    for context, weights in results[1:]:
        torch.testing.assert_close(context, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(weights, results[0][1], rtol=1e-12, atol=1e-12)


def test_no_grad_and_partial_requires_grad():
    case = random_case(2, 4, 5, 6, 3, mask="lengths", seed=2)
    with torch.no_grad():
        context, _ = additive_attention(*case.inputs(), **case.options(), backend="torch")
    assert context.grad_fn is None
    query = case.query_proj.clone().requires_grad_()
    context, _ = additive_attention(query, case.key_proj, case.value, case.v, **case.options(), backend="torch")
    context.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_problems(backend):
    case = random_case(2, 3, 4, 5, 6, seed=0)
    q, k, value, v = case.inputs()
    for query_proj, key_proj, values, shape in [
        (q[:0], k[:0], value[:0], (0, 3, 6)), (q[:, :0], k, value, (2, 0, 6)), (q, k[:, :0], value[:, :0], (2, 3, 6)),
    ]:
        context, weights = additive_attention(query_proj, key_proj, values, v, need_weights=True, backend=backend)
        assert context.shape == shape and weights.shape == shape[:2] + (key_proj.shape[1],)
        assert torch.equal(context, torch.zeros(shape))


def test_empty_source_gradients_are_zero():
    case = random_case(2, 3, 4, 5, 6, seed=0).cast(torch.float32, requires_grad=True)
    key_proj, value = case.key_proj[:, :0], case.value[:, :0]
    context, _ = additive_attention(case.query_proj, key_proj, value, case.v, backend="torch")
    context.sum().backward()
    assert torch.equal(case.query_proj.grad, torch.zeros_like(case.query_proj))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    sizes=st.tuples(*[st.integers(1, 9)] * 5),
    mask=st.sampled_from(MASK_KINDS),
    beam=st.sampled_from([0, 2]),
    extra=st.booleans(),
    chunk=st.integers(1, 400),
    seed=st.integers(0, 2**16),
)
def test_property_any_small_problem_matches_reference(sizes, mask, beam, extra, chunk, seed):
    """Hypothesis explores shapes and block sizes the fixed grid does not name (float64: exact to rounding)."""
    case = random_case(*sizes, mask=mask, fully_masked_rows=seed % 2 == 0, beam=beam, extra_key_term=extra, seed=seed)

    def run(*inputs, **options):
        return additive_attention_torch(*inputs, **options, chunk_elements=chunk)

    errors = errors_against_reference(case, torch.float64, run, seed=seed)
    assert max(errors.values()) <= gradient_tolerance(torch.float64), errors


def test_key_and_extra_gradients_are_separate_tensors():
    case = random_case(2, 3, 4, 5, 6, extra_key_term=True, seed=9).cast(torch.float32, requires_grad=True)
    context, _ = additive_attention_torch(*case.inputs(), **case.options())
    context.sum().backward()
    torch.testing.assert_close(case.key_proj.grad, case.extra_key_term.grad)
    assert case.key_proj.grad.data_ptr() != case.extra_key_term.grad.data_ptr()


def test_inputs_are_scanned_once_per_forward_and_backward(monkeypatch):
    """The "auto" tanh form is decided from the inputs' magnitudes once per call; the backward reuses it."""
    scans = []
    real_scan = common.largest_operand
    for module in (common, torch_backend):  # common.resolve_tanh_form's scan, and any the backend makes itself
        monkeypatch.setattr(module, "largest_operand", lambda *args: scans.append(1) or real_scan(*args))
    case = random_case(batch=2, tgt_len=3, src_len=5, attn_dim=4, value_dim=3, seed=1)
    key_proj = case.key_proj.float().requires_grad_()
    context, _ = additive_attention(case.query_proj.float(), key_proj, case.value.float(), case.v.float(),
                                    backend="torch")
    context.sum().backward()
    assert len(scans) == 1
    assert key_proj.grad is not None and torch.isfinite(key_proj.grad).all()
