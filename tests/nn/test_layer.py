"""AdditiveAttention and AttentionMemory: the drop-in layer, step decoding, beam index, eager weights."""
import pytest
import torch
from torch import nn

from attn_fast import AdditiveAttention, AttentionMemory, additive_attention_reference

QUERY_DIM, KEY_DIM, ATTN_DIM = 7, 9, 11


class EagerBahdanauAttention(nn.Module):
    """A typical eager implementation (OpenNMT-py's "mlp" attention): materializes [B, T, S, A]; NaN-free only
    when every row has a visible key."""

    def __init__(self, query_dim, key_dim, attn_dim):
        super().__init__()
        self.linear_query = nn.Linear(query_dim, attn_dim, bias=True)
        self.linear_context = nn.Linear(key_dim, attn_dim, bias=True)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, query, memory_bank, lengths):
        hidden = torch.tanh(self.linear_query(query)[:, :, None] + self.linear_context(memory_bank)[:, None])
        scores = self.v(hidden).squeeze(-1)
        padding = torch.arange(memory_bank.shape[1])[None, None, :] >= lengths[:, None, None]
        weights = torch.softmax(scores.masked_fill(padding, float("-inf")), dim=-1)
        return weights @ memory_bank, weights


def make_layer(backend="torch", dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return AdditiveAttention(QUERY_DIM, KEY_DIM, ATTN_DIM, backend=backend, dtype=dtype, **kwargs)


def make_inputs(batch=3, tgt_len=5, src_len=6, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(batch, tgt_len, QUERY_DIM, generator=generator, dtype=dtype)
    key = torch.randn(batch, src_len, KEY_DIM, generator=generator, dtype=dtype)
    lengths = torch.randint(1, src_len + 1, (batch,), generator=generator)
    return query, key, lengths


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_steps_equal_all_steps(backend):
    layer = make_layer(backend)
    query, key, lengths = make_inputs()
    context, weights = layer(query, key, key_lengths=lengths, need_weights=True)
    memory = layer.precompute(key, key_lengths=lengths)
    for step in range(query.shape[1]):
        step_context, step_weights = layer.step(query[:, step], memory, need_weights=True)
        torch.testing.assert_close(step_context, context[:, step], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(step_weights, weights[:, step], rtol=1e-12, atol=1e-12)


def test_single_step_query_in_forward():
    layer = make_layer()
    query, key, lengths = make_inputs()
    context, weights = layer(query[:, 2], key, key_lengths=lengths, need_weights=True)
    full_context, full_weights = layer(query, key, key_lengths=lengths, need_weights=True)
    assert context.shape == (3, KEY_DIM) and weights.shape == (3, 6)
    torch.testing.assert_close(context, full_context[:, 2], rtol=1e-12, atol=1e-12)


def test_index_equals_repeated_memory():
    layer = make_layer()
    _, key, lengths = make_inputs()
    beam = 4
    generator = torch.Generator().manual_seed(2)
    index = torch.arange(3).repeat_interleave(beam)[torch.randperm(3 * beam, generator=generator)]
    beam_query = torch.randn(3 * beam, QUERY_DIM, generator=generator, dtype=torch.float64)
    extra = torch.randn(3 * beam, 6, ATTN_DIM, generator=generator, dtype=torch.float64)
    memory = layer.precompute(key, key_lengths=lengths)
    repeated = AttentionMemory(memory.key_proj[index], memory.value[index], lengths[index])
    for extra_key_term in (None, extra):
        shared = layer.step(beam_query, memory, index=index, extra_key_term=extra_key_term, need_weights=True)
        copied = layer.step(beam_query, repeated, extra_key_term=extra_key_term, need_weights=True)
        torch.testing.assert_close(shared, copied, rtol=1e-12, atol=1e-12)


def test_extra_key_term_is_added_to_the_key_projection():
    layer = make_layer()
    query, key, lengths = make_inputs()
    extra = torch.randn(3, 6, ATTN_DIM, dtype=torch.float64)
    memory = layer.precompute(key, key_lengths=lengths)
    context, weights = layer.step(query[:, 0], memory, extra_key_term=extra, need_weights=True)
    expected_context, expected_weights = additive_attention_reference(
        layer.query_layer(query[:, :1]), memory.key_proj + extra, key, layer.v, key_lengths=lengths,
        need_weights=True)
    torch.testing.assert_close(context, expected_context[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, expected_weights[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_loading_eager_weights_gives_the_same_outputs(normalize):
    torch.manual_seed(3)
    eager = EagerBahdanauAttention(QUERY_DIM, KEY_DIM, ATTN_DIM).double()
    layer = make_layer(normalize=normalize)
    layer.load_eager_weights(query_weight=eager.linear_query.weight, key_weight=eager.linear_context.weight,
                             v=eager.v.weight, query_bias=eager.linear_query.bias, key_bias=eager.linear_context.bias)
    query, key, lengths = make_inputs()
    expected_context, expected_weights = eager(query, key, lengths)
    context, weights = layer(query, key, key_lengths=lengths, need_weights=True)
    torch.testing.assert_close(context, expected_context, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-12)
    # and the gradients of the parameters agree too
    expected_context.square().sum().backward()
    context.square().sum().backward()
    torch.testing.assert_close(layer.query_layer.weight.grad, eager.linear_query.weight.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.key_layer.weight.grad, eager.linear_context.weight.grad, rtol=1e-9, atol=1e-12)
    if not normalize:
        torch.testing.assert_close(layer.v.grad, eager.v.weight.grad[0], rtol=1e-9, atol=1e-12)


def test_load_eager_weights_checks_shapes():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"key_weight must have shape \[11, 9\], got \[11, 8\]"):
        layer.load_eager_weights(query_weight=torch.zeros(ATTN_DIM, QUERY_DIM), key_weight=torch.zeros(ATTN_DIM, 8),
                                 v=torch.zeros(ATTN_DIM))


def test_normalized_score_vector():
    layer = make_layer(normalize=True)
    with torch.no_grad():
        layer.g.fill_(2.5)
    assert torch.allclose(torch.linalg.vector_norm(layer.score_vector()), torch.tensor(2.5, dtype=torch.float64))


def test_torch_backend_matches_reference_in_training():
    torch.manual_seed(4)
    layers = {backend: make_layer(backend) for backend in ("torch", "reference")}
    query, key, lengths = make_inputs()
    grads = {}
    for backend, layer in layers.items():
        context, weights = layer(query, key, key_lengths=lengths, need_weights=True)
        (context.square().sum() + weights[..., 0].sum()).backward()
        grads[backend] = {name: p.grad for name, p in layer.named_parameters()}
    for name, grad in grads["reference"].items():
        torch.testing.assert_close(grads["torch"][name], grad, rtol=1e-10, atol=1e-12)


def test_dropout_only_in_training():
    layer = make_layer(dropout=0.5)
    query, key, lengths = make_inputs()
    layer.eval()
    eval_context, weights = layer(query, key, key_lengths=lengths, need_weights=True)
    torch.testing.assert_close(eval_context, weights @ key)
    layer.train()
    torch.manual_seed(5)
    train_context, train_weights = layer(query, key, key_lengths=lengths, need_weights=True)
    torch.testing.assert_close(train_weights, weights)  # returned weights are the pre-dropout ones
    assert not torch.allclose(train_context, eval_context)
    torch.manual_seed(5)
    kept = nn.functional.dropout(weights, 0.5, training=True)
    torch.testing.assert_close(train_context, kept @ key)


def test_layer_argument_errors():
    layer = make_layer()
    query, key, lengths = make_inputs()
    with pytest.raises(ValueError, match=r"query must be \[B, T, query_dim=7\] or \[B, query_dim\], got \(3, 5, 8\)"):
        layer(torch.zeros(3, 5, 8, dtype=torch.float64), key)
    with pytest.raises(ValueError, match=r"key must be \[B, S, key_dim=9\], got \(3, 9\)"):
        layer(query, key[:, 0])
    with pytest.raises(TypeError, match=r"memory must be an AttentionMemory"):
        layer.step(query[:, 0], key)
    with pytest.raises(ValueError, match=r"query must be \[B, query_dim=7\] for a step"):
        layer.step(query, layer.precompute(key))
    with pytest.raises(ValueError, match=r"attn_dim must be a positive int"):
        AdditiveAttention(3, 4, 0)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        AdditiveAttention(3, 4, 5, backend="cuda")
