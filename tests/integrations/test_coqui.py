"""swap_attention on Coqui TTS's OriginalAttention, against the real package (coqui-tts).

Importing `TTS` needs torchaudio (and torchcodec on torch >= 2.9): TTS/__init__.py refuses to load without them,
and PyPI's torchaudio wheel does not load against the CPU build of torch these tests run on (its _torchaudio.so
fails to load). The attention code itself needs neither: TTS/tts/layers/tacotron/{attentions,common_layers,
tacotron2}.py import only torch and scipy. So when the package does not import, `coqui_tacotron_layers` loads those
real files under their real module names with the parent packages' __init__ files skipped. Skipped when coqui-tts
is not installed at all (`pip install --no-deps coqui-tts`: its files are all these tests need).

Every comparison is against Coqui's own module run in float64 on the same (rounded) inputs and weights.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import io
import sys
import types
from pathlib import Path

import pytest
import torch
from integration_helpers import CPU, MODULE_BACKENDS, to_cpu, without_tf32
from torch import nn

from attn_fast.integrations import swap_attention
from attn_fast.integrations.coqui import CoquiOriginalAttention
from attn_fast.tolerances import forward_tolerance, gradient_tolerance, relative_error
from tests.backend_cases import backend_device

QUERY_DIM, EMBEDDING_DIM, ATTN_DIM = 12, 10, 16
PACKAGES = ("TTS", "TTS.tts", "TTS.tts.layers", "TTS.tts.layers.tacotron")


def coqui_tacotron_layers():
    """(attentions, tacotron2) modules of the installed coqui-tts: imported normally when TTS imports, else loaded
    from the package's files without running the parent packages' __init__ (see the module docstring)."""
    try:
        return (importlib.import_module("TTS.tts.layers.tacotron.attentions"),
                importlib.import_module("TTS.tts.layers.tacotron.tacotron2"))
    except (ImportError, OSError, AttributeError):  # no torchaudio, one that fails to load, or a test stand-in
        pass
    spec = importlib.util.find_spec("TTS")
    root = Path(spec.submodule_search_locations[0])
    for name in PACKAGES:
        existing = sys.modules.get(name)
        if existing is None or not hasattr(existing, "__path__"):
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
    return (importlib.import_module("TTS.tts.layers.tacotron.attentions"),
            importlib.import_module("TTS.tts.layers.tacotron.tacotron2"))


if importlib.util.find_spec("TTS") is None:
    pytest.skip("coqui-tts is not installed (pip install --no-deps coqui-tts)", allow_module_level=True)
pytest.importorskip("scipy", reason="Coqui's attentions.py imports scipy")
attentions, tacotron2 = coqui_tacotron_layers()


def original_attention(location_attention=True, *, norm="softmax", windowing=False, forward_attn=False,
                       trans_agent=False):
    """Coqui's OriginalAttention with random weights (v's bias too), at a scale where the tanh is not saturated."""
    module = attentions.OriginalAttention(QUERY_DIM, EMBEDDING_DIM, ATTN_DIM, location_attention, 4, 5, windowing,
                                          norm, forward_attn, trans_agent, False)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.4)
    return module


def run_steps(module, inputs, mask, queries, probes, device=CPU):
    """Coqui's decoder protocol: init_states, preprocess_inputs, then one forward per query row. Returns the
    contexts [B, T, D], the alignments [B, T, S], the final cumulative weights (or None) and the gradients of a
    fixed random projection of the outputs w.r.t. every parameter, the inputs and the queries, all on the CPU.
    The module runs on `device` (the inputs are CPU leaves, moved there differentiably)."""
    inputs = inputs.clone().requires_grad_()
    queries = queries.clone().requires_grad_()
    inputs_there, queries_there = inputs.to(device), queries.to(device)
    mask = None if mask is None else mask.to(device)
    module.init_states(inputs_there)
    processed = module.preprocess_inputs(inputs_there)
    contexts, alignments = [], []
    for step in range(queries.shape[1]):
        contexts.append(module(queries_there[:, step], inputs_there, processed, mask))
        alignments.append(module.attention_weights)
    contexts, alignments = torch.stack(contexts, 1).cpu(), torch.stack(alignments, 1).cpu()
    cumulative = getattr(module, "attention_weights_cum", None) if module.location_attention else None
    loss = (contexts * probes[0]).sum() + (alignments * probes[1]).sum()
    loss.backward()
    grads = {name: to_cpu(parameter.grad) for name, parameter in module.named_parameters()}
    grads["<inputs>"], grads["<queries>"] = inputs.grad, queries.grad
    return contexts.detach(), alignments.detach(), None if cumulative is None else cumulative.detach().cpu(), grads


def in_float64(module):
    """A float64 copy of Coqui's module; its init_states builds the state in the default dtype, hence the switch."""
    return copy.deepcopy(module).double()


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def check_against_coqui(dtype, location_attention, backend, device, *, batch=3, src_len=9, steps=4,
                        lengths=(9, 4, 7)):
    """The swapped copy of a random OriginalAttention (on `device`) against Coqui's own module in float64 (on the
    CPU): contexts, alignments, cumulative weights and the gradients of every parameter and input; padded keys
    get exactly zero weight."""
    original = original_attention(location_attention).to(dtype)
    keys = list(original.state_dict())
    swap_target = nn.ModuleDict({"attention": copy.deepcopy(original)})
    report = swap_attention(swap_target, backend=backend)
    assert [entry.path for entry in report.swapped] == ["attention"] and report.ok
    replacement = swap_target["attention"].to(device)
    assert isinstance(replacement, CoquiOriginalAttention) and list(replacement.state_dict()) == keys
    assert replacement.backend == backend

    inputs = torch.randn(batch, src_len, EMBEDDING_DIM, dtype=dtype)
    queries = torch.randn(batch, steps, QUERY_DIM, dtype=dtype)
    mask = torch.arange(src_len)[None, :] < torch.tensor(lengths)[:, None]  # Coqui: True on valid keys
    probes = (torch.randn(batch, steps, EMBEDDING_DIM, dtype=dtype), torch.randn(batch, steps, src_len, dtype=dtype))

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # Coqui's init_states uses the default dtype
    try:
        expected = run_steps(in_float64(original), inputs.double(), mask, queries.double(),
                             tuple(probe.double() for probe in probes))
    finally:
        torch.set_default_dtype(previous)
    contexts, alignments, cumulative, grads = run_steps(replacement, inputs, mask, queries, probes, device)
    assert contexts.dtype == alignments.dtype == dtype
    assert relative_error(contexts, expected[0]) <= forward_tolerance(dtype)
    assert relative_error(alignments, expected[1]) <= forward_tolerance(dtype)
    if location_attention:
        assert relative_error(cumulative, expected[2]) <= forward_tolerance(dtype)
    # v's bias shifts every energy alike: Coqui's gradient for it is zero up to rounding, ours is absent.
    assert grads.pop("v.linear_layer.bias") is None
    assert float(expected[3].pop("v.linear_layer.bias").abs().max()) < 1e-12
    assert grads.keys() == expected[3].keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected[3][name]) <= gradient_tolerance(dtype), name
    for row, length in enumerate(lengths):
        assert torch.all(alignments[row, :, length:] == 0)


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("location_attention", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_state_and_gradients_match_coqui(dtype, location_attention, backend, triton_device):
    check_against_coqui(dtype, location_attention, backend, backend_device(backend, triton_device))


@pytest.mark.parametrize("location_attention", [True, False])
def test_outputs_state_and_gradients_match_coqui_on_triton(location_attention, triton_device):
    """The same on the Triton kernels (float32 only: they compute float64 in fp32), on a small case for the
    interpreter: 2 utterances (one padded), 7 keys, 3 steps."""
    with without_tf32():
        check_against_coqui(torch.float32, location_attention, "triton", backend_device("triton", triton_device),
                            batch=2, src_len=7, steps=3, lengths=(7, 4))


def test_a_row_without_valid_keys_is_nan_in_coqui_and_zero_here(float64_default):
    original = original_attention().double()
    replacement = CoquiOriginalAttention(copy.deepcopy(original), backend="torch")
    inputs = torch.randn(2, 6, EMBEDDING_DIM)
    queries = torch.randn(2, 3, QUERY_DIM)
    mask = torch.tensor([[True] * 6, [False] * 6])
    probes = (torch.randn(2, 3, EMBEDDING_DIM), torch.randn(2, 3, 6))
    expected = run_steps(original, inputs, mask, queries, probes)
    actual = run_steps(replacement, inputs, mask, queries, probes)
    assert torch.isnan(expected[0][1]).all() and torch.isnan(expected[1][1]).all()
    assert torch.all(actual[0][1] == 0) and torch.all(actual[1][1] == 0)
    assert relative_error(actual[0][0], expected[0][0]) <= forward_tolerance(torch.float64)
    assert relative_error(actual[1][0], expected[1][0]) <= forward_tolerance(torch.float64)


@pytest.mark.parametrize(("options", "reason"), [
    ({"forward_attn": True}, "forward_attn"),
    ({"forward_attn": True, "trans_agent": True}, "forward_attn"),
    ({"windowing": True}, "windowing"),
    ({"norm": "sigmoid"}, "sigmoid"),
])
def test_unsupported_options_are_reported(options, reason):
    model = nn.ModuleDict({"kept": original_attention(**options), "swapped": original_attention()})
    with pytest.raises(ValueError, match="kept"):
        swap_attention(model, strict=True)
    report = swap_attention(model)
    assert [entry.path for entry in report.swapped] == ["swapped"]
    assert [entry.path for entry in report.skipped] == ["kept"] and reason in report.skipped[0].reason
    assert type(model["kept"]) is attentions.OriginalAttention


def test_other_coqui_attentions_are_reported_as_left():
    model = nn.ModuleDict({"graves": attentions.GravesAttention(QUERY_DIM, 5)})
    report = swap_attention(model)
    assert report.swapped == [] and "not additive" in report.skipped[0].reason


def decoder(location_attention=True):
    """Coqui's Tacotron-2 decoder (dropouts off in eval mode, no prenet dropout), randomized."""
    module = tacotron2.Decoder(in_channels=EMBEDDING_DIM, frame_channels=6, r=1, attn_type="original",
                               attn_win=False, attn_norm="softmax", prenet_type="original", prenet_dropout=False,
                               forward_attn=False, trans_agent=False, forward_attn_mask=False,
                               location_attn=location_attention, attn_K=5, separate_stopnet=True,
                               max_decoder_steps=50)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.05)
    return module.eval()


