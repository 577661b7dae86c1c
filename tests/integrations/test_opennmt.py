"""swap_attention on the real OpenNMT-py 3.5.1 GlobalAttention(attn_type="mlp"): alone (all target steps at once
and one step, with coverage), inside StdRNNDecoder and InputFeedRNNDecoder (with an mlp copy attention), the
checkpoint round trip, and the attention types it reports instead of swapping.

Every comparison runs the real module and its swapped deep copy on the same random weights and inputs, with padded
rows, and holds outputs and gradients (every parameter and every input) to attn_fast.tolerances.
"""
from __future__ import annotations

import copy
import importlib
import io

import pytest
import torch
from integration_helpers import (
    CPU,
    MODULE_BACKENDS,
    assert_close,
    assert_gradients_close,
    import_opennmt,
    random_coefficients,
    to_cpu,
    without_tf32,
)
from torch import nn

from attn_fast.integrations import swap_attention
from attn_fast.integrations.opennmt import FusedGlobalAttention
from attn_fast.tolerances import forward_tolerance
from tests.backend_cases import backend_device

DTYPES = (torch.float32, torch.float64)
#: The backend of the decoder-level tests (see tests/integrations/test_speechbrain.py: DECODER_BACKEND).
DECODER_BACKEND = "torch"
B, S, T, DIM, VOCAB = 4, 9, 5, 8, 11
#: One full row, padded rows, and a length above S (OpenNMT-py then sees every key).
SRC_LEN = (9, 4, 12, 1)


@pytest.fixture(scope="module")
def onmt():
    global_attention, decoder = import_opennmt()
    return {"global_attention": global_attention, "decoder": decoder,
            "embeddings": importlib.import_module("onmt.modules.embeddings")}


def swapped_copy(module: nn.Module, backend: str) -> nn.Module:
    holder = nn.ModuleDict({"attn": copy.deepcopy(module)})
    report = swap_attention(holder, backend=backend, strict=True)
    assert [(entry.path, entry.replacement) for entry in report.swapped] == [("attn", "FusedGlobalAttention")]
    return holder["attn"]


def loss_of(*outputs: torch.Tensor) -> torch.Tensor:
    return sum((output * random_coefficients(output.shape, output.dtype, seed)).sum()
               for seed, output in enumerate(outputs))


def check_global_attention(original: nn.Module, replaced: nn.Module, dtype: torch.dtype, device: torch.device, *,
                           one_step: bool, batch: int = B, src_len: int = S, tgt_len: int = T,
                           lengths=SRC_LEN) -> None:
    """attn_h and align_vectors, then the gradients of every parameter, of the queries and of enc_out: the
    original on the CPU, the replacement on `device` (the inputs are CPU leaves, moved there differentiably)."""
    src = torch.randn(*((batch, DIM) if one_step else (batch, tgt_len, DIM)), dtype=dtype, requires_grad=True)
    enc_out = torch.randn(batch, src_len, DIM, dtype=dtype, requires_grad=True)
    lengths = torch.tensor(lengths)
    results = {}
    for name, module, where in (("original", original, CPU), ("replaced", replaced, device)):
        attn_h, align = to_cpu(module(src.to(where), enc_out.to(where), src_len=lengths.to(where)))
        named = {**dict(module.named_parameters()), "src": src, "enc_out": enc_out}
        grads = dict(zip(named, to_cpu(torch.autograd.grad(loss_of(attn_h, align), list(named.values())))))
        results[name] = attn_h, align, grads
    (attn_h, align, grads), (ref_attn_h, ref_align, ref_grads) = results["replaced"], results["original"]
    assert attn_h.shape == ref_attn_h.shape and align.shape == ref_align.shape
    assert attn_h.dtype == align.dtype == dtype
    assert_close(attn_h, ref_attn_h, forward_tolerance(dtype), "attn_h")
    assert_close(align, ref_align, forward_tolerance(dtype), "align_vectors")
    assert_gradients_close(grads, ref_grads, dtype)


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("one_step", (False, True), ids=("all_steps", "one_step"))
def test_global_attention_matches_opennmt(onmt, one_step, dtype, backend, triton_device):
    """attn_h and align_vectors, then the gradients of every parameter, of the queries and of enc_out."""
    device = backend_device(backend, triton_device)
    original = onmt["global_attention"].GlobalAttention(DIM, attn_type="mlp").to(dtype)
    replaced = swapped_copy(original, backend)
    assert replaced.backend == backend and replaced.attn_type == "mlp" and replaced.dim == DIM
    check_global_attention(original, replaced, dtype, device, one_step=one_step)


