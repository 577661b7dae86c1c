"""swap_attention on the real SpeechBrain 1.1.2 modules: ContentBasedAttention and LocationAwareAttention alone
(step by step against cached keys), inside AttentionalRNNDecoder (teacher forcing, greedy and beam search), the
checkpoint round trip, and what the report says about what it cannot swap.

Every comparison runs the real SpeechBrain module and its swapped deep copy on the same random weights and inputs,
with padded rows, and holds outputs and gradients (every parameter and every input) to attn_fast.tolerances.
"""
from __future__ import annotations

import copy
import importlib
import io

import pytest
import torch
from integration_helpers import (
    MODULE_BACKENDS,
    assert_close,
    assert_gradients_close,
    import_speechbrain,
    random_coefficients,
    to_cpu,
    without_tf32,
)
from torch import nn

from attn_fast.integrations import swap_attention
from attn_fast.integrations.speechbrain import FusedContentBasedAttention, FusedLocationAwareAttention
from attn_fast.tolerances import forward_tolerance
from tests.backend_cases import backend_device

DTYPES = (torch.float32, torch.float64)
#: The backend of the decoder-level tests: the CPU backend that "auto" picks compiles its loops on first use, which
#: the tests of that backend pay for; what is tested here is the swap, which passes any backend through.
DECODER_BACKEND = "torch"
B, S, ENC, DEC, ATTN, OUT = 4, 9, 6, 5, 8, 7


@pytest.fixture(scope="module")
def sb():
    attention, rnn, seq2seq = import_speechbrain()
    return {"attention": attention, "RNN": rnn, "seq2seq": seq2seq}


def make_attention(sb, kind: str, dtype: torch.dtype) -> nn.Module:
    """A SpeechBrain attention module with random weights (PyTorch's default init: nothing is zero)."""
    common = dict(enc_dim=ENC, dec_dim=DEC, attn_dim=ATTN, output_dim=OUT, scaling=1.5)
    if kind == "content":
        return sb["attention"].ContentBasedAttention(**common).to(dtype)
    return sb["attention"].LocationAwareAttention(conv_channels=3, kernel_size=2, **common).to(dtype)


def swapped_copy(module: nn.Module, backend: str = "torch") -> nn.Module:
    """A deep copy of `module` with its attention swapped (held in a container: the root cannot be replaced)."""
    holder = nn.ModuleDict({"attn": copy.deepcopy(module)})
    report = swap_attention(holder, backend=backend, strict=True)
    assert [entry.path for entry in report.swapped] == ["attn"]
    return holder["attn"]


def run_steps(attention: nn.Module, enc_states, enc_len, queries):
    """SpeechBrain's protocol: reset(), then one call per decoder step against the same encoder states."""
    attention.reset()
    return [attention(enc_states, enc_len, query) for query in queries]


def loss_of(steps) -> torch.Tensor:
    """A scalar through every context and every weight of every step."""
    loss = 0
    for number, (context, weights) in enumerate(steps):
        loss = loss + (context * random_coefficients(context.shape, context.dtype, 2 * number)).sum()
        loss = loss + (weights * random_coefficients(weights.shape, weights.dtype, 2 * number + 1)).sum()
    return loss


