"""Prepared keys: a decoding memory keeps e^{2 key_proj} (`AttentionMemory.key_exp`) so that the torch backend's
factorized steps compute no exponential of the keys; results and gradients are those of the unprepared step."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from attn_fast import AdditiveAttention, additive_attention
from attn_fast.backends import torch_backend
from attn_fast.functional import additive_attention_on_memory

B, S, DQ, DK, A = 3, 7, 5, 6, 8


def layer_and_memory(backend="torch", key_scale=1.0, dtype=torch.float32, key_lengths=None):
    torch.manual_seed(0)
    layer = AdditiveAttention(DQ, DK, A, backend=backend, dtype=dtype)
    key = torch.randn(B, S, DK, dtype=dtype) * key_scale
    return layer, layer.precompute(key, key_lengths=key_lengths)


def test_precompute_prepares_the_keys_only_for_factorized_torch_steps():
    layer, memory = layer_and_memory()
    assert memory.tanh_form == "factorized" and memory.key_exp is not None
    torch.testing.assert_close(memory.key_exp, torch.exp(2 * memory.key_proj.detach()), rtol=0, atol=0)
    assert not memory.key_exp.requires_grad
    assert layer_and_memory(key_scale=1e3)[1].key_exp is None  # keys beyond the factorized range: direct form
    assert layer_and_memory(backend="reference")[1].key_exp is None
    half = layer_and_memory(dtype=torch.bfloat16)[1]
    assert half.key_exp.dtype == torch.float32  # the compute dtype of bf16 inputs


@pytest.mark.parametrize("beam", [False, True])
def test_a_step_with_prepared_keys_equals_one_without(beam):
    layer, memory = layer_and_memory(key_lengths=torch.tensor([7, 3, 5]))
    index = torch.tensor([0, 0, 1, 2, 2, 1]) if beam else None
    query = torch.randn(6 if beam else B, DQ)
    prepared = layer.step(query, memory, index=index, need_weights=True)
    plain = layer.step(query, dataclasses.replace(memory, key_exp=None), index=index, need_weights=True)
    for got, expected in zip(prepared, plain):
        assert torch.equal(got, expected)  # the same e^{2k}, computed once instead of per step


def test_the_prepared_keys_replace_the_per_step_exponential(monkeypatch):
    layer, memory = layer_and_memory()
    prepared_operands = []
    real_prepare = torch_backend._FactorizedTanh.prepare
    monkeypatch.setattr(torch_backend._FactorizedTanh, "prepare",
                        staticmethod(lambda projection: prepared_operands.append(projection.shape)
                                     or real_prepare(projection)))
    layer.step(torch.randn(B, DQ), memory)
    assert prepared_operands == [torch.Size([B, 1, A])]  # the query only
    prepared_operands.clear()
    layer.step(torch.randn(B, DQ), dataclasses.replace(memory, key_exp=None))
    assert prepared_operands == [torch.Size([B, 1, A]), torch.Size([B, S, A])]


def test_gradients_reach_key_proj_through_a_prepared_step():
    layer, memory = layer_and_memory()
    query = torch.randn(B, DQ)
    grads = []
    for key_exp in (memory.key_exp, None):
        layer.zero_grad()
        context, _ = layer.step(query, dataclasses.replace(memory, key_exp=key_exp))
        context.square().sum().backward(retain_graph=True)
        grads.append([parameter.grad.clone() for parameter in layer.parameters()])
    for prepared, plain in zip(*grads):
        torch.testing.assert_close(prepared, plain, rtol=0, atol=0)
    assert layer.key_layer.weight.grad.abs().sum() > 0


def test_prepared_keys_are_ignored_with_an_extra_key_term_and_by_other_backends():
    layer, memory = layer_and_memory()
    query_proj = torch.randn(B, 1, A)
    extra = torch.randn(B, S, A)
    arguments = (query_proj, memory.key_proj.detach(), memory.value, layer.v.detach())
    wrong_key_exp = torch.zeros_like(memory.key_exp)  # would give garbage if it were read
    for backend in ("torch", "reference"):
        got, _ = additive_attention_on_memory(*arguments, backend=backend, tanh_form="factorized",
                                              key_exp=wrong_key_exp, extra_key_term=extra)
        expected, _ = additive_attention(*arguments, backend=backend, extra_key_term=extra)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("bad, error, message", [
    (torch.ones(B, S, A, dtype=torch.float64), TypeError, r"key_exp must be e\^\(2 key_proj\) in the compute dtype"),
    (torch.ones(B, S - 1, A), ValueError, r"key_exp must have key_proj's shape \(3, 7, 8\)"),
    ("not a tensor", TypeError, r"key_exp must be a torch.Tensor"),
])
def test_malformed_prepared_keys_are_refused_by_name(bad, error, message):
    layer, memory = layer_and_memory()
    with pytest.raises(error, match=message):
        additive_attention_on_memory(torch.randn(B, 1, A), memory.key_proj, memory.value, layer.v, key_exp=bad)


def test_stateful_layers_keep_no_prepared_keys_their_steps_would_not_use():
    """Location and coverage steps always add an extra key term, which the prepared keys cannot serve."""
    from attn_fast import CoverageAttention, LocationSensitiveAttention

    key = torch.randn(B, S, DK)
    stateful = (LocationSensitiveAttention(DQ, DK, A, backend="torch"), CoverageAttention(DQ, DK, A, backend="torch"))
    for layer in stateful:
        state = layer.precompute(key, key_lengths=torch.tensor([7, 3, 5]))
        assert state.memory.checked and state.memory.key_exp is None
    plain = AdditiveAttention(DQ, DK, A, backend="torch")
    assert plain.precompute(key).key_exp is not None and plain.precompute(key, prepare_keys=False).key_exp is None