@pytest.mark.parametrize("one_step", (False, True), ids=("all_steps", "one_step"))
def test_global_attention_matches_opennmt_on_triton(onmt, one_step, triton_device):
    """The same on the Triton kernels (float32 only: they compute float64 in fp32), on a small case for the
    interpreter: 2 rows (one padded, one with a length above the number of keys), 7 keys, 3 target steps."""
    device = backend_device("triton", triton_device)
    original = onmt["global_attention"].GlobalAttention(DIM, attn_type="mlp")
    replaced = swapped_copy(original, "triton").to(device)
    assert replaced.backend == "triton"
    with without_tf32():
        check_global_attention(original, replaced, torch.float32, device, one_step=one_step, batch=2, src_len=7,
                               tgt_len=3, lengths=(3, 9))


def test_without_lengths_every_key_is_seen(onmt):
    original = onmt["global_attention"].GlobalAttention(DIM, attn_type="mlp").double()
    replaced = swapped_copy(original, "torch")
    src, enc_out = torch.randn(B, T, DIM, dtype=torch.float64), torch.randn(B, S, DIM, dtype=torch.float64)
    for actual, expected, what in zip(replaced(src, enc_out), original(src, enc_out), ("attn_h", "align")):
        assert_close(actual, expected, forward_tolerance(torch.float64), what)


def test_a_row_without_keys_gets_zeros_where_opennmt_gets_nan(onmt):
    original = onmt["global_attention"].GlobalAttention(DIM, attn_type="mlp").double()
    replaced = swapped_copy(original, "torch")
    src, enc_out = torch.randn(B, T, DIM, dtype=torch.float64), torch.randn(B, S, DIM, dtype=torch.float64)
    src_len = torch.tensor([9, 0, 5, 2])
    attn_h, align = replaced(src, enc_out, src_len)
    ref_attn_h, ref_align = original(src, enc_out, src_len)
    assert torch.isnan(ref_align[1]).all() and torch.isnan(ref_attn_h[1]).all()
    assert torch.equal(align[1], torch.zeros(T, S, dtype=torch.float64))
    # context 0: attn_h = linear_out([0; q])
    expected_row = replaced.linear_out(torch.cat([torch.zeros(T, DIM, dtype=torch.float64), src[1]], 1))
    assert_close(attn_h[1], expected_row, 1e-15, "attn_h of the row without keys")
    keep = torch.tensor([0, 2, 3])
    assert_close(align[keep], ref_align[keep], forward_tolerance(torch.float64), "align of the other rows")
    assert_close(attn_h[keep], ref_attn_h[keep], forward_tolerance(torch.float64), "attn_h of the other rows")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coverage_matches_opennmt(onmt, dtype):
    """With coverage, OpenNMT-py adds linear_cover(coverage) into enc_out in place, then takes tanh: the same
    here, the caller's enc_out included."""
    original = onmt["global_attention"].GlobalAttention(DIM, coverage=True, attn_type="mlp").to(dtype)
    replaced = swapped_copy(original, "torch")
    assert [name for name, _ in replaced.named_parameters()] == [name for name, _ in original.named_parameters()]
    src = torch.randn(B, DIM, dtype=dtype, requires_grad=True)
    encoder_states = torch.randn(B, S, DIM, dtype=dtype, requires_grad=True)
    coverage = torch.rand(B, S, dtype=dtype, requires_grad=True)
    results = {}
    for name, module in (("original", original), ("replaced", replaced)):
        enc_out = encoder_states * 1.0  # a fresh non-leaf each time: it is modified in place
        attn_h, align = module(src, enc_out, torch.tensor(SRC_LEN), coverage=coverage)
        named = {**dict(module.named_parameters()), "src": src, "encoder_states": encoder_states,
                 "coverage": coverage}
        grads = dict(zip(named, torch.autograd.grad(loss_of(attn_h, align), list(named.values()))))
        results[name] = attn_h, align, enc_out.detach(), grads
    for index, what in enumerate(("attn_h", "align_vectors", "enc_out modified in place")):
        assert_close(results["replaced"][index], results["original"][index], forward_tolerance(dtype), what)
    assert_gradients_close(results["replaced"][3], results["original"][3], dtype)