def gradients(module: nn.Module, steps, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    named = {**dict(module.named_parameters()), **inputs}
    values = torch.autograd.grad(loss_of(steps), list(named.values()), allow_unused=True)
    return dict(zip(named, values))


def inputs_for(dtype: torch.dtype, steps: int = 5, enc_len=(9, 4, 6.4, 1), src_len: int = S):
    """Encoder states, lengths (one full row, padded rows, a fractional length: SpeechBrain sees ceil of it) and
    one decoder state per step, all leaves with gradients."""
    enc_states = torch.randn(len(enc_len), src_len, ENC, dtype=dtype, requires_grad=True)
    queries = [torch.randn(len(enc_len), DEC, dtype=dtype, requires_grad=True) for _ in range(steps)]
    return enc_states, torch.tensor(enc_len, dtype=dtype), queries


def check_steps(original: nn.Module, replaced: nn.Module, dtype: torch.dtype, device: torch.device, **inputs):
    """Every step's context and weights, then the gradients of every parameter and input, as SpeechBrain's: the
    original on the CPU, the replacement on `device` (the inputs are CPU leaves, moved there differentiably)."""
    enc_states, enc_len, queries = inputs_for(dtype, **inputs)
    expected = run_steps(original, enc_states, enc_len, queries)
    actual = to_cpu(run_steps(replaced, enc_states.to(device), enc_len.to(device),
                              [query.to(device) for query in queries]))
    for step, ((context, weights), (ref_context, ref_weights)) in enumerate(zip(actual, expected)):
        assert_close(context, ref_context, forward_tolerance(dtype), f"context of step {step}")
        assert_close(weights, ref_weights, forward_tolerance(dtype), f"weights of step {step}")
        assert weights.dtype == ref_weights.dtype == dtype and context.dtype == dtype
    named_inputs = {"enc_states": enc_states, **{f"query {step}": query for step, query in enumerate(queries)}}
    assert_gradients_close(to_cpu(gradients(replaced, actual, named_inputs)),
                           gradients(original, expected, named_inputs), dtype)


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ("content", "location"))
def test_steps_match_speechbrain(sb, kind, dtype, backend, triton_device):
    """Every step's context and weights, then the gradients of every parameter and input, as SpeechBrain's."""
    device = backend_device(backend, triton_device)
    original = make_attention(sb, kind, dtype)
    replaced = swapped_copy(original, backend)
    assert type(replaced) is (FusedContentBasedAttention if kind == "content" else FusedLocationAwareAttention)
    assert replaced.backend == backend
    check_steps(original, replaced, dtype, device)


@pytest.mark.parametrize("kind", ("content", "location"))
def test_steps_match_speechbrain_on_triton(sb, kind, triton_device):
    """The same on the Triton kernels (float32 only: they compute float64 in fp32), on a small case for the
    interpreter: 2 rows (one padded, with a fractional length), 7 keys, 3 steps."""
    device = backend_device("triton", triton_device)
    original = make_attention(sb, kind, torch.float32)
    replaced = swapped_copy(original, "triton").to(device)
    assert replaced.backend == "triton"
    with without_tf32():
        check_steps(original, replaced, torch.float32, device, steps=3, enc_len=(7, 3.5), src_len=7)


@pytest.mark.parametrize("kind", ("content", "location"))
def test_cached_keys_and_state_as_speechbrain(sb, kind):
    """The first call after reset() projects the keys once; later calls reuse them whatever encoder states they
    pass (SpeechBrain averages the new values with the cached keys), and reset() forgets them."""
    original = make_attention(sb, kind, torch.float64)
    replaced = swapped_copy(original)
    enc_states, enc_len, queries = inputs_for(torch.float64, steps=3)
    other_states = torch.randn_like(enc_states)
    for module in (original, replaced):
        module.reset()
        assert module.precomputed_enc_h is None and module.mask is None
        module(enc_states, enc_len, queries[0])
    assert_close(replaced.precomputed_enc_h, original.precomputed_enc_h, 1e-15, "precomputed_enc_h")
    assert torch.equal(replaced.mask, original.mask) and replaced.mask.dtype == original.mask.dtype
    if kind == "location":
        assert not replaced.prev_attn.requires_grad
        assert_close(replaced.prev_attn, original.prev_attn, forward_tolerance(torch.float64), "prev_attn")
    cached = replaced.precomputed_enc_h
    context, weights = replaced(other_states, enc_len, queries[1])
    ref_context, ref_weights = original(other_states, enc_len, queries[1])
    assert replaced.precomputed_enc_h is cached
    assert_close(context, ref_context, forward_tolerance(torch.float64), "context with new values, cached keys")
    assert_close(weights, ref_weights, forward_tolerance(torch.float64), "weights with new values, cached keys")
    replaced.reset()
    assert replaced.precomputed_enc_h is None and replaced.checked_memory is None


@pytest.mark.parametrize("kind", ("content", "location"))
def test_a_row_without_keys_gets_zeros_where_speechbrain_gets_nan(sb, kind):
    """enc_len 0: SpeechBrain's softmax over -inf only is NaN (and, with location, feeds NaN to that row's next
    step); ours gives weights 0 and context mlp_out(0) = mlp_out.bias. The other rows are unaffected."""
    original = make_attention(sb, kind, torch.float64)
    replaced = swapped_copy(original)
    enc_states, enc_len, queries = inputs_for(torch.float64, steps=3, enc_len=(9, 0, 5, 2))
    expected = run_steps(original, enc_states, enc_len, queries)
    actual = run_steps(replaced, enc_states, enc_len, queries)
    keep = torch.tensor([0, 2, 3])
    for (context, weights), (ref_context, ref_weights) in zip(actual, expected):
        assert torch.isnan(ref_weights[1]).all() and torch.isnan(ref_context[1]).all()
        assert torch.equal(weights[1], torch.zeros(S, dtype=torch.float64))
        assert_close(context[1], replaced.mlp_out.bias, 1e-15, "context of the row without keys")
        assert_close(weights[keep], ref_weights[keep], forward_tolerance(torch.float64), "weights of other rows")
        assert_close(context[keep], ref_context[keep], forward_tolerance(torch.float64), "context of other rows")


