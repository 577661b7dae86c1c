"""The Triton forward's fp32 all-steps path with prepared keys (`ForwardConfig.prepare_keys`): a pre-pass kernel
(`_key_exponentials_kernel`) writes e^{2 key_proj} and max |key_proj| per key, each score program writes its rows'
c e^{2q} once, and the score loop loads both factors (1 MUFU op per tanh at any tile). The score kernel checks the
pre-pass's max |k| once per key tile and takes the exp form from key_proj where a key is out of the factorized range.

The heuristic takes this path only where its modelled time wins (long T: the pre-pass writes B_m x S x A fp32 once;
see kernels/configs.py PREPARED_TILES), so these tests force it through `plan_forward(config=...)`. Outputs and the
pre-pass's buffers are poisoned (NaN-filled), so an element left unwritten fails the comparison.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from attn_fast import additive_attention_reference
from attn_fast.tolerances import forward_tolerance, relative_error
from attn_fast.validation import attention_call

forward = pytest.importorskip("attn_fast.kernels.forward")
configs = pytest.importorskip("attn_fast.kernels.configs")
launcher = pytest.importorskip("attn_fast.kernels.launch")

# The reciprocal tanh forms overflow to +-inf on purpose (kernels/tanh.py); numpy reports it under the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

TOLERANCE = forward_tolerance(torch.float32)
B_M, T, S, A, D = 3, 11, 37, 20, 6


@pytest.fixture(autouse=True)
def poisoned_buffers(poison):
    return poison(launcher)


def case(device, *, beam=False, saturated_key=False):
    """fp32 inputs with keys spanning two 32-key tiles; `beam`: 5 query rows reading the 3 memory rows through
    `index`; `saturated_key`: one key of memory row 1 beyond the factorized range (|k| = 25 > 20)."""
    query_rows = 5 if beam else B_M
    query_proj = torch.randn(query_rows, T, A, device=device)
    key_proj = torch.randn(B_M, S, A, device=device)
    if saturated_key:
        key_proj[1, 3, 7] = 25.0
    value = torch.randn(B_M, S, D, device=device)
    v = torch.randn(A, device=device)
    options = {"key_lengths": torch.tensor([S, 20, 9], device=device)}
    if beam:
        options["index"] = torch.tensor([2, 0, 1, 1, 0], device=device)
    return (query_proj, key_proj, value, v), options


def prepared_config(call, *, tile, fuse_context, num_splits):
    block_t, block_s, block_a, num_warps = tile
    default = configs.forward_config(
        query_rows=call.query_rows, tgt_len=call.tgt_len, src_len=call.src_len, attn_dim=call.attn_dim,
        value_dim=call.value_dim, dtype=call.dtype, need_weights=call.need_weights)
    return dataclasses.replace(default, block_t=block_t, block_s=block_s, block_a=block_a, num_warps=num_warps,
                               tanh_form="factorized", num_splits=num_splits, fuse_context=fuse_context,
                               prepare_keys=True)


def prepared_plan(call, **choices):
    """`plan_forward` with a prepared-keys configuration, for running where the call's tensors are."""
    return forward.plan_forward(call, config=prepared_config(call, **choices),
                                interpret=launcher.require_runnable(call.device))


def run_plan(plan, device):
    launcher.run_launches(plan.launches, device)
    return plan.context, plan.weights


def kernel_names(plan):
    return [item.kernel.__name__ for item in plan.launches]


