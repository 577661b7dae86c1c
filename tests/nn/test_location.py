"""LocationSensitiveAttention against an independent eager Tacotron-2 attention (NVIDIA's tacotron2/model.py
formula, written here with nn.Conv1d / nn.Linear), step by step, on every backend; loader, state, beam, errors."""
import pytest
import torch
from torch import nn

from attn_fast import AttentionMemory, LocationSensitiveAttention, LocationState
from attn_fast.tolerances import forward_tolerance, gradient_tolerance, relative_error

QUERY_DIM, KEY_DIM, ATTN_DIM, N_FILTERS, KERNEL_SIZE = 5, 6, 16, 4, 5
BATCH, SRC_LEN, STEPS = 3, 12, 5
LENGTHS = torch.tensor([12, 7, 9])


# --- the independent eager implementation (NVIDIA's module layout, so that its state dict has NVIDIA's names) ---

class LinearNorm(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear_layer = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x):
        return self.linear_layer(x)


class ConvNorm(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x):
        return self.conv(x)


class EagerLocationLayer(nn.Module):
    def __init__(self, n_filters, kernel_size, attn_dim):
        super().__init__()
        self.location_conv = ConvNorm(2, n_filters, kernel_size)
        self.location_dense = LinearNorm(n_filters, attn_dim)

    def forward(self, attention_weights_cat):  # [B, 2, S] -> [B, S, A]
        return self.location_dense(self.location_conv(attention_weights_cat).transpose(1, 2))


class EagerTacotron2Attention(nn.Module):
    def __init__(self, query_dim, key_dim, attn_dim, n_filters, kernel_size):
        super().__init__()
        self.query_layer = LinearNorm(query_dim, attn_dim)
        self.memory_layer = LinearNorm(key_dim, attn_dim)
        self.v = LinearNorm(attn_dim, 1)
        self.location_layer = EagerLocationLayer(n_filters, kernel_size, attn_dim)

    def forward(self, query, memory, processed_memory, attention_weights_cat, padding):
        processed_query = self.query_layer(query)[:, None]
        processed_location = self.location_layer(attention_weights_cat)
        energies = self.v(torch.tanh(processed_query + processed_location + processed_memory)).squeeze(-1)
        weights = torch.softmax(energies.masked_fill(padding, float("-inf")), dim=1)
        return torch.bmm(weights[:, None], memory)[:, 0], weights


def eager_decode(eager, queries, memory, padding):
    """Tacotron-2's decoder loop around the attention, started from uniform weights over the unpadded keys."""
    processed_memory = eager.memory_layer(memory)
    prev = (~padding).double() / (~padding).sum(1, keepdim=True)
    cumulative = torch.zeros_like(prev)
    outputs = []
    for step in range(queries.shape[1]):
        weights_cat = torch.cat((prev[:, None], cumulative[:, None]), dim=1)
        context, weights = eager(queries[:, step], memory, processed_memory, weights_cat, padding)
        prev, cumulative = weights, cumulative + weights
        outputs.append((context, weights, cumulative))
    return outputs


def layer_decode(layer, queries, memory, **masks):
    state = layer.precompute(memory, **masks)
    outputs = []
    for step in range(queries.shape[1]):
        context, weights, state = layer.step(queries[:, step], state)
        outputs.append((context, weights, state.cumulative_weights))
    return outputs


def make_eager(seed=0):
    torch.manual_seed(seed)
    return EagerTacotron2Attention(QUERY_DIM, KEY_DIM, ATTN_DIM, N_FILTERS, KERNEL_SIZE).double()


def make_layer(backend="torch", eager=None):
    layer = LocationSensitiveAttention(QUERY_DIM, KEY_DIM, ATTN_DIM, n_filters=N_FILTERS, kernel_size=KERNEL_SIZE,
                                       backend=backend, dtype=torch.float64)
    layer.load_tacotron2_state_dict((eager or make_eager()).state_dict())
    return layer


def make_inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(BATCH, STEPS, QUERY_DIM, generator=generator, dtype=torch.float64)
    memory = torch.randn(BATCH, SRC_LEN, KEY_DIM, generator=generator, dtype=torch.float64)
    return queries, memory


def padding_of(lengths):
    return torch.arange(SRC_LEN)[None] >= lengths[:, None]


# --- equality with the eager formula ---

@pytest.mark.parametrize("backend,mask", [("torch", "lengths"), ("torch", "padding"), ("reference", "lengths"),
                                          ("triton", "lengths")])