def make_decoder(sb, attn_type: str, rnn_type: str, dtype: torch.dtype) -> nn.Module:
    location = {"channels": 3, "kernel_size": 2} if attn_type == "location" else {}
    decoder = sb["RNN"].AttentionalRNNDecoder(
        rnn_type, attn_type, hidden_size=DEC, attn_dim=ATTN, num_layers=2, enc_dim=ENC, input_size=3,
        scaling=1.3, **location)
    return decoder.to(dtype)


# SpeechBrain's LocationAwareAttention cannot run in a float64 AttentionalRNNDecoder: the decoder passes integer
# lengths, and the first prev_attn (mask * 1 / enc_len.float()) is then float32, which its float64 convolution
# refuses. The float64 location case is covered at module level above, with float64 lengths.
DECODER_CASES = [("content", "gru", torch.float64), ("content", "lstm", torch.float32),
                 ("location", "gru", torch.float32), ("location", "lstm", torch.float32)]


@pytest.mark.parametrize("attn_type,rnn_type,dtype", DECODER_CASES, ids=lambda case: str(case))
def test_attentional_rnn_decoder_matches(sb, attn_type, rnn_type, dtype):
    """SpeechBrain's own decoder, teacher-forced over 6 steps with relative lengths: outputs, weights and the
    gradients of every decoder parameter, of the encoder states and of the decoder inputs."""
    original = make_decoder(sb, attn_type, rnn_type, dtype)
    swapped = copy.deepcopy(original)
    report = swap_attention(swapped, backend=DECODER_BACKEND, strict=True)
    assert [(entry.path, entry.original) for entry in report.swapped] == [
        ("attn", "ContentBasedAttention" if attn_type == "content" else "LocationAwareAttention")]
    enc_states = torch.randn(B, S, ENC, dtype=dtype, requires_grad=True)
    inputs = torch.randn(B, 6, 3, dtype=dtype, requires_grad=True)
    wav_len = torch.tensor([1.0, 0.5, 0.75, 0.3], dtype=dtype)  # relative, as SpeechBrain's data loaders give
    results = {}
    for name, model in (("original", original), ("swapped", swapped)):
        outputs, weights = model(inputs, enc_states, wav_len)
        loss = (outputs * random_coefficients(outputs.shape, dtype, 0)).sum() \
            + (weights * random_coefficients(weights.shape, dtype, 1)).sum()
        named = {**dict(model.named_parameters()), "enc_states": enc_states, "inputs": inputs}
        results[name] = outputs, weights, dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    assert_close(results["swapped"][0], results["original"][0], forward_tolerance(dtype), "decoder outputs")
    assert_close(results["swapped"][1], results["original"][1], forward_tolerance(dtype), "attention weights")
    assert_gradients_close(results["swapped"][2], results["original"][2], dtype)


@pytest.mark.parametrize("attn_type", ("content", "location"))
def test_greedy_and_beam_search_match(sb, attn_type):
    """SpeechBrain's own searchers drive the swapped decoder: reset() through reset_mem, and (location) the beam
    search's reordering of `prev_attn` by assignment. Same hypotheses and scores."""
    seq2seq = sb["seq2seq"]
    vocab = 6
    decoder = make_decoder(sb, attn_type, "gru", torch.float32)
    # SpeechBrain's own Linear: the searchers read its `w` to size their outputs.
    embedding, output = nn.Embedding(vocab, 3), importlib.import_module("speechbrain.nnet.linear").Linear(
        n_neurons=vocab, input_size=DEC)
    enc_states = torch.randn(B, S, ENC)
    wav_len = torch.tensor([1.0, 0.5, 0.75, 0.3])
    searchers = {
        "greedy": lambda dec: seq2seq.S2SRNNGreedySearcher(embedding, dec, output, bos_index=0, eos_index=1,
                                                           min_decode_ratio=0.0, max_decode_ratio=1.0),
        "beam": lambda dec: seq2seq.S2SRNNBeamSearcher(embedding, dec, output, bos_index=0, eos_index=1,
                                                       min_decode_ratio=0.0, max_decode_ratio=1.0, beam_size=3),
    }
    swapped = copy.deepcopy(decoder)
    swap_attention(swapped, backend=DECODER_BACKEND, strict=True)
    for name, build in searchers.items():
        with torch.no_grad():
            expected = build(decoder).eval()(enc_states, wav_len)
            actual = build(swapped).eval()(enc_states, wav_len)
        hyps, ref_hyps = actual[0], expected[0]
        assert [list(map(int, hyp)) for hyp in hyps] == [list(map(int, hyp)) for hyp in ref_hyps], name
        assert_close(actual[2], expected[2], forward_tolerance(torch.float32), f"{name} scores")