@pytest.mark.parametrize("tile", [(8, 32, 8, 1), (16, 32, 8, 2)])
@pytest.mark.parametrize("fuse_context", [False, True])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_prepared_keys_match_the_reference(triton_device, tile, fuse_context, num_splits):
    inputs, options = case(triton_device)
    call = attention_call(*inputs, **options, need_weights=not fuse_context)
    plan = prepared_plan(call, tile=tile, fuse_context=fuse_context, num_splits=num_splits)
    names = kernel_names(plan)
    assert "_key_exponentials_kernel" in names and "_attention_forward_prepared_kernel" in names
    (score_launch,) = [item for item in plan.launches if item.kernel is forward._attention_forward_prepared_kernel]
    assert score_launch.arguments["HAS_KEY_EXP"] and score_launch.arguments["CHECK_KEY_RANGE"]
    context, weights = run_plan(plan, triton_device)
    expected_context, expected_weights = additive_attention_reference(
        *[tensor.double() for tensor in inputs], **options, need_weights=True)
    assert relative_error(context, expected_context) <= TOLERANCE
    if not fuse_context:
        assert relative_error(weights, expected_weights) <= TOLERANCE


@pytest.mark.parametrize("beam", [False, True])
def test_a_key_tile_out_of_range_takes_the_exp_form(triton_device, beam):
    """One key at |k| = 25, beyond the factorized range: the score kernel must compute its tile from key_proj in the
    exp form and never read that tile's key_exp. To see which one it read, the pre-pass's e^{2k} of memory row 1's
    first key tile is replaced by NaN before the score kernel runs: the outputs stay exact (through the beam index
    too), and the same NaN in an in-range tile does reach them (so the check is what keeps it out)."""
    inputs, options = case(triton_device, beam=beam, saturated_key=True)
    call = attention_call(*inputs, **options)
    expected, _ = additive_attention_reference(*[tensor.double() for tensor in inputs], **options)
    for saturated in (True, False):
        plan = prepared_plan(call, tile=(8, 32, 8, 1), fuse_context=False, num_splits=1)
        pre_pass = next(item for item in plan.launches if item.kernel is forward._key_exponentials_kernel)
        rest = [item for item in plan.launches if item is not pre_pass]
        launcher.run_launches([pre_pass], triton_device)
        pre_pass.arguments["key_exp"][1, :32] = float("nan")
        if not saturated:
            pre_pass.arguments["key_absmax"][1, 3] = 1.0  # as if the key were in range
        launcher.run_launches(rest, triton_device)
        if saturated:
            assert relative_error(plan.context, expected) <= TOLERANCE
        else:
            assert torch.isnan(plan.context).any()


def test_the_pre_pass_writes_key_exponentials_and_their_range(triton_device):
    inputs, options = case(triton_device, saturated_key=True)
    key_proj = inputs[1].transpose(1, 2).contiguous().transpose(1, 2)  # strided along A: any layout is read
    call = attention_call(inputs[0], key_proj, *inputs[2:], **options)
    plan = prepared_plan(call, tile=(8, 32, 8, 1), fuse_context=False, num_splits=1)
    (pre_pass,) = [item for item in plan.launches if item.kernel is forward._key_exponentials_kernel]
    launcher.run_launches([pre_pass], triton_device)
    key_exp, key_absmax = pre_pass.arguments["key_exp"], pre_pass.arguments["key_absmax"]
    assert key_exp.shape == (B_M, S, A) and key_exp.is_contiguous()
    expected = torch.exp(2.0 * key_proj.double())
    assert relative_error(key_exp, expected) <= TOLERANCE
    torch.testing.assert_close(key_absmax, key_proj.abs().amax(dim=-1), rtol=0, atol=0)


def test_causal_and_a_per_query_mask_with_prepared_keys(triton_device):
    inputs, _ = case(triton_device)
    mask = torch.rand(B_M, T, S, device=triton_device) < 0.3
    mask[:, :, 0] = False  # every row keeps a visible key
    options = {"key_padding_mask": mask, "causal": True}
    call = attention_call(*inputs, **options, need_weights=True)
    plan = prepared_plan(call, tile=(8, 32, 8, 1), fuse_context=False, num_splits=2)
    context, weights = run_plan(plan, triton_device)
    expected_context, expected_weights = additive_attention_reference(
        *[tensor.double() for tensor in inputs], **options, need_weights=True)
    assert relative_error(context, expected_context) <= TOLERANCE
    assert relative_error(weights, expected_weights) <= TOLERANCE