@pytest.mark.slow  # Coqui's decoder has two 1024-unit LSTM cells (hard-coded): ~15 s on 2 busy cores
def test_checkpoint_round_trip_through_coquis_decoder():
    """Coqui checkpoint -> swap -> train a step -> save -> load into a fresh unswapped decoder -> same outputs."""
    checkpoint = io.BytesIO()
    torch.save({"model": decoder().state_dict()}, checkpoint)
    checkpoint.seek(0)
    model = decoder()
    model.load_state_dict(torch.load(checkpoint)["model"])
    reference = copy.deepcopy(model)
    report = swap_attention(model, backend="torch")
    assert [entry.path for entry in report.swapped] == ["attention"]

    inputs = torch.randn(2, 7, EMBEDDING_DIM)
    frames = torch.randn(2, 5, 6)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 5])[:, None]
    with torch.no_grad():
        expected = reference(inputs, frames, mask)
        actual = model(inputs, frames, mask)
    for got, want in zip(actual, expected):  # frames, alignments, stop tokens, through the whole decoder
        assert relative_error(got, want) <= forward_tolerance(torch.float32)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs, alignments, _ = model(inputs, frames, mask)
    (outputs.square().mean() + alignments[:, -1].sum()).backward()
    optimizer.step()
    model.eval()

    saved = io.BytesIO()
    torch.save({"model": model.state_dict()}, saved)
    saved.seek(0)
    fresh = decoder()
    fresh.load_state_dict(torch.load(saved)["model"])
    assert type(fresh.attention) is attentions.OriginalAttention
    with torch.no_grad():
        expected = fresh(inputs, frames, mask)
        actual = model(inputs, frames, mask)
    for got, want in zip(actual, expected):
        assert relative_error(got, want) <= forward_tolerance(torch.float32)


