"""swap_attention on NVIDIA Tacotron-2's Attention (github.com/NVIDIA/tacotron2, model.py).

That repository is not a package (no pip install), so these tests hold a test-only stand-in written after its
model.py: the same module layout and parameter names (LinearNorm / ConvNorm wrappers, Attention, LocationLayer),
the same forward math (energies masked with -inf through `.data`, softmax, bmm), and the attention half of its
Decoder (`initialize_decoder_states`, the attention RNN, `attention_weights_cat`, `attention_weights_cum +=`).
Never shipped: attn_fast recognizes the real module by this layout.

Every comparison is against the stand-in run in float64 on the same (rounded) inputs and weights, with the
library's error measure and tolerance table.
"""
from __future__ import annotations

import copy
import importlib.util
import io

import pytest
import torch
from integration_helpers import CPU, MODULE_BACKENDS, to_cpu, without_tf32
from torch import nn
from torch.nn import functional as F

from attn_fast.integrations import replacement_for, swap_attention
from attn_fast.integrations.tacotron2 import Tacotron2Attention
from attn_fast.tolerances import forward_tolerance, gradient_tolerance, relative_error
from tests.backend_cases import backend_device

QUERY_DIM, ENCODER_DIM, ATTN_DIM, FILTERS, KERNEL = 12, 10, 16, 4, 5
PRENET_DIM = 6


# ----- the stand-in (NVIDIA's layout and math) -----

class LinearNorm(nn.Module):
    def __init__(self, in_dim, out_dim, bias=True, w_init_gain="linear"):
        super().__init__()
        self.linear_layer = nn.Linear(in_dim, out_dim, bias=bias)
        nn.init.xavier_uniform_(self.linear_layer.weight, gain=nn.init.calculate_gain(w_init_gain))

    def forward(self, x):
        return self.linear_layer(x)


class ConvNorm(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, padding, bias=True, w_init_gain="linear"):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=1, padding=padding, dilation=1,
                              bias=bias)
        nn.init.xavier_uniform_(self.conv.weight, gain=nn.init.calculate_gain(w_init_gain))

    def forward(self, signal):
        return self.conv(signal)