def make_decoder(onmt, kind: str, dtype: torch.dtype, *, attn_type: str = "mlp") -> nn.Module:
    """An OpenNMT-py RNN decoder with its own embeddings, random weights; the input-feed one with an mlp copy
    attention too (a second GlobalAttention)."""
    embeddings = onmt["embeddings"].Embeddings(word_vec_size=6, word_vocab_size=VOCAB, word_padding_idx=1)
    # OpenNMT-py's Embeddings leave their table as torch.empty found it (its model builder initializes it later).
    nn.init.normal_(embeddings.make_embedding.emb_luts[0].weight)
    decoders = onmt["decoder"]
    if kind == "std":
        decoder = decoders.StdRNNDecoder("LSTM", False, 2, DIM, attn_type=attn_type, embeddings=embeddings)
    else:
        decoder = decoders.InputFeedRNNDecoder("GRU", False, 2, DIM, attn_type=attn_type, copy_attn=True,
                                               copy_attn_type="mlp", embeddings=embeddings)
    return decoder.to(dtype)


def run_decoder(decoder: nn.Module, kind: str, tgt, enc_out, src_len, hidden):
    """OpenNMT-py's protocol: init_state from the encoder's final state, then forward over the target."""
    decoder.init_state(None, enc_out, hidden if kind == "std" else hidden[0])
    return decoder(tgt, enc_out, src_len=src_len)


@pytest.mark.parametrize("kind,dtype", [("std", torch.float64), ("input_feed", torch.float32),
                                        ("input_feed", torch.float64)], ids=str)
def test_rnn_decoders_match(onmt, kind, dtype):
    """OpenNMT-py's own decoders, every attention swapped (input feed: the std and the copy attention): outputs,
    every attention distribution and the gradients of every parameter and of the encoder states."""
    original = make_decoder(onmt, kind, dtype)
    swapped = copy.deepcopy(original)
    report = swap_attention(swapped, backend=DECODER_BACKEND, strict=True)
    expected_paths = ["attn"] if kind == "std" else ["attn", "copy_attn"]
    assert [entry.path for entry in report.swapped] == expected_paths
    tgt = torch.randint(2, VOCAB, (B, T, 1))
    enc_out = torch.randn(B, S, DIM, dtype=dtype, requires_grad=True)
    hidden = tuple(torch.randn(2, B, DIM, dtype=dtype) for _ in range(2))
    results = {}
    for name, model in (("original", original), ("swapped", swapped)):
        outputs, attns = run_decoder(model, kind, tgt, enc_out, torch.tensor(SRC_LEN), hidden)
        named = {**dict(model.named_parameters()), "enc_out": enc_out}
        loss = loss_of(outputs, *attns.values())
        grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))
        results[name] = outputs, attns, grads
    # The copy attention's attn_h is thrown away by the input-feed decoder: its linear_out gets no gradient, in
    # either model; every other parameter does.
    unused = {key for key, value in results["original"][2].items() if value is None}
    assert unused == {key for key, value in results["swapped"][2].items() if value is None}
    assert unused == ({"copy_attn.linear_out.weight", "copy_attn.linear_out.bias"} if kind == "input_feed" else set())
    for _, _, grads in results.values():
        for key in unused:
            del grads[key]
    assert_close(results["swapped"][0], results["original"][0], forward_tolerance(dtype), "decoder outputs")
    assert results["swapped"][1].keys() == results["original"][1].keys()
    for key, expected in results["original"][1].items():
        assert_close(results["swapped"][1][key], expected, forward_tolerance(dtype), f"attns[{key!r}]")
    assert_gradients_close(results["swapped"][2], results["original"][2], dtype)