def test_checkpoint_round_trip(sb):
    """A SpeechBrain checkpoint loads into the swapped model, a training step runs there, and what the swapped
    model saves loads (strictly) into a fresh unswapped SpeechBrain decoder, which then computes the same."""
    torch.manual_seed(1)
    checkpoint = io.BytesIO()
    torch.save(make_decoder(sb, "location", "lstm", torch.float32).state_dict(), checkpoint)
    swapped = make_decoder(sb, "location", "lstm", torch.float32)
    swap_attention(swapped, backend=DECODER_BACKEND, strict=True)
    checkpoint.seek(0)
    swapped.load_state_dict(torch.load(checkpoint), strict=True)
    optimizer = torch.optim.SGD(swapped.parameters(), lr=0.1)
    enc_states, inputs = torch.randn(B, S, ENC), torch.randn(B, 5, 3)
    wav_len = torch.tensor([1.0, 0.5, 0.75, 0.3])
    outputs, _ = swapped(inputs, enc_states, wav_len)
    outputs.square().mean().backward()
    optimizer.step()  # the saved weights are the trained ones, not the checkpoint's
    saved = io.BytesIO()
    torch.save(swapped.state_dict(), saved)
    saved.seek(0)
    fresh = make_decoder(sb, "location", "lstm", torch.float32)
    state = torch.load(saved)
    assert list(state) == list(fresh.state_dict())  # the same keys, in the same order
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected, expected_weights = fresh(inputs, enc_states, wav_len)
        actual, actual_weights = swapped(inputs, enc_states, wav_len)
    assert_close(actual, expected, forward_tolerance(torch.float32), "outputs after the round trip")
    assert_close(actual_weights, expected_weights, forward_tolerance(torch.float32), "weights after the round trip")


def test_the_swap_keeps_parameters_and_an_existing_optimizer(sb):
    """The replacement holds the original's Parameter objects in the original's order: an optimizer built before
    the swap goes on updating the model."""
    decoder = make_decoder(sb, "location", "gru", torch.float32)
    before = list(decoder.parameters())
    names_before = [name for name, _ in decoder.named_parameters()]
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.5)
    swap_attention(decoder, backend=DECODER_BACKEND, strict=True)
    assert [id(p) for p in decoder.parameters()] == [id(p) for p in before]
    assert [name for name, _ in decoder.named_parameters()] == names_before
    snapshot = decoder.attn.mlp_dec.weight.detach().clone()
    outputs, _ = decoder(torch.randn(B, 3, 3), torch.randn(B, S, ENC), torch.ones(B))
    outputs.sum().backward()
    optimizer.step()
    assert not torch.equal(decoder.attn.mlp_dec.weight, snapshot)


@pytest.mark.parametrize("kind", ("content", "location"))
def test_a_sequence_in_progress_goes_on_after_the_swap(sb, kind):
    original = make_attention(sb, kind, torch.float64)
    holder = nn.ModuleDict({"attn": copy.deepcopy(original)})
    enc_states, enc_len, queries = inputs_for(torch.float64, steps=4)
    for module in (original, holder["attn"]):
        module.reset()
        for query in queries[:2]:
            module(enc_states, enc_len, query)
    swap_attention(holder, backend="torch", strict=True)  # two steps into the sequence
    replaced = holder["attn"]
    assert isinstance(replaced, FusedContentBasedAttention) and replaced.precomputed_enc_h is not None
    for step, query in enumerate(queries[2:]):
        context, weights = replaced(enc_states, enc_len, query)
        ref_context, ref_weights = original(enc_states, enc_len, query)
        assert_close(context, ref_context, forward_tolerance(torch.float64), f"context of step {step + 2}")
        assert_close(weights, ref_weights, forward_tolerance(torch.float64), f"weights of step {step + 2}")