class LocationLayer(nn.Module):
    def __init__(self, n_filters, kernel_size, attention_dim):
        super().__init__()
        self.location_conv = ConvNorm(2, n_filters, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.location_dense = LinearNorm(n_filters, attention_dim, bias=False, w_init_gain="tanh")

    def forward(self, attention_weights_cat):
        return self.location_dense(self.location_conv(attention_weights_cat).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, attention_rnn_dim, embedding_dim, attention_dim, n_filters, kernel_size):
        super().__init__()
        self.query_layer = LinearNorm(attention_rnn_dim, attention_dim, bias=False, w_init_gain="tanh")
        self.memory_layer = LinearNorm(embedding_dim, attention_dim, bias=False, w_init_gain="tanh")
        self.v = LinearNorm(attention_dim, 1, bias=False)
        self.location_layer = LocationLayer(n_filters, kernel_size, attention_dim)
        self.score_mask_value = -float("inf")

    def get_alignment_energies(self, query, processed_memory, attention_weights_cat):
        processed_query = self.query_layer(query.unsqueeze(1))
        processed_attention_weights = self.location_layer(attention_weights_cat)
        energies = self.v(torch.tanh(processed_query + processed_attention_weights + processed_memory))
        return energies.squeeze(-1)

    def forward(self, attention_hidden_state, memory, processed_memory, attention_weights_cat, mask):
        alignment = self.get_alignment_energies(attention_hidden_state, processed_memory, attention_weights_cat)
        if mask is not None:
            alignment.data.masked_fill_(mask, self.score_mask_value)
        attention_weights = F.softmax(alignment, dim=1)
        attention_context = torch.bmm(attention_weights.unsqueeze(1), memory).squeeze(1)
        return attention_context, attention_weights


class ForcedAttention(Attention):
    """A fork's variant (Mellotron-style): one more forward argument that can override the weights."""

    def forward(self, attention_hidden_state, memory, processed_memory, attention_weights_cat, mask,
                attention_weights=None):
        if attention_weights is not None:
            return torch.bmm(attention_weights.unsqueeze(1), memory).squeeze(1), attention_weights
        return super().forward(attention_hidden_state, memory, processed_memory, attention_weights_cat, mask)


class Decoder(nn.Module):
    """The attention half of NVIDIA's Decoder: its states, the attention RNN and the weight recurrence."""

    def __init__(self, attention_class=Attention):
        super().__init__()
        self.attention_rnn = nn.LSTMCell(PRENET_DIM + ENCODER_DIM, QUERY_DIM)
        self.attention_layer = attention_class(QUERY_DIM, ENCODER_DIM, ATTN_DIM, FILTERS, KERNEL)

    def initialize_decoder_states(self, memory, mask):
        batch, max_time = memory.shape[:2]
        self.attention_hidden = memory.new_zeros(batch, QUERY_DIM)
        self.attention_cell = memory.new_zeros(batch, QUERY_DIM)
        self.attention_weights = memory.new_zeros(batch, max_time)
        self.attention_weights_cum = memory.new_zeros(batch, max_time)
        self.attention_context = memory.new_zeros(batch, ENCODER_DIM)
        self.memory = memory
        self.processed_memory = self.attention_layer.memory_layer(memory)
        self.mask = mask

    def decode(self, decoder_input):
        cell_input = torch.cat((decoder_input, self.attention_context), -1)
        self.attention_hidden, self.attention_cell = self.attention_rnn(
            cell_input, (self.attention_hidden, self.attention_cell))
        attention_weights_cat = torch.cat(
            (self.attention_weights.unsqueeze(1), self.attention_weights_cum.unsqueeze(1)), dim=1)
        self.attention_context, self.attention_weights = self.attention_layer(
            self.attention_hidden, self.memory, self.processed_memory, attention_weights_cat, self.mask)
        self.attention_weights_cum += self.attention_weights
        return self.attention_context, self.attention_weights

    def forward(self, memory, decoder_inputs, memory_lengths):
        """memory [B, S, D], decoder_inputs [T, B, PRENET_DIM], memory_lengths [B] or None (inference) ->
        contexts [B, T, D], alignments [B, T, S]."""
        mask = None
        if memory_lengths is not None:
            # True on padding; on the memory's device, as NVIDIA's get_mask_from_lengths builds it on the GPU
            mask = ~(torch.arange(memory.shape[1], device=memory.device)[None, :] < memory_lengths[:, None])
        self.initialize_decoder_states(memory, mask)
        contexts, alignments = [], []
        for decoder_input in decoder_inputs:
            context, weights = self.decode(decoder_input)
            contexts.append(context)
            alignments.append(weights)
        return torch.stack(contexts, 1), torch.stack(alignments, 1)


class Tacotron2(nn.Module):
    def __init__(self, attention_class=Attention):
        super().__init__()
        self.decoder = Decoder(attention_class)

    def forward(self, memory, decoder_inputs, memory_lengths):
        return self.decoder(memory, decoder_inputs, memory_lengths)


# ----- helpers -----

def make_inputs(dtype, batch=3, src_len=9, steps=5, lengths=(9, 4, 7)):
    memory = torch.randn(batch, src_len, ENCODER_DIM, dtype=dtype)
    decoder_inputs = torch.randn(steps, batch, PRENET_DIM, dtype=dtype)
    return memory, decoder_inputs, None if lengths is None else torch.tensor(lengths)


def randomized(model):
    """Every parameter drawn anew at a scale where the tanh is neither linear nor saturated."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.4)
    return model


def run_with_gradients(model, memory, decoder_inputs, lengths, probe_context, probe_weights, device=CPU):
    """Outputs and the gradients of a fixed random projection of them, w.r.t. every parameter and the inputs, all
    on the CPU; the model runs on `device` (the inputs are CPU leaves, moved there differentiably)."""
    memory = memory.clone().requires_grad_()
    decoder_inputs = decoder_inputs.clone().requires_grad_()
    contexts, alignments = to_cpu(model(memory.to(device), decoder_inputs.to(device),
                                        None if lengths is None else lengths.to(device)))
    loss = (contexts * probe_context).sum() + (alignments * probe_weights).sum()
    loss.backward()
    grads = {name: to_cpu(parameter.grad) for name, parameter in model.named_parameters()}
    grads["<memory>"], grads["<decoder_inputs>"] = memory.grad, decoder_inputs.grad
    return contexts.detach(), alignments.detach(), grads


def check_against_float64(dtype, backend, device, *, batch=3, src_len=9, steps=5, lengths=(9, 4, 7)):
    """The stand-in and its swapped copy (on `device`), in `dtype`, against the stand-in in float64 (on the CPU):
    contexts, alignments and the gradients of every parameter and input; padded keys get exactly zero weight."""
    original = randomized(Tacotron2()).to(dtype)
    swapped = copy.deepcopy(original)
    assert swap_attention(swapped, backend=backend).ok
    assert swapped.decoder.attention_layer.backend == backend
    swapped.to(device)
    truth = copy.deepcopy(original).double()
    memory, decoder_inputs, lengths = make_inputs(dtype, batch, src_len, steps, lengths)
    probe_context = torch.randn(batch, steps, ENCODER_DIM, dtype=dtype)
    probe_weights = torch.randn(batch, steps, src_len, dtype=dtype)

    expected = run_with_gradients(truth, memory.double(), decoder_inputs.double(), lengths,
                                  probe_context.double(), probe_weights.double())
    # the original's own error is the yardstick the swap must meet too
    for model, where in ((original, CPU), (swapped, device)):
        contexts, alignments, grads = run_with_gradients(model, memory, decoder_inputs, lengths, probe_context,
                                                         probe_weights, where)
        assert contexts.dtype == alignments.dtype == dtype
        assert relative_error(contexts, expected[0]) <= forward_tolerance(dtype)
        assert relative_error(alignments, expected[1]) <= forward_tolerance(dtype)
        assert grads.keys() == expected[2].keys()
        for name, grad in grads.items():
            assert relative_error(grad, expected[2][name]) <= gradient_tolerance(dtype), name
    for row, length in enumerate(lengths):  # the swapped model's alignments, from the loop's last turn
        assert torch.all(alignments[row, :, length:] == 0)


# ----- tests -----

def test_swap_keeps_names_shapes_and_tensors():
    model = Tacotron2()
    before = {name: parameter for name, parameter in model.named_parameters()}
    keys = list(model.state_dict())
    report = swap_attention(model)
    assert report.ok and [entry.path for entry in report.swapped] == ["decoder.attention_layer"]
    assert report.swapped[0].original == "Attention" and report.swapped[0].replacement == "Tacotron2Attention"
    assert isinstance(model.decoder.attention_layer, Tacotron2Attention)
    assert list(model.state_dict()) == keys
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    # A second swap finds nothing left to do: the replacement is never swapped again.
    again = swap_attention(model)
    assert again.swapped == [] and again.skipped == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_outputs_and_gradients_match_the_original(dtype, backend, triton_device):
    check_against_float64(dtype, backend, backend_device(backend, triton_device))


def test_outputs_and_gradients_match_the_original_on_triton(triton_device):
    """The same on the Triton kernels (float32 only: they compute float64 in fp32), on a small case for the
    interpreter: 2 utterances (one padded), 7 keys, 3 decoder steps."""
    with without_tf32():
        check_against_float64(torch.float32, "triton", backend_device("triton", triton_device), batch=2, src_len=7,
                              steps=3, lengths=(7, 4))


def test_inference_without_mask():
    original = randomized(Tacotron2()).double()
    swapped = copy.deepcopy(original)
    swap_attention(swapped)
    memory, decoder_inputs, _ = make_inputs(torch.float64, lengths=None)
    with torch.no_grad():
        expected = original(memory, decoder_inputs, None)
        actual = swapped(memory, decoder_inputs, None)
    for got, want in zip(actual, expected):
        assert relative_error(got, want) <= forward_tolerance(torch.float64)


def test_a_row_of_padding_only_is_nan_in_the_original_and_zero_in_the_replacement():
    original = randomized(Tacotron2()).double()
    swapped = copy.deepcopy(original)
    swap_attention(swapped)
    memory, decoder_inputs, lengths = make_inputs(torch.float64, lengths=(9, 0, 7))
    with torch.no_grad():
        expected_contexts, expected_weights = original(memory, decoder_inputs, lengths)
        contexts, weights = swapped(memory, decoder_inputs, lengths)
    assert torch.isnan(expected_weights[1]).all() and torch.isnan(expected_contexts[1]).all()
    assert torch.all(weights[1] == 0) and torch.all(contexts[1] == 0)
    # The other rows do not see the empty one: each row's recurrence is its own.
    keep = [0, 2]
    assert relative_error(contexts[keep], expected_contexts[keep]) <= forward_tolerance(torch.float64)
    assert relative_error(weights[keep], expected_weights[keep]) <= forward_tolerance(torch.float64)


def test_alignment_energies_are_the_originals():
    original = randomized(Tacotron2()).double().decoder.attention_layer
    replacement = replacement_for(original)
    query = torch.randn(3, QUERY_DIM, dtype=torch.float64)
    processed_memory = torch.randn(3, 9, ATTN_DIM, dtype=torch.float64)
    weights_cat = torch.rand(3, 2, 9, dtype=torch.float64)
    torch.testing.assert_close(replacement.get_alignment_energies(query, processed_memory, weights_cat),
                               original.get_alignment_energies(query, processed_memory, weights_cat))


def test_checkpoint_round_trip_through_a_swapped_model():
    """Framework checkpoint -> swap -> train a step -> save -> load into a fresh unswapped model -> same outputs."""
    checkpoint = io.BytesIO()
    torch.save({"state_dict": randomized(Tacotron2()).state_dict()}, checkpoint)

    checkpoint.seek(0)
    model = Tacotron2()
    model.load_state_dict(torch.load(checkpoint)["state_dict"])
    swap_attention(model)
    memory, decoder_inputs, lengths = make_inputs(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built after the swap: the same tensors anyway
    contexts, alignments = model(memory, decoder_inputs, lengths)
    (contexts.square().sum() + alignments[:, -1].sum()).backward()
    optimizer.step()

    saved = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, saved)
    saved.seek(0)
    fresh = Tacotron2()
    fresh.load_state_dict(torch.load(saved)["state_dict"])
    assert not isinstance(fresh.decoder.attention_layer, Tacotron2Attention)
    with torch.no_grad():
        expected = fresh(memory, decoder_inputs, lengths)
        actual = model(memory, decoder_inputs, lengths)
    for got, want in zip(actual, expected):
        assert relative_error(got, want) <= forward_tolerance(torch.float32)


def test_variants_are_reported_and_strict_changes_nothing():
    model = nn.ModuleDict({"plain": Tacotron2(), "forced": Tacotron2(ForcedAttention)})
    with pytest.raises(ValueError, match="forced.decoder.attention_layer"):
        swap_attention(model, strict=True)
    assert type(model["plain"].decoder.attention_layer) is Attention  # strict refused before changing anything

    report = swap_attention(model)
    assert [entry.path for entry in report.swapped] == ["plain.decoder.attention_layer"]
    assert [entry.path for entry in report.skipped] == ["forced.decoder.attention_layer"]
    assert "attention_weights" in report.skipped[0].reason
    assert type(model["forced"].decoder.attention_layer) is ForcedAttention


def test_a_biased_score_vector_is_still_exact():
    """v with a bias (some forks): the same shift of every energy, removed by the softmax."""
    original = randomized(Tacotron2()).double()
    attention = original.decoder.attention_layer
    attention.v.linear_layer = nn.Linear(ATTN_DIM, 1, dtype=torch.float64)
    swapped = copy.deepcopy(original)
    assert swap_attention(swapped).ok
    memory, decoder_inputs, lengths = make_inputs(torch.float64)
    with torch.no_grad():
        for got, want in zip(swapped(memory, decoder_inputs, lengths), original(memory, decoder_inputs, lengths)):
            assert relative_error(got, want) <= forward_tolerance(torch.float64)


def test_a_module_with_more_submodules_is_left():
    model = Tacotron2()
    model.decoder.attention_layer.extra = nn.Linear(2, 2)
    report = swap_attention(model)
    assert report.swapped == [] and "extra" in report.skipped[0].reason


class DecodeStep(nn.Module):
    """One step of the Decoder, its states as inputs and outputs (what a deployed decoding loop feeds back)."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, decoder_input, attention_hidden, attention_cell, attention_weights, attention_weights_cum,
                attention_context, memory, mask):
        decoder = self.decoder
        decoder.attention_hidden, decoder.attention_cell = attention_hidden, attention_cell
        decoder.attention_weights, decoder.attention_context = attention_weights, attention_context
        decoder.attention_weights_cum = attention_weights_cum.clone()  # decode adds to it in place
        decoder.memory, decoder.mask = memory, mask
        decoder.processed_memory = decoder.attention_layer.memory_layer(memory)
        context, weights = decoder.decode(decoder_input)
        return context, weights, decoder.attention_weights_cum, decoder.attention_hidden


