"""The oracle itself, against values computed by hand with Python's math module, one element at a time."""
import math

import pytest
import torch

from attn_fast import additive_attention_reference
from attn_fast.tools.testing import random_case


def attention_by_hand(case, b, i):
    """Context and weights of query (b, i), written out as in Bahdanau et al. (2014), eqs. 5-6 and A.1.2."""
    query = case.query_proj[b, i].tolist()
    memory_row = b if case.index is None else int(case.index[b])
    extra = case.extra_key_term
    src_len = case.key_proj.shape[1]
    scores = {}
    for j in range(src_len):
        hidden = [
            math.tanh(query[a] + float(case.key_proj[memory_row, j, a])
                      + (0.0 if extra is None else float(extra[b, j, a])))
            for a in range(len(query))
        ]
        visible = True
        if case.key_lengths is not None:
            visible &= j < int(case.key_lengths[memory_row])
        if case.key_padding_mask is not None:
            mask = case.key_padding_mask
            visible &= not bool(mask[memory_row, j] if mask.dim() == 2 else mask[b, i, j])
        if case.causal:
            visible &= j <= i
        if visible:
            scores[j] = sum(float(case.v[a]) * hidden[a] for a in range(len(query)))
    weights = [0.0] * src_len
    if scores:
        largest = max(scores.values())
        total = sum(math.exp(s - largest) for s in scores.values())
        for j, s in scores.items():
            weights[j] = math.exp(s - largest) / total
    value = case.value[memory_row]
    context = [sum(weights[j] * float(value[j, d]) for j in range(src_len)) for d in range(value.shape[1])]
    return context, weights


@pytest.mark.parametrize("mask", ["none", "lengths", "padding", "padding_per_query", "causal", "mixed"])
@pytest.mark.parametrize("beam, extra", [(0, False), (2, True)])
def test_reference_matches_hand_computation(mask, beam, extra):
    case = random_case(2, 3, 5, 4, 3, mask=mask, fully_masked_rows=True, beam=beam, extra_key_term=extra,
                       dtype=torch.float64, seed=7)
    context, weights = additive_attention_reference(*case.inputs(), **case.options(), need_weights=True)
    for b in range(case.query_proj.shape[0]):
        for i in range(case.query_proj.shape[1]):
            expected_context, expected_weights = attention_by_hand(case, b, i)
            assert context[b, i].tolist() == pytest.approx(expected_context, rel=1e-12, abs=1e-12)
            assert weights[b, i].tolist() == pytest.approx(expected_weights, rel=1e-12, abs=1e-12)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    case = random_case(2, 3, 4, 5, 6, dtype=torch.float64).cast(torch.float64, requires_grad=True)
    lengths = torch.tensor([0, 4])
    context, weights = additive_attention_reference(*case.inputs(), key_lengths=lengths, need_weights=True)
    assert torch.equal(context[0], torch.zeros_like(context[0]))
    assert torch.equal(weights[0], torch.zeros_like(weights[0]))
    assert torch.allclose(weights[1].sum(-1), torch.ones(3, dtype=torch.float64))
    (context.sum() + weights.sum()).backward()
    for tensor in case.inputs():
        assert torch.isfinite(tensor.grad).all()
    assert torch.equal(case.query_proj.grad[0], torch.zeros_like(case.query_proj.grad[0]))


def test_empty_source_gives_zeros():
    case = random_case(2, 3, 1, 4, 5, dtype=torch.float64)
    context, weights = additive_attention_reference(case.query_proj, case.key_proj[:, :0], case.value[:, :0], case.v,
                                                    need_weights=True)
    assert context.shape == (2, 3, 5) and weights.shape == (2, 3, 0)
    assert torch.equal(context, torch.zeros_like(context))