def test_checkpoint_round_trip(onmt):
    """An OpenNMT-py checkpoint loads into the swapped decoder, a training step runs there, and what it saves loads
    (strictly, same keys in the same order) into a fresh unswapped decoder, which then computes the same."""
    torch.manual_seed(2)
    checkpoint = io.BytesIO()
    torch.save(make_decoder(onmt, "input_feed", torch.float32).state_dict(), checkpoint)
    swapped = make_decoder(onmt, "input_feed", torch.float32)
    swap_attention(swapped, backend=DECODER_BACKEND, strict=True)
    checkpoint.seek(0)
    swapped.load_state_dict(torch.load(checkpoint), strict=True)
    tgt, enc_out = torch.randint(2, VOCAB, (B, T, 1)), torch.randn(B, S, DIM)
    hidden = (torch.randn(2, B, DIM),)
    optimizer = torch.optim.SGD(swapped.parameters(), lr=0.1)
    outputs, _ = run_decoder(swapped, "input_feed", tgt, enc_out, torch.tensor(SRC_LEN), hidden)
    outputs.square().mean().backward()
    optimizer.step()
    saved = io.BytesIO()
    torch.save(swapped.state_dict(), saved)
    saved.seek(0)
    fresh = make_decoder(onmt, "input_feed", torch.float32)
    state = torch.load(saved)
    assert list(state) == list(fresh.state_dict())
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected, expected_attns = run_decoder(fresh, "input_feed", tgt, enc_out, torch.tensor(SRC_LEN), hidden)
        actual, actual_attns = run_decoder(swapped, "input_feed", tgt, enc_out, torch.tensor(SRC_LEN), hidden)
    assert_close(actual, expected, forward_tolerance(torch.float32), "outputs after the round trip")
    for key in ("std", "copy"):
        assert_close(actual_attns[key], expected_attns[key], forward_tolerance(torch.float32),
                     f"attns[{key!r}] after the round trip")


def test_luong_and_sparsemax_are_reported_not_swapped(onmt):
    """"general" attention with an "mlp" copy attention: the copy attention is swapped, the Luong one reported;
    sparsemax too; strict mode refuses and changes nothing."""
    global_attention = onmt["global_attention"]
    decoder = make_decoder(onmt, "input_feed", torch.float32, attn_type="general")
    model = nn.ModuleDict({"decoder": decoder,
                           "sparse": global_attention.GlobalAttention(DIM, attn_type="mlp", attn_func="sparsemax"),
                           "dot": global_attention.GlobalAttention(DIM, attn_type="dot")})
    with pytest.raises(ValueError, match="cannot be swapped, nothing was changed"):
        swap_attention(model, strict=True)
    assert type(decoder.copy_attn) is global_attention.GlobalAttention
    report = swap_attention(model)
    assert [entry.path for entry in report.swapped] == ["decoder.copy_attn"]
    assert type(decoder.copy_attn) is FusedGlobalAttention
    assert {entry.path: entry.reason for entry in report.skipped} == {
        "decoder.attn": "attn_type='general' is Luong (multiplicative) attention, not additive: nothing to fuse",
        "sparse": "attn_func='sparsemax': the kernels normalize with a softmax only",
        "dot": "attn_type='dot' is Luong (multiplicative) attention, not additive: nothing to fuse",
    }
