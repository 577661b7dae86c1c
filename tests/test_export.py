"""attn_fast.export: the backends' forward ops decomposed to standard ATen ops, and ONNX graphs of models that use
the library running in ONNX Runtime with PyTorch's numbers (fp32 tolerance of attn_fast.tolerances).

The ONNX tests need the `export` extra (onnx, onnxscript, onnxruntime) and are skipped without it.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import attn_fast
from attn_fast.examples.seq2seq.model import Seq2Seq
from attn_fast.export import decompose, decompositions, exact_attention, export_onnx
from attn_fast.nn.additive import AttentionMemory
from attn_fast.tolerances import forward_tolerance, relative_error

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the export extra: pip install onnx onnxscript onnxruntime")


def attn_fast_ops(graph_module) -> list[str]:
    return [str(node.target) for node in graph_module.graph.nodes
            if node.op == "call_function" and "attn_fast" in str(node.target)]


def foreign_ops(graph_module) -> list[str]:
    """Every call in the graph that is neither an ATen op nor a getitem."""
    return [str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"
            and not (isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten")
            and node.target.__name__ != "getitem"]


def run_onnx(onnx_program, inputs) -> list:
    """Run the program in ONNX Runtime (CPU) on the inputs (tensors, in the exported order)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [entry.name for entry in session.get_inputs()]
    assert len(names) == len(inputs)
    return [torch.from_numpy(output) for output in
            session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs)})]


def op_inputs(dtype, *, index=False, extra=False, lengths=True, mask=None, causal=False, batch=3, steps=4,
              src_len=6, attn_dim=8, value_dim=5):
    """Random inputs of a forward op, flat (AttentionCall.op_inputs order). Row 1 has no visible key."""
    memory_rows = 2 if index else batch
    query = torch.randn(batch, steps, attn_dim, dtype=dtype)
    keys = torch.randn(memory_rows, src_len, attn_dim, dtype=dtype)
    value = torch.randn(memory_rows, src_len, value_dim, dtype=dtype)
    v = torch.randn(attn_dim, dtype=dtype)
    extra_term = torch.randn(batch, src_len, attn_dim, dtype=dtype) if extra else None
    row_index = torch.tensor([1, 0, 1]) if index else None
    # Query row 1 sees no key: through key_lengths when given (with the beam index, it reads memory row 0), and
    # through the mask's own row when a mask is given.
    key_lengths = (torch.tensor([0, src_len]) if index else torch.tensor([src_len, 0, 3])) if lengths else None
    padding = None
    if mask == "rows":
        padding = torch.rand(memory_rows, src_len) < 0.3
        padding[0 if index else 1] = True
    elif mask == "steps":
        padding = torch.rand(batch, steps, src_len) < 0.3
        padding[1] = True
    return query, keys, value, v, extra_term, key_lengths, padding, row_index, causal


CASES = {
    "lengths": {},
    "row mask": {"mask": "rows", "lengths": False},
    "step mask, causal": {"mask": "steps", "causal": True},
    "beam index, extra key term": {"index": True, "extra": True, "mask": "rows"},
}


def forward_op(name):
    """The backend's forward op with its own options filled in (default tanh form, default block size), or a
    skip when its backend cannot load here (the "cpu" backend needs numba)."""
    if name == "cpu_forward":
        pytest.importorskip("numba")
        import attn_fast.backends.cpu_backend  # noqa: F401  (registers the op)

        return lambda *inputs: torch.ops.attn_fast.cpu_forward(*inputs, "auto")
    if name == "triton_forward":  # on CPU under the Triton interpreter (tests/conftest.py)
        pytest.importorskip("attn_fast.backends.triton_backend")
        return lambda *inputs: torch.ops.attn_fast.triton_forward(*inputs, True)  # keep_probs
    return lambda *inputs: torch.ops.attn_fast.torch_forward(*inputs, "auto", 1 << 20)