def test_report_strict_and_what_is_left(sb):
    """A subclass (its forward may differ) and an unsupported option are reported, never swapped; strict mode
    then raises and changes nothing; a second swap finds nothing left to do."""
    attention = sb["attention"]

    class SharperAttention(attention.ContentBasedAttention):
        pass

    biased = attention.ContentBasedAttention(ENC, DEC, ATTN, OUT)
    biased.mlp_attn = nn.Linear(ATTN, 1)  # a score bias: not SpeechBrain's structure
    model = nn.ModuleDict({
        "plain": attention.ContentBasedAttention(ENC, DEC, ATTN, OUT),
        "sub": SharperAttention(ENC, DEC, ATTN, OUT),
        "biased": biased,
        "other": nn.Linear(2, 2),
    })
    with pytest.raises(ValueError) as raised:
        swap_attention(model, strict=True)
    assert "sub (SharperAttention)" in str(raised.value) and "biased (ContentBasedAttention)" in str(raised.value)
    assert type(model["plain"]) is attention.ContentBasedAttention  # nothing changed
    report = swap_attention(model)
    assert not report.ok
    assert [(entry.path, entry.replacement) for entry in report.swapped] == [("plain", "FusedContentBasedAttention")]
    assert {entry.path: entry.reason for entry in report.skipped} == {
        "sub": f"{SharperAttention.__module__}.{SharperAttention.__qualname__} subclasses SpeechBrain's "
               f"ContentBasedAttention: its forward may differ, so it is not swapped",
        "biased": "mlp_attn has a bias",
    }
    assert type(model["sub"]) is SharperAttention and type(model["biased"]) is attention.ContentBasedAttention
    text = str(report)
    assert "FusedContentBasedAttention" in text and "mlp_attn has a bias" in text
    again = swap_attention(model)
    assert again.swapped == [] and len(again.skipped) == 2


def test_a_vendored_copy_is_recognized_by_structure(sb):
    """A class of the same name that is not SpeechBrain's (a copy of its code in a user's project) is swapped
    when its structure is SpeechBrain's, and gives the same numbers."""
    attention = sb["attention"]
    methods = {name: value for name, value in vars(attention.LocationAwareAttention).items()
               if name not in ("__dict__", "__weakref__")}
    vendored_class = type("LocationAwareAttention", (nn.Module,), {**methods, "__module__": "my_project.attention"})
    original = make_attention(sb, "location", torch.float64)
    original.__class__ = vendored_class  # SpeechBrain's own code, under another class
    replaced = swapped_copy(original)
    assert type(replaced) is FusedLocationAwareAttention
    enc_states, enc_len, queries = inputs_for(torch.float64, steps=3)
    for (context, _), (ref_context, _) in zip(run_steps(replaced, enc_states, enc_len, queries),
                                              run_steps(original, enc_states, enc_len, queries)):
        assert_close(context, ref_context, forward_tolerance(torch.float64), "context of the vendored copy")


def test_a_float64_location_decoder_runs_after_the_swap(sb):
    """SpeechBrain's own float64 AttentionalRNNDecoder with location attention fails (its first prev_attn is float32
    from the integer lengths the decoder passes); swapped, it runs, and agrees with SpeechBrain's float32 decoder
    on the same weights within the float32 tolerance."""
    decoder32 = make_decoder(sb, "location", "gru", torch.float32)
    decoder64 = copy.deepcopy(decoder32).double()
    enc_states, inputs = torch.randn(B, S, ENC, dtype=torch.float64), torch.randn(B, 6, 3, dtype=torch.float64)
    wav_len = torch.tensor([1.0, 0.5, 0.75, 0.3], dtype=torch.float64)
    with pytest.raises(RuntimeError):
        decoder64(inputs, enc_states, wav_len)
    swap_attention(decoder64, backend=DECODER_BACKEND, strict=True)
    outputs, weights = decoder64(inputs, enc_states, wav_len)
    expected, expected_weights = decoder32(inputs.float(), enc_states.float(), wav_len.float())
    assert outputs.dtype == weights.dtype == torch.float64
    assert_close(outputs, expected, forward_tolerance(torch.float32), "float64 outputs vs float32")
    assert_close(weights, expected_weights, forward_tolerance(torch.float32), "float64 weights vs float32")
