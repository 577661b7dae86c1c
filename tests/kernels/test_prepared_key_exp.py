"""The Triton forward with a decoding memory's prepared keys: `AttentionCall.key_exp` = e^{2 key_proj}, made once by
`functional.prepare_key_exp` when every |key_proj| is within the kernels' factorized range (kernels/tanh.py,
FACTORIZED_LIMIT). fp32 decode steps then take the factorized tanh with the key operand loaded through the memory
row (HAS_KEY_EXP): 1 MUFU op per element instead of the exp form's 2. Outputs are poisoned (NaN-filled buffers),
as in the other kernel tests, so an element left unwritten fails the comparison.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from attn_fast import AdditiveAttention, additive_attention_reference
from attn_fast.backends import torch_backend
from attn_fast.tolerances import forward_tolerance, gradient_tolerance, relative_error
from attn_fast.validation import attention_call

forward = pytest.importorskip("attn_fast.kernels.forward")
launcher = pytest.importorskip("attn_fast.kernels.launch")

# The reciprocal tanh forms overflow to +-inf on purpose (kernels/tanh.py); numpy reports it under the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

TOLERANCE = forward_tolerance(torch.float32)


@pytest.fixture(autouse=True)
def poisoned_buffers(poison):
    return poison(launcher)


def decode_case(device, *, tgt_len=1, beam=False, lengths=True, query_scale=1.0, src_len=70, attn_dim=13):
    """A small decode call: B_m = 3 memory rows (6 query rows with beam `index`), S keys past one 64-key tile."""
    memory_rows, value_dim = 3, 5
    query_rows = 6 if beam else memory_rows
    query_proj = torch.randn(query_rows, tgt_len, attn_dim, device=device) * query_scale
    key_proj = torch.randn(memory_rows, src_len, attn_dim, device=device)
    value = torch.randn(memory_rows, src_len, value_dim, device=device)
    v = torch.randn(attn_dim, device=device)
    options = {}
    if lengths:
        options["key_lengths"] = torch.tensor([src_len, 33, 1], device=device)
    if beam:
        options["index"] = torch.tensor([2, 2, 0, 1, 1, 0], device=device)
    return (query_proj, key_proj, value, v), options


def reference_context(inputs, options, need_weights=False):
    inputs64 = [tensor.double() for tensor in inputs]
    return additive_attention_reference(*inputs64, **options, need_weights=need_weights)


def kernel_plan(inputs, options, **tuning):
    return forward.plan_forward(attention_call(*inputs, **options), **tuning)


SCORE_KERNELS = (forward._attention_forward_kernel, forward._attention_forward_prepared_kernel)


def attention_launch(plan):
    (launch,) = [item for item in plan.launches if item.kernel in SCORE_KERNELS]
    return launch


def uses_key_exp(launch) -> bool:
    """The prepared-keys kernel with HAS_KEY_EXP; the plain kernel (whose signature the static report's saved launches
    record) has no such argument."""
    if launch.kernel is forward._attention_forward_prepared_kernel:
        return launch.arguments["HAS_KEY_EXP"]
    assert "HAS_KEY_EXP" not in launch.arguments and "key_exp" not in launch.arguments
    return False


@pytest.mark.parametrize("tgt_len", [1, 3])
@pytest.mark.parametrize("beam", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_decode_with_key_exp_matches_the_reference(triton_device, tgt_len, beam, need_weights):
    inputs, options = decode_case(triton_device, tgt_len=tgt_len, beam=beam)
    key_exp = torch_backend.key_exponentials(inputs[1])
    context, lse, weights = forward.attention_forward(
        attention_call(*inputs, **options, need_weights=need_weights, key_exp=key_exp))
    expected_context, expected_weights = reference_context(inputs, options, need_weights=True)
    assert relative_error(context, expected_context) <= TOLERANCE
    assert not torch.isnan(lse).any()
    if need_weights:
        assert relative_error(weights, expected_weights) <= TOLERANCE
    # The same call without the prepared keys (the exp form; and the factorized form computing e^{2k} itself).
    for tanh_form in (None, "factorized"):
        plain, _, plain_weights = forward.attention_forward(
            attention_call(*inputs, **options, need_weights=need_weights), tanh_form=tanh_form)
        assert relative_error(context, plain) <= TOLERANCE
        if need_weights:
            assert relative_error(weights, plain_weights) <= TOLERANCE


def test_the_plan_takes_the_factorized_form_with_key_exp(triton_device):
    inputs, options = decode_case(triton_device)
    key_exp = torch_backend.key_exponentials(inputs[1])
    plan = kernel_plan(inputs, dict(options, key_exp=key_exp))
    launch = attention_launch(plan)
    assert plan.config.tanh_form == "factorized" and plan.config.block_t == 1
    assert launch.kernel is forward._attention_forward_prepared_kernel
    assert launch.arguments["TANH_FORM"] == "factorized" and launch.arguments["HAS_KEY_EXP"] is True
    assert launch.arguments["key_exp"] is key_exp
    assert (launch.arguments["stride_eb"], launch.arguments["stride_es"], launch.arguments["stride_ea"]) == \
        key_exp.stride()

    # Without key_exp, fp32 decode keeps the exp form; key_exp is dropped where it has no use.
    plain = attention_launch(kernel_plan(inputs, options))
    assert plain.arguments["TANH_FORM"] == "exp" and not uses_key_exp(plain)
    assert plain.kernel is forward._attention_forward_kernel
    forced_exp = attention_launch(kernel_plan(inputs, dict(options, key_exp=key_exp), tanh_form="exp"))
    assert forced_exp.arguments["TANH_FORM"] == "exp" and not uses_key_exp(forced_exp)
    extra = torch.randn(inputs[0].shape[0], inputs[1].shape[1], inputs[1].shape[2], device=triton_device)
    with_extra = attention_launch(kernel_plan(inputs, dict(options, key_exp=key_exp, extra_key_term=extra)))
    assert with_extra.arguments["TANH_FORM"] == "exp" and not uses_key_exp(with_extra)
    half = [tensor.bfloat16() for tensor in inputs]
    half_launch = attention_launch(kernel_plan(half, dict(options, key_exp=key_exp)))
    assert half_launch.arguments["TANH_FORM"] == "approx" and not uses_key_exp(half_launch)


@pytest.mark.parametrize("beam", [False, True])
def test_the_kernel_reads_the_key_operand_from_key_exp_through_the_memory_row(triton_device, beam):
    """key_exp of *other* keys: the scores follow key_exp, not key_proj (which only the fallback reads)."""
    inputs, options = decode_case(triton_device, beam=beam)
    other_keys = torch.randn_like(inputs[1])
    context, _, _ = forward.attention_forward(
        attention_call(*inputs, **options, key_exp=torch_backend.key_exponentials(other_keys)))
    expected, _ = reference_context((inputs[0], other_keys, *inputs[2:]), options)
    assert relative_error(context, expected) <= TOLERANCE


def test_an_out_of_range_query_falls_back_to_the_exp_form(triton_device):
    """|q| beyond FACTORIZED_LIMIT in some programs: those take the exp form from key_proj; exact all the same."""
    inputs, options = decode_case(triton_device, beam=True)
    query_proj = inputs[0].clone()
    query_proj[::2] *= 40.0  # every other query row saturated
    inputs = (query_proj, *inputs[1:])
    key_exp = torch_backend.key_exponentials(inputs[1])
    context, _, _ = forward.attention_forward(attention_call(*inputs, **options, key_exp=key_exp))
    expected, _ = reference_context(inputs, options)
    assert relative_error(context, expected) <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------------
# the layer: precompute prepares the keys for the Triton backend, and its steps use them

B, S, DQ, DK, A, D = 3, 9, 5, 6, 8, 4


def triton_layer_and_memory(device, key_scale=1.0, dtype=torch.float32):
    layer = AdditiveAttention(DQ, DK, A, backend="triton", device=device, dtype=dtype)
    key = torch.randn(B, S, DK, device=device, dtype=dtype) * key_scale
    value = torch.randn(B, S, D, device=device, dtype=dtype)
    return layer, layer.precompute(key, value, key_lengths=torch.tensor([9, 4, 6], device=device))


def test_precompute_prepares_key_exp_for_triton_steps(triton_device):
    layer, memory = triton_layer_and_memory(triton_device)
    assert memory.tanh_form == "factorized" and memory.key_exp is not None
    assert memory.key_exp.dtype == torch.float32 and not memory.key_exp.requires_grad
    torch.testing.assert_close(memory.key_exp, torch.exp(2 * memory.key_proj.detach()), rtol=0, atol=0)


def test_keys_beyond_the_kernels_range_get_no_key_exp(triton_device):
    layer, _ = triton_layer_and_memory(triton_device)
    key = torch.randn(B, S, DK, device=triton_device)
    with torch.no_grad():  # max |key_proj| = 30: above the kernels' limit (20), within the torch backend's (40)
        key *= 30.0 / layer.key_layer(key).abs().max()
    memory = layer.precompute(key)
    assert 20.0 < float(memory.key_proj.detach().abs().max()) <= 40.0
    assert memory.tanh_form == "factorized" and memory.key_exp is None
    torch_memory = AdditiveAttention(DQ, DK, A, backend="torch").to(triton_device)
    torch_memory.load_state_dict(layer.state_dict())
    assert torch_memory.precompute(key).key_exp is not None  # the torch backend's range is wider
    assert triton_layer_and_memory(triton_device, key_scale=1e3)[1].key_exp is None  # direct form
    assert triton_layer_and_memory(triton_device, dtype=torch.bfloat16)[1].key_exp is None  # tanh.approx


@pytest.mark.parametrize("beam", [False, True])
def test_a_triton_layer_step_uses_the_prepared_keys(triton_device, beam, monkeypatch):
    layer, memory = triton_layer_and_memory(triton_device)
    planned = []
    real_plan = forward.plan_forward

    def recording_plan(call, **tuning):
        plan = real_plan(call, **tuning)
        planned.append(attention_launch(plan))
        return plan

    monkeypatch.setattr(forward, "plan_forward", recording_plan)
    index = torch.tensor([0, 0, 1, 2, 2, 1], device=triton_device) if beam else None
    query = torch.randn(6 if beam else B, DQ, device=triton_device)
    context, weights = layer.step(query, memory, index=index, need_weights=True)
    assert [(p.arguments["TANH_FORM"], uses_key_exp(p)) for p in planned] == [("factorized", True)]
    assert planned[0].arguments["key_exp"] is memory.key_exp

    planned.clear()
    plain_context, plain_weights = layer.step(query, dataclasses.replace(memory, key_exp=None), index=index,
                                              need_weights=True)
    assert [(p.arguments["TANH_FORM"], uses_key_exp(p)) for p in planned] == [("exp", False)]
    assert relative_error(context, plain_context) <= TOLERANCE
    assert relative_error(weights, plain_weights) <= TOLERANCE


def test_gradients_through_a_triton_step_with_prepared_keys(triton_device):
    layer, memory = triton_layer_and_memory(triton_device)
    query = torch.randn(B, DQ, device=triton_device)
    grads = []
    for key_exp in (memory.key_exp, None):
        layer.zero_grad()
        context, _ = layer.step(query, dataclasses.replace(memory, key_exp=key_exp))
        context.square().sum().backward(retain_graph=True)  # the memory's key_proj graph serves both steps
        grads.append([parameter.grad.clone()
                      for parameter in (layer.query_layer.weight, layer.key_layer.weight, layer.v)])
    for prepared, plain in zip(*grads):
        assert relative_error(prepared, plain) <= gradient_tolerance(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("sizes", [(32, 200, 128, 512), (32, 196, 512, 2048), (1, 8192, 256, 128),
                                   (32, 200, 128, 128), (8, 50, 256, 64)])
def test_a_decode_step_on_a_prepared_memory_is_one_or_two_launches(sizes, dtype, need_weights):
    """Issue 12 item 5, planned on meta tensors for an H100 at decode sizes (B, S, A, D): with the memory's score
    weights (and, fp32, its e^{2k}) a step is the score kernel plus at most one more launch — the combine pass of
    split fused contexts, or scores mode's context pass, which merges the splits' statistics itself."""
    batch, src_len, attn_dim, value_dim = sizes

    def meta(*shape, kind=dtype):
        return torch.empty(*shape, device="meta", dtype=kind)

    prepared = {"score_weights": meta(-(-attn_dim // 64) * 64 + 2, kind=torch.float32)}
    if dtype == torch.float32:
        prepared["key_exp"] = meta(batch, src_len, attn_dim)
    call = attention_call(meta(batch, 1, attn_dim), meta(batch, src_len, attn_dim), meta(batch, src_len, value_dim),
                          meta(attn_dim), need_weights=need_weights, **prepared)
    plan = forward.plan_forward(call)
    names = [item.kernel.__name__ for item in plan.launches]
    assert 1 <= len(names) <= 2, names
    assert names[0] in ("_attention_forward_kernel", "_attention_forward_prepared_kernel"), names
