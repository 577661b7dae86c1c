"""CoverageAttention against an independent eager See et al. (2017) attention, step by step, on every backend;
coverage_loss values and gradients; beam reordering; errors."""
import pytest
import torch
from torch import nn

from attn_fast import AttentionMemory, CoverageAttention, CoverageState, coverage_loss
from attn_fast.tolerances import forward_tolerance, relative_error

QUERY_DIM, KEY_DIM, ATTN_DIM = 5, 6, 16
BATCH, SRC_LEN, STEPS = 3, 11, 5
LENGTHS = torch.tensor([11, 6, 8])


class EagerSeeAttention(nn.Module):
    """e_i = v . tanh(W_h h_i + W_s s_t + b_attn + w_c c_i), in the layout of the pointer-generator PyTorch ports."""

    def __init__(self, query_dim, key_dim, attn_dim):
        super().__init__()
        self.W_h = nn.Linear(key_dim, attn_dim, bias=False)
        self.W_s = nn.Linear(query_dim, attn_dim, bias=True)
        self.W_c = nn.Linear(1, attn_dim, bias=False)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, s_t, encoder_states, encoder_features, coverage, padding):
        features = encoder_features + self.W_s(s_t)[:, None] + self.W_c(coverage[..., None])
        scores = self.v(torch.tanh(features)).squeeze(-1)
        attn_dist = torch.softmax(scores.masked_fill(padding, float("-inf")), dim=1)
        context = torch.bmm(attn_dist[:, None], encoder_states)[:, 0]
        step_loss = torch.sum(torch.min(attn_dist, coverage), dim=1)
        return context, attn_dist, coverage + attn_dist, step_loss


def eager_decode(eager, queries, encoder_states, padding):
    features = eager.W_h(encoder_states)
    coverage = torch.zeros(encoder_states.shape[:2], dtype=encoder_states.dtype)
    outputs = []
    for step in range(queries.shape[1]):
        context, weights, coverage, step_loss = eager(queries[:, step], encoder_states, features, coverage, padding)
        outputs.append((context, weights, coverage, step_loss))
    return outputs


def layer_decode(layer, queries, encoder_states, **masks):
    state = layer.precompute(encoder_states, **masks)
    outputs = []
    for step in range(queries.shape[1]):
        context, weights, next_state = layer.step(queries[:, step], state)
        step_loss = coverage_loss(weights, state.coverage, reduction="none")
        outputs.append((context, weights, next_state.coverage, step_loss))
        state = next_state
    return outputs


def make_eager(seed=0):
    torch.manual_seed(seed)
    eager = EagerSeeAttention(QUERY_DIM, KEY_DIM, ATTN_DIM).double()
    with torch.no_grad():
        eager.W_s.bias.normal_()  # a nonzero b_attn, so that its gradient is checked too
    return eager


def make_layer(backend="torch", eager=None):
    eager = eager or make_eager()
    layer = CoverageAttention(QUERY_DIM, KEY_DIM, ATTN_DIM, backend=backend, dtype=torch.float64)
    layer.load_eager_weights(query_weight=eager.W_s.weight, key_weight=eager.W_h.weight, v=eager.v.weight,
                             coverage_weight=eager.W_c.weight, query_bias=eager.W_s.bias)
    return layer


def make_inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(BATCH, STEPS, QUERY_DIM, generator=generator, dtype=torch.float64)
    encoder_states = torch.randn(BATCH, SRC_LEN, KEY_DIM, generator=generator, dtype=torch.float64)
    return queries, encoder_states


def padding_of(lengths):
    return torch.arange(SRC_LEN)[None] >= lengths[:, None]


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_steps_equal_eager_see_et_al(backend, triton_device):
    device = torch.device("cpu")
    if backend == "triton":
        # attn_fast.kernels is the top-level kernels/ folder (setup.py's package_dir mapping).
        pytest.importorskip("attn_fast.kernels.forward")
        device = triton_device  # the GPU when there is one, else the CPU under the interpreter
    eager = make_eager()
    layer = make_layer(backend, eager).to(device)
    queries, encoder_states = make_inputs()
    # Triton accumulates in fp32 whatever the input dtype; the other backends compute in float64.
    tolerance = forward_tolerance(torch.float32) if backend == "triton" else forward_tolerance(torch.float64)
    with torch.no_grad():
        expected = eager_decode(eager, queries, encoder_states, padding_of(LENGTHS))
        actual = layer_decode(layer, queries.to(device), encoder_states.to(device), key_lengths=LENGTHS.to(device))
    actual = [tuple(tensor.cpu() for tensor in outputs) for outputs in actual]
    for step, (got, want) in enumerate(zip(actual, expected)):
        for name, a, b in zip(("context", "weights", "coverage", "coverage loss"), got, want):
            assert relative_error(a, b) <= tolerance, (step, name, relative_error(a, b))
    assert float(expected[-1][3].min()) > 0.1, "the coverage term must matter in this test"