@pytest.mark.parametrize("op_name", ["torch_forward", "cpu_forward", "triton_forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_the_decomposition_is_the_ops_math(case, dtype, op_name, triton_device):
    """Each forward op against its decomposition, context and P, masks and beam index included."""
    if op_name == "triton_forward" and (dtype == torch.float64 or triton_device.type != "cpu"):
        pytest.skip("the Triton op never takes float64 (the backend casts it to fp32 first); CPU inputs here")
    op = forward_op(op_name)
    assert getattr(torch.ops.attn_fast, op_name).default in decompositions()
    inputs = op_inputs(dtype, **CASES[case])
    expected_context, expected_probs = exact_attention(*inputs)
    assert expected_context.dtype == dtype and expected_probs.dtype == (torch.float64 if dtype == torch.float64
                                                                        else torch.float32)
    assert torch.all(expected_probs[1] == 0) and torch.all(expected_context[1] == 0)  # no visible key: zeros
    context, probs = op(*inputs)
    # Both sides compute in the same compute dtype from the same (rounded) inputs.
    tolerance = forward_tolerance(torch.float64 if dtype == torch.float64 else torch.float32)
    assert relative_error(probs, expected_probs) <= tolerance
    assert relative_error(context.to(expected_probs.dtype), expected_context.to(expected_probs.dtype)) <= max(
        tolerance, forward_tolerance(dtype))


class Attend(nn.Module):
    """The layer over all decoder steps, with every mask it takes."""

    def __init__(self, backend):
        super().__init__()
        self.attention = attn_fast.AdditiveAttention(6, 5, 8, backend=backend)

    def forward(self, query, key, key_lengths, key_padding_mask):
        return self.attention(query, key, key_lengths=key_lengths, key_padding_mask=key_padding_mask, causal=True,
                              need_weights=True)


@needs_onnx
def test_onnx_of_the_layer_with_masks_runs_in_onnxruntime():
    model = Attend("torch").eval()
    inputs = (torch.randn(3, 4, 6), torch.randn(3, 7, 5), torch.tensor([7, 0, 3]), torch.rand(3, 4, 7) < 0.2)
    exported = torch.export.export(model, inputs)
    assert attn_fast_ops(exported.graph_module) == ["attn_fast.torch_forward.default"]  # eager export keeps the op
    decomposed = decompose(exported)
    assert foreign_ops(decomposed.graph_module) == []
    onnx_program = torch.onnx.export(decomposed, inputs, dynamo=True)
    context, weights = run_onnx(onnx_program, inputs)
    with torch.no_grad():
        expected_context, expected_weights = model(*inputs)
    assert relative_error(context, expected_context) <= forward_tolerance(torch.float32)
    assert relative_error(weights, expected_weights) <= forward_tolerance(torch.float32)
    assert torch.all(weights[1] == 0) and torch.all(context[1] == 0)  # no visible key: zeros, not NaN


class DecoderStep(nn.Module):
    """One step of the Seq2Seq Bahdanau decoder, with its memory as plain tensors (an exported graph's inputs)."""

    def __init__(self, model: Seq2Seq):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, prev_tokens, hidden, key_proj, value, src_lengths):
        memory = AttentionMemory(key_proj, value, key_lengths=src_lengths)
        return self.decoder.step(prev_tokens, hidden, memory, need_weights=True)


@needs_onnx
@pytest.mark.slow  # two exports with dynamic shapes: ~20 s on 2 cores
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_onnx_of_the_seq2seq_decoder_step_with_dynamic_shapes(backend):
    model = Seq2Seq(20, 30, embed_dim=8, hidden_dim=12, attn_dim=10, attention_backend=backend).eval()
    step = DecoderStep(model)

    @torch.no_grad()
    def step_inputs(batch, src_len, lengths):
        src = torch.randint(3, 20, (batch, src_len))
        src_lengths = torch.tensor(lengths)
        encoder_states, hidden = model.encode(src, src_lengths)
        memory = model.decoder.precompute(encoder_states, src_lengths)
        return (torch.randint(3, 30, (batch,)), hidden, memory.key_proj, memory.value, src_lengths)

    with torch.no_grad():
        inputs = step_inputs(3, 7, [7, 2, 5])
        batch, src_len = torch.export.Dim("batch"), torch.export.Dim("src_len")
        dynamic = ({0: batch}, {0: batch}, {0: batch, 1: src_len}, {0: batch, 1: src_len}, {0: batch})
        onnx_program = export_onnx(step, inputs, dynamic_shapes=dynamic)
    assert not any(node.domain not in ("", "ai.onnx") for node in onnx_program.model_proto.graph.node)
    for shape in ((3, 7, [7, 2, 5]), (5, 11, [11, 1, 4, 9, 11])):  # other batch and source sizes than exported
        inputs = step_inputs(*shape)
        with torch.no_grad():
            expected = step(*inputs)
        for got, want in zip(run_onnx(onnx_program, inputs), expected):
            assert relative_error(got, want) <= forward_tolerance(torch.float32)


class LocationStep(nn.Module):
    """A beam-search step of the location-sensitive layer: extra key term, index, key lengths."""

    def __init__(self):
        super().__init__()
        self.attention = attn_fast.LocationSensitiveAttention(6, 5, 8, n_filters=3, kernel_size=5, backend="torch")

    def forward(self, query, key, key_lengths, index, prev_weights, cumulative_weights):
        state = self.attention.precompute(key, key_lengths=key_lengths, index=index)
        state = attn_fast.LocationState(state.memory, prev_weights, cumulative_weights, index)
        context, weights, next_state = self.attention.step(query, state)
        return context, weights, next_state.cumulative_weights


@needs_onnx
def test_onnx_of_a_location_sensitive_beam_step():
    model = LocationStep().eval()
    weights = torch.rand(4, 7).softmax(-1)
    inputs = (torch.randn(4, 6), torch.randn(2, 7, 5), torch.tensor([7, 4]), torch.tensor([0, 0, 1, 1]),
              weights, weights * 3)
    onnx_program = export_onnx(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
    for got, want in zip(run_onnx(onnx_program, inputs), expected):
        assert relative_error(got, want) <= forward_tolerance(torch.float32)


@needs_onnx
@pytest.mark.slow  # an ONNX export: ~10 s on 2 busy cores
def test_plain_torch_onnx_export_after_registering_the_decompositions():
    """register_onnx_decompositions(): torch.onnx.export(model, dynamo=True) of the model itself, no decompose."""
    from attn_fast.export import register_onnx_decompositions

    register_onnx_decompositions()
    register_onnx_decompositions()  # twice is harmless
    model = Attend("torch").eval()
    inputs = (torch.randn(2, 3, 6), torch.randn(2, 5, 5), torch.tensor([5, 2]), torch.rand(2, 3, 5) < 0.2)
    onnx_program = torch.onnx.export(model, inputs, dynamo=True)
    assert {node.op_type for node in onnx_program.model_proto.graph.node} >= {"Tanh", "Exp"}
    with torch.no_grad():
        expected = model(*inputs)
    for got, want in zip(run_onnx(onnx_program, inputs), expected):
        assert relative_error(got, want) <= forward_tolerance(torch.float32)