def test_steps_equal_eager_tacotron2(backend, mask, triton_device):
    device = torch.device("cpu")
    if backend == "triton":
        # attn_fast.kernels is the top-level kernels/ folder (setup.py's package_dir mapping).
        pytest.importorskip("attn_fast.kernels.forward")
        device = triton_device  # the GPU when there is one, else the CPU under the interpreter
    eager = make_eager()
    layer = make_layer(backend, eager).to(device)
    queries, memory = make_inputs()
    padding = padding_of(LENGTHS)
    if mask == "padding":  # holes inside the sequence too, not only a padded tail
        padding = padding.clone()
        padding[0, 3] = padding[2, 0] = True
    masks = {"key_lengths": LENGTHS} if mask == "lengths" else {"key_padding_mask": padding}
    # Triton accumulates in fp32 whatever the input dtype; the other backends compute in float64.
    tolerance = forward_tolerance(torch.float32) if backend == "triton" else forward_tolerance(torch.float64)
    with torch.no_grad():
        expected = eager_decode(eager, queries, memory, padding)
        actual = layer_decode(layer, queries.to(device), memory.to(device),
                              **{name: mask.to(device) for name, mask in masks.items()})
    actual = [tuple(tensor.cpu() for tensor in outputs) for outputs in actual]
    for step, (got, want) in enumerate(zip(actual, expected)):
        for name, a, b in zip(("context", "weights", "cumulative"), got, want):
            assert relative_error(a, b) <= tolerance, (step, name, relative_error(a, b))
        assert torch.all(got[1][padding] == 0), "padded keys must get exactly zero weight"


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("reference", torch.float64),
                                           ("triton", torch.float32)], ids=["torch", "reference", "triton"])
def test_gradients_through_the_sequence_equal_eager(backend, dtype, triton_device):
    """The loss reads every step's context and weights; the eager side runs in float64 on the same (rounded)
    values. Triton in float32: its backward kernels take fp32/fp16/bf16 only."""
    device = torch.device("cpu")
    if backend == "triton":
        # attn_fast.kernels is the top-level kernels/ folder (setup.py's package_dir mapping).
        pytest.importorskip("attn_fast.kernels.backward")
        device = triton_device  # the GPU when there is one, else the CPU under the interpreter
    eager = make_eager()
    with torch.no_grad():
        for parameter in eager.parameters():
            parameter.copy_(parameter.to(dtype))
    layer = make_layer(backend, eager).to(dtype).to(device)
    queries, memory = (tensor.to(dtype).double() for tensor in make_inputs())
    generator = torch.Generator().manual_seed(7)
    grads_in = [(torch.randn(BATCH, KEY_DIM, generator=generator, dtype=torch.float64),
                 torch.randn(BATCH, SRC_LEN, generator=generator, dtype=torch.float64)) for _ in range(STEPS)]

    def loss_and_input_grads(outputs, inputs):
        loss = sum((c * gc.to(c)).sum() + (w * gw.to(w)).sum()
                   for (c, w, _), (gc, gw) in zip(outputs, grads_in))
        return torch.autograd.grad(loss, inputs, retain_graph=True), loss

    q1, m1 = queries.clone().requires_grad_(), memory.clone().requires_grad_()
    q2, m2 = queries.to(dtype).to(device).requires_grad_(), memory.to(dtype).to(device).requires_grad_()
    (dq_eager, dm_eager), eager_loss = loss_and_input_grads(eager_decode(eager, q1, m1, padding_of(LENGTHS)), (q1, m1))
    (dq, dm), loss = loss_and_input_grads(layer_decode(layer, q2, m2, key_lengths=LENGTHS.to(device)), (q2, m2))
    eager_loss.backward()
    loss.backward()
    tolerance = gradient_tolerance(dtype)
    assert relative_error(dq.cpu(), dq_eager) <= tolerance
    assert relative_error(dm.cpu(), dm_eager) <= tolerance
    pairs = {
        layer.attention.query_layer.weight: eager.query_layer.linear_layer.weight,
        layer.attention.key_layer.weight: eager.memory_layer.linear_layer.weight,
        layer.location_conv.weight: eager.location_layer.location_conv.conv.weight,
        layer.location_dense.weight: eager.location_layer.location_dense.linear_layer.weight,
    }
    for ours, theirs in pairs.items():
        assert relative_error(ours.grad.cpu(), theirs.grad) <= tolerance
    assert relative_error(layer.attention.v.grad.cpu(), eager.v.linear_layer.weight.grad[0]) <= tolerance
    # The location parameters get their gradient only through the weights fed back from earlier steps.
    assert layer.location_conv.weight.grad.abs().sum() > 0