def test_coverage_loss_gradient_reaches_every_parameter_and_equals_eager():
    eager = make_eager()
    layer = make_layer("torch", eager)
    queries, encoder_states = make_inputs()
    eager_loss = torch.stack([o[3] for o in eager_decode(eager, queries, encoder_states, padding_of(LENGTHS))]).mean()
    loss = torch.stack([o[3] for o in layer_decode(layer, queries, encoder_states, key_lengths=LENGTHS)]).mean()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=0)
    eager_loss.backward()
    loss.backward()
    pairs = {
        "attention.query_layer.weight": eager.W_s.weight.grad, "attention.query_layer.bias": eager.W_s.bias.grad,
        "attention.key_layer.weight": eager.W_h.weight.grad, "attention.v": eager.v.weight.grad[0],
        "coverage_weight": eager.W_c.weight.grad[:, 0],
    }
    parameters = dict(layer.named_parameters())
    assert set(parameters) == set(pairs)
    for name, expected in pairs.items():
        assert parameters[name].grad.abs().sum() > 0, name
        assert relative_error(parameters[name].grad, expected) <= 1e-9, name


def test_coverage_loss_values():
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)
    coverage = torch.tensor([[0.1, 0.6, 0.2], [1.2, 0.0, 0.3]], dtype=torch.float64)
    # min: row 0 -> 0.1 + 0.3 + 0.2 = 0.6; row 1 -> 0.1 + 0.0 + 0.3 = 0.4
    torch.testing.assert_close(coverage_loss(weights, coverage, reduction="none"),
                               torch.tensor([0.6, 0.4], dtype=torch.float64))
    torch.testing.assert_close(coverage_loss(weights, coverage), torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(coverage_loss(weights, coverage, reduction="sum"),
                               torch.tensor(1.0, dtype=torch.float64))
    key_padding = torch.tensor([[False, False, True], [False, False, True]])
    torch.testing.assert_close(coverage_loss(weights, coverage, key_padding_mask=key_padding, reduction="none"),
                               torch.tensor([0.4, 0.1], dtype=torch.float64))
    # Padded decoder steps are left out of the mean, as See et al. mask them.
    step_padding = torch.tensor([False, True])
    torch.testing.assert_close(coverage_loss(weights, coverage, query_padding_mask=step_padding),
                               torch.tensor(0.6, dtype=torch.float64))
    # All steps [B, T, S] at once: the mean over B * T rows.
    stacked = torch.stack((weights, coverage), dim=1)  # [2, 2, 3]
    torch.testing.assert_close(coverage_loss(stacked, stacked.flip(1), reduction="none"),
                               torch.tensor([[0.6, 0.6], [0.4, 0.4]], dtype=torch.float64))


def test_beam_reorder_equals_explicit_copies():
    layer = make_layer()
    _, encoder_states = make_inputs()
    beam, rows = 2, BATCH * 2
    generator = torch.Generator().manual_seed(4)
    queries = torch.randn(rows, STEPS, QUERY_DIM, generator=generator, dtype=torch.float64)
    state = layer.precompute(encoder_states, key_lengths=LENGTHS).reorder(torch.arange(BATCH).repeat_interleave(beam))
    key_proj = state.memory.key_proj
    for step in range(STEPS):
        copies = CoverageState(AttentionMemory(key_proj[state.index], encoder_states[state.index],
                                               LENGTHS[state.index]), state.coverage)
        context, weights, state = layer.step(queries[:, step], state)
        copy_context, copy_weights, _ = layer.step(queries[:, step], copies)
        torch.testing.assert_close(context, copy_context, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(weights, copy_weights, rtol=1e-12, atol=1e-12)
        backpointers = torch.randint(0, rows, (rows,), generator=generator)
        reordered = state.reorder(backpointers)
        assert reordered.coverage.equal(state.coverage[backpointers])
        assert reordered.index.equal(state.index[backpointers])
        assert reordered.memory.key_proj is key_proj
        state = reordered


def test_argument_errors():
    layer = make_layer()
    queries, encoder_states = make_inputs()
    state = layer.precompute(encoder_states, key_lengths=LENGTHS)
    weights = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"state must be a CoverageState"):
        layer.step(queries[:, 0], state.memory)
    with pytest.raises(ValueError, match=r"query must be \[B', query_dim\] = \[3, 5\]"):
        layer.step(queries[:, :2], state)
    with pytest.raises(ValueError, match=r"key must be \[B, S, key_dim=6\]"):
        layer.precompute(encoder_states[..., :5])
    with pytest.raises(ValueError, match=r"coverage_weight must have shape \[16\]"):
        layer.load_eager_weights(query_weight=layer.attention.query_layer.weight,
                                 key_weight=layer.attention.key_layer.weight, v=layer.attention.v,
                                 coverage_weight=torch.ones(15, dtype=torch.float64))
    with pytest.raises(ValueError,
                       match=r"coverage must have the shape of weights \[\.\.\., S\] = \(2, 4\), got \(2, 3\)"):
        coverage_loss(weights, weights[:, :3])
    with pytest.raises(TypeError, match=r"coverage must be a floating tensor"):
        coverage_loss(weights, torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        coverage_loss(weights, weights, reduction="max")
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor"):
        coverage_loss(weights, weights, key_padding_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask must broadcast to weights \(2, 4\), got \(3, 4\)"):
        coverage_loss(weights, weights, key_padding_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query_padding_mask must be \[\.\.\.\] = \(2,\)"):
        coverage_loss(weights, weights, query_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
