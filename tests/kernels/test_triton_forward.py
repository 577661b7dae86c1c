"""The Triton forward kernels (kernels/forward.py) against the float64 reference.

On CPU they run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay tiny but cross the
tile edges of the configurations actually chosen (BLOCK_T 1/16/32/64, BLOCK_S 32/64/128, BLOCK_A 8/16). Every
test runs with the output and scratch buffers pre-filled with NaN (the `poisoned_buffers` fixture), so an element
the kernels forget to write shows up as NaN and fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

from attn_fast import additive_attention_reference
from attn_fast.tolerances import forward_tolerance, relative_error
from attn_fast.tools.testing import MASK_KINDS, random_case
from attn_fast.validation import attention_call

# attn_fast.kernels is the top-level kernels/ folder, installed under that name by setup.py's package_dir mapping.
forward = pytest.importorskip("attn_fast.kernels.forward")
configs = pytest.importorskip("attn_fast.kernels.configs")
launcher = pytest.importorskip("attn_fast.kernels.launch")

TUNING = ("weights_dtype", "tanh_form", "num_splits")


def attention_forward(query_proj, key_proj, value, v, **arguments):
    """The forward launcher on a call validated by the library (`attention_call`); tuning keywords pass through."""
    tuning = {name: arguments.pop(name) for name in TUNING if name in arguments}
    return forward.attention_forward(attention_call(query_proj, key_proj, value, v, **arguments), **tuning)


def plan_forward(query_proj, key_proj, value, v, **options):
    return forward.plan_forward(attention_call(query_proj, key_proj, value, v, **options))

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The reciprocal tanh forms overflow to +-inf on purpose (1 / inf = 0 is the saturated limit, see kernels/tanh.py);
# the interpreter computes with numpy, which reports each such overflow.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned_buffers(poison):
    """Every buffer the launcher allocates starts as NaN: unwritten elements fail (see conftest's `poison`)."""
    return poison(launcher)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def visible_keys(case) -> torch.Tensor:
    """[B_q, T, S] bool, computed here independently of both the kernels and the reference."""
    query_rows, tgt_len, _ = case.query_proj.shape
    src_len = case.key_proj.shape[1]
    device = case.query_proj.device
    memory = case.index if case.index is not None else torch.arange(query_rows, device=device)
    keys = torch.arange(src_len, device=device)
    visible = torch.ones(query_rows, tgt_len, src_len, dtype=torch.bool, device=device)
    if case.key_lengths is not None:
        visible &= keys[None, None, :] < case.key_lengths[memory][:, None, None]
    if case.key_padding_mask is not None:
        mask = case.key_padding_mask
        visible &= ~(mask[memory][:, None, :] if mask.dim() == 2 else mask)
    if case.causal:
        visible &= keys[None, None, :] <= torch.arange(tgt_len, device=device)[None, :, None]
    return visible


def reference_lse(case64) -> torch.Tensor:
    """Natural log-sum-exp of the visible float64 scores; +inf for a row without visible key."""
    key_proj = case64.key_proj if case64.index is None else case64.key_proj[case64.index]
    if case64.extra_key_term is not None:
        key_proj = key_proj + case64.extra_key_term
    scores = (torch.tanh(case64.query_proj[:, :, None, :] + key_proj[:, None, :, :]) * case64.v).sum(-1)
    lse = torch.logsumexp(scores.masked_fill(~visible_keys(case64), float("-inf")), dim=-1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def check_against_reference(case, *, need_weights: bool, tolerance: float | None = None, **overrides):
    """Run the kernels on `case`, compare context, weights and lse with float64, and return the outputs."""
    context, lse, weights = attention_forward(*case.inputs(), **case.options(), need_weights=need_weights,
                                                      **overrides)
    dtype = case.query_proj.dtype
    tolerance = forward_tolerance(dtype) if tolerance is None else tolerance
    case64 = case.cast(torch.float64)
    expected_context, expected_weights = additive_attention_reference(*case64.inputs(), **case64.options(),
                                                                      need_weights=True)
    assert context.dtype == dtype and context.shape == expected_context.shape
    assert lse.dtype == torch.float32 and lse.shape == context.shape[:2]
    assert relative_error(context, expected_context) <= tolerance
    if need_weights:
        assert weights.dtype == dtype and weights.shape == expected_weights.shape
        assert relative_error(weights, expected_weights) <= tolerance
        assert (weights[~visible_keys(case)] == 0).all()
    else:
        assert weights is None

    expected_lse = reference_lse(case64)
    assert not torch.isnan(lse).any()
    empty_rows = torch.isinf(expected_lse)
    assert torch.equal(torch.isposinf(lse), empty_rows)
    if (~empty_rows).any():
        # lse is an fp32 statistic of the scores: absolute error relative to the scores' scale.
        scale = 1.0 + float(expected_lse[~empty_rows].abs().max())
        assert float((lse[~empty_rows].double() - expected_lse[~empty_rows]).abs().max()) <= tolerance * scale * 10
    assert (context[empty_rows] == 0).all()
    return context, lse, weights


# ----------------------------------------------------------------------------------------------------------------
# the randomized grid

# (B, T, S, A, D): T = 1 and S = 1, sizes on and just past the tile edges, A and D not powers of two.
SHAPES = [
    (2, 1, 1, 3, 2),
    (2, 1, 37, 13, 7),
    (3, 4, 130, 5, 6),
    (1, 5, 1, 4, 3),
    (2, 16, 32, 8, 16),
    (2, 17, 33, 9, 17),
    (1, 40, 20, 12, 5),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_fp32_matches_reference(shape, mask, triton_device):
    batch, tgt_len, src_len, attn_dim, value_dim = shape
    seed = SHAPES.index(shape) * 10 + MASK_KINDS.index(mask)
    case = random_case(batch, tgt_len, src_len, attn_dim, value_dim, mask=mask, seed=seed, device=triton_device)
    check_against_reference(case, need_weights=seed % 2 == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("shape", [(2, 1, 37, 13, 7), (2, 17, 33, 9, 17)], ids=["decode", "all_steps"])
def test_dtypes(dtype, need_weights, shape, triton_device):
    case = random_case(*shape, mask="mixed", dtype=dtype, seed=3, device=triton_device)
    check_against_reference(case, need_weights=need_weights)


@pytest.mark.parametrize("mask", [m for m in MASK_KINDS if m != "none"])
@pytest.mark.parametrize("tgt_len", [1, 18])
def test_fully_masked_rows_give_zeros_and_infinite_lse(mask, tgt_len, triton_device):
    case = random_case(3, tgt_len, 21, 6, 5, mask=mask, fully_masked_rows=True, seed=tgt_len, device=triton_device)
    context, lse, weights = check_against_reference(case, need_weights=True)
    empty_rows = ~visible_keys(case).any(dim=-1)
    if mask != "causal" or case.key_lengths is not None:
        assert empty_rows.any(), "the case should contain a row without visible key"
    assert torch.isposinf(lse[empty_rows]).all()
    assert (context[empty_rows] == 0).all() and (weights[empty_rows] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["lengths", "padding_per_query", "causal", "mixed"])
def test_noncontiguous_inputs(dtype, mask, triton_device):
    case = random_case(2, 17, 35, 10, 9, mask=mask, noncontiguous=True, extra_key_term=True, dtype=dtype, seed=5,
                       device=triton_device)
    assert not case.query_proj.is_contiguous() and not case.v.is_contiguous()
    check_against_reference(case, need_weights=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["lengths", "padding", "padding_per_query", "mixed"])
@pytest.mark.parametrize("tgt_len", [1, 17])
def test_beam_index_and_extra_key_term(dtype, mask, tgt_len, triton_device):
    """index maps query rows to memory rows (key_proj, value, key_lengths and a 2-D mask follow it; query_proj, a
    3-D mask and extra_key_term do not)."""
    case = random_case(2, tgt_len, 19, 7, 6, mask=mask, beam=3, extra_key_term=True, dtype=dtype, seed=tgt_len,
                       device=triton_device)
    assert case.index is not None and case.query_proj.shape[0] == 6 and case.key_proj.shape[0] == 2
    check_against_reference(case, need_weights=tgt_len == 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 1, 40, 11, 5), (2, 20, 40, 11, 5)], ids=["decode", "all_steps"])
def test_saturated_inputs(dtype, shape, triton_device):
    """|query_proj + key_proj| up to ~1e4: every tanh is +-1 up to rounding, scores are sums of +-v."""
    case = random_case(*shape, mask="mixed", scale=1e4, extra_key_term=True, dtype=dtype, seed=11, device=triton_device)
    context, _, weights = check_against_reference(case, need_weights=True)
    assert torch.isfinite(context).all() and torch.isfinite(weights).all()


def test_large_but_finite_arguments_cross_the_factorized_range(triton_device):
    """Query tiles and key chunks on both sides of FACTORIZED_LIMIT: the factorized tanh and its exp fallback mix
    within one call and must both stay fp32-accurate."""
    case = random_case(2, 40, 70, 16, 4, mask="padding", seed=13, device=triton_device)
    limit = forward.FACTORIZED_LIMIT.value
    with torch.no_grad():
        case.query_proj[0] *= 8.0  # batch row 0: many |q| > limit; row 1: in range
        case.key_proj[:, 40:] *= 15.0  # later key tiles out of range
        case.query_proj[1, :, 0] = limit  # exactly at the limit
    assert case.query_proj[0].abs().max() > limit >= case.query_proj[1].abs().max()
    check_against_reference(case, need_weights=True, tanh_form="factorized")


@pytest.mark.parametrize("tgt_len", [1, 20])
def test_huge_projections_with_small_sums_keep_fp32_accuracy(tgt_len, triton_device):
    """|q|, |k| ~ 1e4 but q + k ~ 1: tanh(q + k) must come from the (exact) fp32 sum, not from e^{2q} e^{2k} or
    q * 2log2(e) + k * 2log2(e), which lose ~1e-3 to rounding at that magnitude."""
    case = random_case(2, tgt_len, 30, 12, 5, mask="lengths", seed=67, device=triton_device)
    with torch.no_grad():
        case.query_proj.mul_(1e4).round_()  # integers: exactly representable, and so are their negations
        case.key_proj.copy_(-case.query_proj[:, :1, :] + case.key_proj)
    assert case.query_proj.abs().max() > 1e3
    check_against_reference(case, need_weights=True)


def test_v_with_zeros_tiny_and_huge_entries(triton_device):
    case = random_case(2, 20, 33, 9, 4, seed=17, device=triton_device)
    with torch.no_grad():
        case.v[0] = 0.0
        case.v[1] = -0.0
        case.v[2] = 1e-35  # below the "negligible" threshold: contributes nothing visible
    check_against_reference(case, need_weights=True)
    with torch.no_grad():
        case.v[3] = 1e19  # beyond FACTORIZED_V_LIMIT: the exp form must take over
    _, lse, _ = attention_forward(*case.inputs(), **case.options())
    assert torch.isfinite(lse).all()
    check_against_reference(case, need_weights=True)


@pytest.mark.parametrize("tanh_form", ["exp", "factorized", "approx", "libdevice"])
@pytest.mark.parametrize("tgt_len", [1, 20])
def test_every_tanh_form_is_selectable(tanh_form, tgt_len, triton_device):
    """Under the interpreter "approx" and "libdevice" run the portable formula; on a GPU they are what they say
    (the fp16 tolerance is what tanh.approx is held to)."""
    case = random_case(2, tgt_len, 30, 10, 6, mask="lengths", seed=19, device=triton_device)
    tolerance = None if tanh_form in ("exp", "factorized") or launcher.is_interpreter() else 2e-3
    check_against_reference(case, need_weights=False, tanh_form=tanh_form, tolerance=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_weights_in_fp32_for_half_inputs(dtype, triton_device):
    case = random_case(2, 17, 20, 6, 5, mask="mixed", dtype=dtype, seed=71, device=triton_device)
    context, _, weights = attention_forward(*case.inputs(), **case.options(), need_weights=True,
                                                    weights_dtype=torch.float32)
    _, half_weights = check_against_reference(case, need_weights=True)[::2]
    case64 = case.cast(torch.float64)
    _, expected = additive_attention_reference(*case64.inputs(), **case64.options(), need_weights=True)
    assert weights.dtype == torch.float32 and context.dtype == dtype
    # Not rounded to the half dtype: closer to float64 than the half weights are.
    assert relative_error(weights, expected) < relative_error(half_weights, expected)


def test_unknown_tanh_form_is_rejected(triton_device):
    case = random_case(1, 2, 3, 4, 5, device=triton_device)
    with pytest.raises(ValueError, match="tanh_form"):
        attention_forward(*case.inputs(), tanh_form="fast")


# ----------------------------------------------------------------------------------------------------------------
# the split-S (flash-decoding) path


@pytest.mark.parametrize("mask", ["none", "lengths", "padding", "mixed"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_split_keys_match_reference(mask, need_weights, triton_device):
    case = random_case(2, 1, 300, 6, 5, mask=mask, fully_masked_rows=True, seed=23, device=triton_device)
    check_against_reference(case, need_weights=need_weights, num_splits=3)


def test_split_keys_with_causal_steps(triton_device):
    case = random_case(2, 10, 140, 5, 4, mask="mixed", seed=29, device=triton_device)
    check_against_reference(case, need_weights=False, num_splits=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_with_index_equals_all_steps_on_repeated_memory(dtype, triton_device):
    """Single-step decoding with beam index and key splits = the unsplit kernel on memory repeated per beam."""
    case = random_case(2, 1, 280, 7, 6, mask="mixed", beam=3, extra_key_term=True, dtype=dtype, seed=31,
                       device=triton_device)
    split = attention_forward(*case.inputs(), **case.options(), need_weights=True, num_splits=4)
    repeated = dict(case.options(), index=None, key_lengths=case.key_lengths[case.index],
                    key_padding_mask=case.key_padding_mask[case.index])
    unsplit = attention_forward(case.query_proj, case.key_proj[case.index], case.value[case.index], case.v,
                                        **repeated, need_weights=True, num_splits=1)
    tolerance = forward_tolerance(dtype)
    for actual, expected in zip(split, unsplit):
        assert relative_error(actual.masked_fill(actual.isinf(), 0), expected.masked_fill(expected.isinf(), 0)) \
            <= tolerance
    assert torch.equal(split[1].isinf(), unsplit[1].isinf())


def test_heuristic_splits_small_batches_with_long_keys(triton_device):
    config = configs.forward_config(query_rows=2, tgt_len=1, src_len=2000, attn_dim=128, value_dim=64,
                                    dtype=torch.float32, need_weights=False, sm_count=132)
    assert config.num_splits > 1 and config.block_t == 1
    big_batch = configs.forward_config(query_rows=512, tgt_len=1, src_len=2000, attn_dim=128, value_dim=64,
                                       dtype=torch.float32, need_weights=False, sm_count=132)
    assert big_batch.num_splits == 1
    # The launcher's default path on such a problem: split, and correct.
    case = random_case(1, 1, 600, 5, 3, mask="lengths", seed=37, device=triton_device)
    plan = plan_forward(*case.inputs(), **case.options())
    assert plan.launches[1].grid[1] > 1
    check_against_reference(case, need_weights=False)


# ----------------------------------------------------------------------------------------------------------------
# configuration, contract details


def test_default_tanh_forms_per_dtype():
    def form(dtype, tgt_len):
        return configs.forward_config(query_rows=64, tgt_len=tgt_len, src_len=50, attn_dim=256, value_dim=128,
                                      dtype=dtype, need_weights=False).tanh_form

    assert form(torch.float32, 50) == "factorized"  # 1 MUFU op per tanh, fp32-accurate
    assert form(torch.float32, 1) == "exp"  # decoding: no rows to share the exponentials
    assert form(torch.float16, 50) == form(torch.bfloat16, 1) == "approx"


def test_large_value_dim_takes_the_two_kernel_path(triton_device):
    case = random_case(1, 18, 20, 6, 300, mask="causal", seed=41, device=triton_device)
    plan = plan_forward(*case.inputs(), **case.options())
    assert not plan.config.fuse_context
    assert [launch.kernel.__name__ for launch in plan.launches][-1] == "_context_from_scores_kernel"
    check_against_reference(case, need_weights=False)


@pytest.mark.parametrize("lengths_dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_dtypes_of_lengths_and_index(lengths_dtype, triton_device):
    case = random_case(2, 3, 9, 4, 3, mask="lengths", beam=2, seed=43, device=triton_device)
    case.key_lengths = case.key_lengths.to(lengths_dtype)
    case.index = case.index.to(torch.int32)
    check_against_reference(case, need_weights=True)


def test_inputs_are_not_modified(triton_device):
    case = random_case(2, 17, 21, 6, 5, mask="mixed", beam=2, extra_key_term=True, noncontiguous=True, seed=47,
                       device=triton_device)
    tensors = {**case.float_tensors(), "key_lengths": case.key_lengths, "key_padding_mask": case.key_padding_mask,
               "index": case.index}
    before = {name: tensor.clone() for name, tensor in tensors.items()}
    attention_forward(*case.inputs(), **case.options(), need_weights=True)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, before[name]), name


def test_no_buffer_of_size_b_t_s_a(poisoned_buffers, triton_device):
    batch, tgt_len, src_len, attn_dim, value_dim = 2, 17, 21, 6, 5
    case = random_case(batch, tgt_len, src_len, attn_dim, value_dim, mask="lengths", seed=53, device=triton_device)
    attention_forward(*case.inputs(), **case.options(), need_weights=True)
    assert poisoned_buffers, "the launcher must allocate through empty_buffer"
    assert max(buffer.numel() for buffer in poisoned_buffers) < batch * tgt_len * src_len * attn_dim


def test_empty_batch_and_empty_steps(triton_device):
    for batch, tgt_len in [(0, 3), (2, 0)]:
        case = random_case(max(batch, 1), max(tgt_len, 1), 4, 3, 2, device=triton_device)
        query_proj = case.query_proj[:batch, :tgt_len]
        key_proj, value = case.key_proj[:batch], case.value[:batch]
        context, lse, weights = attention_forward(query_proj, key_proj, value, case.v, need_weights=True)
        assert context.shape == (batch, tgt_len, 2) and lse.shape == (batch, tgt_len)
        assert weights.shape == (batch, tgt_len, 4)


def test_no_keys_and_no_value_dims(triton_device):
    case = random_case(2, 3, 4, 5, 6, seed=61, device=triton_device)
    context, lse, weights = attention_forward(case.query_proj, case.key_proj[:, :0], case.value[:, :0],
                                                      case.v, need_weights=True)
    assert torch.equal(context, torch.zeros(2, 3, 6, device=triton_device))
    assert torch.isposinf(lse).all() and weights.shape == (2, 3, 0)
    context, lse, _ = attention_forward(case.query_proj, case.key_proj, case.value[:, :, :0], case.v)
    assert context.shape == (2, 3, 0)
    assert relative_error(lse, reference_lse(case.cast(torch.float64))) <= forward_tolerance(torch.float32)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = random_case(1, 2, 3, 4, 5, device="cpu")  # CPU on purpose, whatever the Triton device
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention_forward(*case.inputs())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_benchmark_shapes(dtype, triton_device):
    """On a GPU, the real fast paths (MUFU forms, tensor cores) on the benchmark shapes, scaled down in batch."""
    for shape in [(4, 50, 50, 256, 512), (4, 1, 200, 128, 512), (2, 20, 196, 512, 128), (2, 100, 120, 256, 256)]:
        case = random_case(*shape, mask="mixed", dtype=dtype, device=triton_device, seed=59)
        check_against_reference(case, need_weights=True)
        check_against_reference(case, need_weights=False)