def test_gradcheck_tiny_sequence():
    torch.manual_seed(2)
    layer = LocationSensitiveAttention(3, 4, 4, n_filters=2, kernel_size=3, backend="torch", dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 3])

    def run(queries, memory):
        outputs = layer_decode(layer, queries, memory, key_lengths=lengths)
        return torch.cat([torch.cat((c, w), dim=1) for c, w, _ in outputs], dim=1)

    assert torch.autograd.gradcheck(run, (queries, memory), fast_mode=True)


# --- loader ---

def plain_names(state_dict):
    renames = {"query_layer.linear_layer.weight": "query_layer.weight",
               "memory_layer.linear_layer.weight": "memory_layer.weight", "v.linear_layer.weight": "v.weight",
               "location_layer.location_conv.conv.weight": "location_conv.weight",
               "location_layer.location_dense.linear_layer.weight": "location_dense.weight"}
    return {renames[key]: value for key, value in state_dict.items()}


def test_loader_accepts_both_namings_and_a_prefix():
    eager = make_eager(seed=5)
    nvidia = make_layer(eager=eager)
    plain = make_layer()
    plain.load_tacotron2_state_dict(plain_names(eager.state_dict()))
    checkpoint = {f"decoder.attention_layer.{key}": value for key, value in eager.state_dict().items()}
    checkpoint["decoder.prenet.layers.0.linear_layer.weight"] = torch.ones(3, 3)  # other layers are ignored
    sized = LocationSensitiveAttention.from_tacotron2_state_dict(checkpoint, "decoder.attention_layer.",
                                                                 backend="torch")
    assert (sized.query_dim, sized.key_dim, sized.attn_dim) == (QUERY_DIM, KEY_DIM, ATTN_DIM)
    assert (sized.n_filters, sized.kernel_size) == (N_FILTERS, KERNEL_SIZE)
    assert sized.location_conv.weight.dtype == torch.float64
    expected = dict(nvidia.named_parameters())
    assert expected["attention.v"].equal(eager.v.linear_layer.weight[0])
    assert expected["location_conv.weight"].equal(eager.location_layer.location_conv.conv.weight)
    for layer in (plain, sized):
        for name, parameter in layer.named_parameters():
            assert parameter.equal(expected[name]), name