def test_prepared_keys_are_dropped_where_they_cannot_apply(triton_device):
    """An extra key term changes the keys per query row, and fp16/bf16 use tanh.approx (no key operand): a
    configuration asking for prepared keys then plans the plain kernel, without the pre-pass."""
    inputs, options = case(triton_device)
    extra = torch.randn(B_M, S, A, device=triton_device)
    call = attention_call(*inputs, **options, extra_key_term=extra)
    plan = prepared_plan(call, tile=(8, 32, 8, 1), fuse_context=False, num_splits=1)
    assert "_key_exponentials_kernel" not in kernel_names(plan)
    assert "_attention_forward_kernel" in kernel_names(plan)
    half = attention_call(*[tensor.half() for tensor in inputs], **options)
    config = dataclasses.replace(prepared_config(half, tile=(8, 32, 8, 1), fuse_context=False, num_splits=1),
                                 tanh_form="approx")
    assert "_key_exponentials_kernel" not in kernel_names(forward.plan_forward(half, config=config))


def test_the_heuristic_prepares_keys_only_where_the_model_says_it_pays():
    """Planned on meta tensors: caption (T = 20 pads to 24 rows with 8-row tiles, which only prepared keys make
    MUFU-cheap) and a long fp32 call (T = S = 800, A = 512) take prepared keys; nmt_train and long (the pre-pass's
    bytes outweigh the MUFU ops it saves), calls under PREPARE_KEYS_MIN_TANH, fp16 and calls with an extra key term
    do not."""
    def meta(*sizes, dtype=torch.float32):
        return torch.empty(*sizes, device="meta", dtype=dtype)

    def plan(batch, tgt_len, src_len, attn_dim, value_dim, dtype=torch.float32, extra=False):
        call = attention_call(meta(batch, tgt_len, attn_dim, dtype=dtype), meta(batch, src_len, attn_dim, dtype=dtype),
                              meta(batch, src_len, value_dim, dtype=dtype), meta(attn_dim, dtype=dtype),
                              extra_key_term=meta(batch, src_len, attn_dim, dtype=dtype) if extra else None)
        return forward.plan_forward(call)

    for sizes in ((16, 800, 800, 512, 128), (32, 20, 196, 512, 2048)):
        prepared = plan(*sizes)
        assert prepared.config.prepare_keys, sizes
        # One launch before the score kernel, as without prepared keys: the key pre-pass does the v pre-pass too.
        assert kernel_names(prepared)[:2] == ["_key_exponentials_kernel", "_attention_forward_prepared_kernel"]
        assert prepared.launches[0].arguments["WRITE_SCORE_VECTOR"]
    assert not plan(16, 800, 800, 512, 128, dtype=torch.float16).config.prepare_keys
    assert "_key_exponentials_kernel" not in kernel_names(plan(16, 800, 800, 512, 128, extra=True))
    for sizes in ((32, 50, 50, 256, 512), (8, 400, 400, 256, 256), (B_M, T, S, A, D)):
        assert not plan(*sizes).config.prepare_keys, sizes


def test_the_prepare_keys_tuning_switches_the_pre_pass(triton_device):
    """`attention_forward(call, prepare_keys=...)` (the GPU acceptance run's A/B): True plans the pre-pass, False
    never does, and both give the reference's context; True where it cannot apply is a ValueError."""
    inputs, options = case(triton_device)
    call = attention_call(*inputs, **options)
    expected, _ = additive_attention_reference(*[tensor.double() for tensor in inputs], **options)
    for choice in (True, False):
        plan = forward.plan_forward(call, prepare_keys=choice)
        assert plan.config.prepare_keys is choice
        assert ("_key_exponentials_kernel" in kernel_names(plan)) is choice
        context, _, _ = forward.attention_forward(call, prepare_keys=choice)
        assert relative_error(context, expected) <= TOLERANCE
    with pytest.raises(ValueError, match="prepare_keys=True"):
        forward.plan_forward(attention_call(*[tensor.half() for tensor in inputs], **options), prepare_keys=True)