class AttentionStep(nn.Module):
    """One step of a (swapped) OriginalAttention, its state as inputs and outputs."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, query, inputs, mask, attention_weights, attention_weights_cum):
        self.attention.attention_weights = attention_weights
        self.attention.attention_weights_cum = attention_weights_cum.clone()  # forward adds to it in place
        context = self.attention(query, inputs, self.attention.preprocess_inputs(inputs), mask)
        return context, self.attention.attention_weights, self.attention.attention_weights_cum


@pytest.mark.skipif(any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")),
                    reason="needs the export extra: pip install onnx onnxscript onnxruntime")
@pytest.mark.slow  # torch.export + ONNX export: ~20 s on 2 busy cores
def test_onnx_export_of_a_swapped_attention_step():
    import onnxruntime

    from attn_fast.export import export_onnx

    model = nn.ModuleDict({"attention": original_attention()})
    swap_attention(model, backend="torch")
    step = AttentionStep(model["attention"]).eval()
    previous = torch.rand(3, 9).softmax(-1)
    inputs = (torch.randn(3, QUERY_DIM), torch.randn(3, 9, EMBEDDING_DIM),
              torch.arange(9)[None, :] < torch.tensor([9, 0, 5])[:, None], previous, previous * 2)
    with torch.no_grad():
        onnx_program = export_onnx(step, inputs)
        expected = step(*inputs)
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [entry.name for entry in session.get_inputs()]
    outputs = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs)})
    for got, want in zip(outputs, expected):
        assert relative_error(torch.from_numpy(got), want) <= forward_tolerance(torch.float32)
    assert (outputs[0][1] == 0).all() and (outputs[1][1] == 0).all()  # zeros, not NaN, in ONNX Runtime too


def test_a_swap_in_the_middle_of_an_utterance_carries_the_state_on(float64_default):
    original = original_attention()
    inputs = torch.randn(2, 6, EMBEDDING_DIM)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 4])[:, None]
    queries = torch.randn(2, 5, QUERY_DIM)
    with torch.no_grad():
        original.init_states(inputs)
        processed = original.preprocess_inputs(inputs)
        for step in range(2):
            original(queries[:, step], inputs, processed, mask)
        replacement = CoquiOriginalAttention(copy.deepcopy(original), backend="torch")
        for step in range(2, 5):
            expected = original(queries[:, step], inputs, processed, mask)
            actual = replacement(queries[:, step], inputs, processed, mask)
            assert relative_error(actual, expected) <= forward_tolerance(torch.float64)
        assert relative_error(replacement.attention_weights_cum, original.attention_weights_cum) <= forward_tolerance(
            torch.float64)