@pytest.mark.skipif(any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")),
                    reason="needs the export extra: pip install onnx onnxscript onnxruntime")
@pytest.mark.slow  # torch.export + ONNX export of an LSTM step: ~20 s on 2 busy cores
def test_onnx_export_of_a_swapped_decoder_step():
    import onnxruntime

    from attn_fast.export import export_onnx

    model = randomized(Tacotron2())
    swap_attention(model, backend="torch")
    step = DecodeStep(model.decoder).eval()
    batch, src_len = 3, 9
    previous = torch.rand(batch, src_len).softmax(-1)
    inputs = (torch.randn(batch, PRENET_DIM), torch.randn(batch, QUERY_DIM), torch.randn(batch, QUERY_DIM), previous,
              previous * 2, torch.randn(batch, ENCODER_DIM), torch.randn(batch, src_len, ENCODER_DIM),
              ~(torch.arange(src_len)[None, :] < torch.tensor([9, 0, 5])[:, None]))  # row 1: padding only
    with torch.no_grad():
        onnx_program = export_onnx(step, inputs)
        expected = step(*inputs)
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [entry.name for entry in session.get_inputs()]
    outputs = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs)})
    for got, want in zip(outputs, expected):
        assert relative_error(torch.from_numpy(got), want) <= forward_tolerance(torch.float32)
    assert (outputs[1][1] == 0).all() and (outputs[0][1] == 0).all()  # zeros, not NaN, in ONNX Runtime too


def test_other_modules_are_not_recognized_and_cannot_be_wrapped():
    assert replacement_for(nn.Linear(3, 3)) is None
    assert replacement_for(LocationLayer(FILTERS, KERNEL, ATTN_DIM)) is None
    with pytest.raises(ValueError, match="not laid out as NVIDIA"):
        Tacotron2Attention(nn.Linear(3, 3))
