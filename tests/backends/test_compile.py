"""The torch backend as torch.library custom ops: opcheck, and torch.compile(fullgraph=True) of a model using the
layer, forward and backward, equal to eager."""
import pytest
import torch
from torch import nn
from torch.library import opcheck

from attn_fast import AdditiveAttention
from attn_fast.backends.torch_backend import _backward_op, _forward_op
from attn_fast.tools.testing import random_case


@pytest.mark.parametrize("options", [
    dict(), dict(mask="mixed", fully_masked_rows=True), dict(mask="padding_per_query", beam=2, extra_key_term=True),
])
def test_opcheck_forward_op(options):
    case = random_case(3, 4, 5, 6, 7, **options, seed=1).cast(torch.float32, requires_grad=True)
    arguments = (*case.inputs(), case.extra_key_term, case.key_lengths, case.key_padding_mask, case.index,
                 case.causal, "auto", 40)
    results = opcheck(_forward_op, arguments)
    assert set(results.values()) == {"SUCCESS"}, results


def test_opcheck_backward_op():
    case = random_case(3, 4, 5, 6, 7, mask="lengths", beam=2, extra_key_term=True, seed=2)
    _, probs = _forward_op(*case.inputs(), case.extra_key_term, case.key_lengths, None, case.index, False, "auto", 40)
    grad_context = torch.randn(6, 4, 7)
    arguments = (grad_context, torch.randn_like(probs), *case.inputs(), case.extra_key_term, case.index, probs, False,
                 "auto", 40)
    results = opcheck(_backward_op, arguments, test_utils=("test_schema", "test_faketensor"))
    assert set(results.values()) == {"SUCCESS"}, results


class TinyAttentionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = AdditiveAttention(6, 5, 7, backend="torch")
        self.readout = nn.Linear(5, 3)

    def forward(self, query, key, key_lengths):
        context, weights = self.attn(query, key, key_lengths=key_lengths, need_weights=True)
        # the weights take part in the loss too (as in doubly stochastic / coverage regularization)
        return self.readout(context).square().mean() + weights.square().mean()


def test_compiled_model_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    model = TinyAttentionModel()
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 4, 6, generator=generator)
    key = torch.randn(2, 5, 5, generator=generator)
    lengths = torch.tensor([5, 2])

    eager_loss = model(query, key, lengths)
    eager_loss.backward()
    eager_grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fails on any graph break
    compiled_loss = compiled(query, key, lengths)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, eager_grads[name], rtol=1e-5, atol=1e-7)