def test_loader_errors():
    layer = make_layer()
    state_dict = plain_names(make_eager().state_dict())
    missing = {key: value for key, value in state_dict.items() if key != "location_dense.weight"}
    with pytest.raises(ValueError, match=r"lacks location_layer\.location_dense\.linear_layer\.weight or "
                                         r"location_dense\.weight"):
        layer.load_tacotron2_state_dict(missing)
    wrong = dict(state_dict, **{"location_conv.weight": torch.randn(N_FILTERS, 2, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"location_conv\.weight must have shape \[4, 2, 5\], got \(4, 2, 3\)"):
        layer.load_tacotron2_state_dict(wrong)
    with_bias = dict(state_dict, **{"query_layer.bias": torch.randn(ATTN_DIM, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"unexpected query_layer\.bias"):
        layer.load_tacotron2_state_dict(with_bias)
    before = layer.location_conv.weight.clone()
    with pytest.raises(ValueError):
        layer.load_tacotron2_state_dict(wrong)
    assert layer.location_conv.weight.equal(before), "a failed load must not change the layer"


# --- state ---

def test_uniform_initial_weights_over_visible_keys():
    layer = make_layer()
    _, memory = make_inputs()
    lengths = torch.tensor([12, 4, 0])
    padding = torch.zeros(BATCH, SRC_LEN, dtype=torch.bool)
    padding[0, 1] = True
    state = layer.precompute(memory, key_lengths=lengths, key_padding_mask=padding)
    expected = torch.zeros(BATCH, SRC_LEN, dtype=torch.float64)
    expected[0] = 1 / 11
    expected[0, 1] = 0
    expected[1, :4] = 1 / 4  # row 2 sees no key: zeros, not NaN
    torch.testing.assert_close(state.prev_weights, expected, rtol=1e-15, atol=0)
    assert state.cumulative_weights.equal(torch.zeros(BATCH, SRC_LEN, dtype=torch.float64))
    zeros = layer.precompute(memory, key_lengths=lengths, initial_weights="zeros")
    assert zeros.prev_weights.equal(torch.zeros(BATCH, SRC_LEN, dtype=torch.float64))


def test_step_leaves_its_state_unchanged_and_forward_is_step():
    layer = make_layer()
    queries, memory = make_inputs()
    state = layer.precompute(memory, key_lengths=LENGTHS)
    _, _, state = layer.step(queries[:, 0], state)
    prev, cumulative = state.prev_weights.clone(), state.cumulative_weights.clone()
    context, weights, next_state = layer.step(queries[:, 1], state)
    assert state.prev_weights.equal(prev) and state.cumulative_weights.equal(cumulative)
    assert next_state.prev_weights.equal(weights)
    torch.testing.assert_close(next_state.cumulative_weights, cumulative + weights, rtol=0, atol=0)
    called_context, called_weights, _ = layer(queries[:, 1], state)
    assert called_context.equal(context) and called_weights.equal(weights)


def test_beam_index_equals_explicit_copies():
    layer = make_layer()
    queries, memory = make_inputs()
    beam = 3
    rows = BATCH * beam
    generator = torch.Generator().manual_seed(4)
    beam_queries = torch.randn(rows, STEPS, QUERY_DIM, generator=generator, dtype=torch.float64)
    state = layer.precompute(memory, key_lengths=LENGTHS).reorder(torch.arange(BATCH).repeat_interleave(beam))
    direct = layer.precompute(memory, key_lengths=LENGTHS, index=state.index)
    assert direct.prev_weights.equal(state.prev_weights)
    key_proj = state.memory.key_proj
    for step in range(STEPS):
        # The same hypotheses with their memory rows copied out explicitly and no index.
        copies = LocationState(AttentionMemory(key_proj[state.index], memory[state.index], LENGTHS[state.index]),
                               state.prev_weights, state.cumulative_weights)
        context, weights, state = layer.step(beam_queries[:, step], state)
        copy_context, copy_weights, _ = layer.step(beam_queries[:, step], copies)
        torch.testing.assert_close(context, copy_context, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(weights, copy_weights, rtol=1e-12, atol=1e-12)
        backpointers = torch.randint(0, rows, (rows,), generator=generator)
        reordered = state.reorder(backpointers)
        assert reordered.index.equal(state.index[backpointers])
        assert reordered.cumulative_weights.equal(state.cumulative_weights[backpointers])
        assert reordered.prev_weights.equal(state.prev_weights[backpointers])
        assert reordered.memory.key_proj is key_proj, "the encoder memory is shared, never copied"
        state = reordered


# --- validation ---

def test_argument_errors():
    layer = make_layer()
    queries, memory = make_inputs()
    state = layer.precompute(memory, key_lengths=LENGTHS)
    with pytest.raises(ValueError, match=r"query must be \[B', query_dim\] = \[3, 5\] \(one row per state row\), "
                                         r"got \(2, 5\)"):
        layer.step(queries[:2, 0], state)
    with pytest.raises(TypeError, match=r"query must have the layer's dtype torch.float64, got torch.float32"):
        layer.step(queries[:, 0].float(), state)
    with pytest.raises(TypeError, match=r"state must be a LocationState"):
        layer.step(queries[:, 0], state.memory)
    with pytest.raises(TypeError, match=r"key must have the layer's dtype torch.float64, got torch.float32"):
        layer.precompute(memory.float())
    with pytest.raises(ValueError, match=r"key must be \[B, S, key_dim=6\]"):
        layer.precompute(memory[0])
    with pytest.raises(ValueError, match=r"key_lengths values must lie in \[0, S\] = \[0, 12\]"):
        layer.precompute(memory, key_lengths=torch.tensor([13, 1, 1]))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, S\]"):
        layer.precompute(memory, key_padding_mask=torch.zeros(BATCH, 1, SRC_LEN, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 3\)"):
        layer.precompute(memory, index=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"initial_weights must be one of"):
        layer.precompute(memory, initial_weights="ones")
    # Backpointer values are not read on the host (no sync per beam step); the reorder's gathers reject them.
    with pytest.raises(IndexError, match=r"index out of range"):
        state.reorder(torch.tensor([0, 3]))
    with pytest.raises(TypeError, match=r"backpointers must have an integer dtype"):
        state.reorder(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"kernel_size must be a positive odd int, got 4"):
        LocationSensitiveAttention(3, 4, 5, kernel_size=4)
