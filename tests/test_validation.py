"""Every malformed call fails with a ValueError/TypeError naming the argument and what was expected."""
import numpy as np
import pytest
import torch

from attn_fast import additive_attention
from attn_fast.tools.testing import random_case
from attn_fast.validation import BACKENDS


@pytest.fixture
def inputs():
    case = random_case(2, 3, 4, 5, 6, seed=0)
    return dict(query_proj=case.query_proj, key_proj=case.key_proj, value=case.value, v=case.v)


def call(inputs, **changes):
    arguments = inputs | changes
    positional = [arguments.pop(name) for name in ("query_proj", "key_proj", "value", "v")]
    return additive_attention(*positional, **arguments)


@pytest.mark.parametrize("name, bad, expected", [
    ("query_proj", torch.zeros(2, 3), r"query_proj must be \[B, T, A\] \(3-D\), got shape \(2, 3\)"),
    ("key_proj", torch.zeros(2, 4, 5, 1), r"key_proj must be \[B, S, A\] \(3-D\)"),
    ("value", torch.zeros(2, 4), r"value must be \[B, S, D\] \(3-D\)"),
    ("v", torch.zeros(5, 1), r"v must be \[A\] \(1-D\)"),
])
def test_wrong_rank(inputs, name, bad, expected):
    with pytest.raises(ValueError, match=expected):
        call(inputs, **{name: bad})


@pytest.mark.parametrize("name, bad, expected", [
    ("key_proj", torch.zeros(3, 4, 5), r"query_proj has batch 2 but key_proj has batch 3"),
    ("value", torch.zeros(3, 4, 6), r"value must be \[B, S, D\] with B = 2, S = 4"),
    ("value", torch.zeros(2, 7, 6), r"value must be \[B, S, D\] with B = 2, S = 4"),
    ("key_proj", torch.zeros(2, 4, 9), r"key_proj must be \[B, S, A\] with A = 5"),
    ("v", torch.zeros(9), r"v must be \[A\] with A = 5"),
    ("query_proj", torch.zeros(2, 3, 0), r"A = 0; A must be at least 1"),
])
def test_mismatched_sizes(inputs, name, bad, expected):
    with pytest.raises(ValueError, match=expected):
        call(inputs, **{name: bad})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("name", ["query_proj", "key_proj", "value", "v"])
def test_non_floating_inputs(inputs, name, dtype):
    with pytest.raises(TypeError, match=rf"{name} must be a floating tensor .* got {dtype}"):
        call(inputs, **{name: inputs[name].to(dtype)})


def test_mixed_dtypes(inputs):
    with pytest.raises(TypeError, match=r"one dtype: query_proj is torch.float32 but value is torch.float64"):
        call(inputs, value=inputs["value"].double())


def test_not_a_tensor(inputs):
    with pytest.raises(TypeError, match=r"key_proj must be a torch.Tensor, got list"):
        call(inputs, key_proj=[[1.0]])


def test_mixed_devices(inputs):
    with pytest.raises(ValueError, match=r"one device: query_proj is on cpu but v is on meta"):
        call(inputs, v=inputs["v"].to("meta"))


@pytest.mark.parametrize("bad, error, expected", [
    (torch.tensor([1, 2, 3]), ValueError, r"key_lengths must be \[B\] = \[2\], got shape \(3,\)"),
    (torch.tensor([[1, 2]]), ValueError, r"key_lengths must be \[B\] = \[2\]"),
    (torch.tensor([1.0, 2.0]), TypeError, r"key_lengths must have an integer dtype"),
    (torch.tensor([True, False]), TypeError, r"key_lengths must have an integer dtype"),
    (torch.tensor([-1, 2]), ValueError, r"key_lengths values must lie in \[0, S\] = \[0, 4\], got min -1"),
    (torch.tensor([1, 5]), ValueError, r"key_lengths values must lie in \[0, S\] = \[0, 4\], got min 1, max 5"),
    ([1, 2], TypeError, r"key_lengths must be a torch.Tensor"),
])
def test_bad_key_lengths(inputs, bad, error, expected):
    with pytest.raises(error, match=expected):
        call(inputs, key_lengths=bad)


@pytest.mark.parametrize("bad, error, expected", [
    (torch.zeros(2, 4, dtype=torch.int64), TypeError, r"key_padding_mask must be a bool tensor"),
    (torch.zeros(2, 4), TypeError, r"key_padding_mask must be a bool tensor"),
    (torch.zeros(2, 5, dtype=torch.bool), ValueError,
     r"key_padding_mask must be \[B, S\] = \[2, 4\] or \[B, T, S\] = \[2, 3, 4\], got shape \(2, 5\)"),
    (torch.zeros(2, 2, 4, dtype=torch.bool), ValueError, r"key_padding_mask must be \[B, S\] = \[2, 4\]"),
    (torch.zeros(4, dtype=torch.bool), ValueError, r"key_padding_mask must be \[B, S\]"),
])
def test_bad_key_padding_mask(inputs, bad, error, expected):
    with pytest.raises(error, match=expected):
        call(inputs, key_padding_mask=bad)


@pytest.mark.parametrize("bad, error, expected", [
    (torch.tensor([0, 1, 1]), ValueError, r"index must be \[B_q\] = \[2\]"),
    (torch.tensor([0.0, 1.0]), TypeError, r"index must have an integer dtype"),
    (torch.tensor([0, 2]), ValueError, r"index values must lie in \[0, 2\)"),
    (torch.tensor([-1, 0]), ValueError, r"index values must lie in \[0, 2\)"),
])
def test_bad_index(inputs, bad, error, expected):
    with pytest.raises(error, match=expected):
        call(inputs, index=bad)


def test_bad_extra_key_term(inputs):
    with pytest.raises(ValueError, match=r"extra_key_term must be \[B_q, S, A\] = \[2, 4, 5\], got shape \(2, 4, 6\)"):
        call(inputs, extra_key_term=torch.zeros(2, 4, 6))


@pytest.mark.parametrize("bad, error, expected", [
    (torch.ones(66, dtype=torch.float64), TypeError, r"score_weights must be float32 \[66\].*got torch.float64"),
    (torch.ones(64), ValueError, r"score_weights must be \[cdiv\(A, 64\) \* 64 \+ 2\] = \[66\] for A = 5.*\(64,\)"),
    (torch.ones(1, 66), ValueError, r"score_weights must be .* = \[66\] for A = 5.*\(1, 66\)"),
    (torch.ones(66, device="meta"), ValueError, r"query_proj is on cpu but score_weights is on meta"),
    ([1.0] * 66, TypeError, r"score_weights must be a torch.Tensor, got list"),
])
def test_bad_score_weights(inputs, bad, error, expected):
    """Checked by metadata only, at every call that passes them (decode steps: `additive_attention_on_memory`)."""
    from attn_fast.functional import additive_attention_on_memory

    with pytest.raises(error, match=expected):
        additive_attention_on_memory(*inputs.values(), score_weights=bad, backend="torch")


@pytest.mark.parametrize("bad, shown", [
    (1, "int"), (np.bool_(True), "numpy.bool"), (torch.tensor(True), "torch.Tensor"),
])
@pytest.mark.parametrize("name", ["causal", "need_weights"])
def test_flags_must_be_bool(inputs, name, bad, shown):
    # A numpy.bool_'s __name__ is "bool" too: the message names its module, never "must be a bool, got bool".
    with pytest.raises(TypeError, match=rf"{name} must be a Python bool \(True or False\), got {shown}"):
        call(inputs, **{name: bad})


@pytest.mark.parametrize("backend", ["cuda", "", None, "Torch"])
def test_unknown_backend(inputs, backend):
    names = ", ".join(map(repr, BACKENDS))
    with pytest.raises(ValueError, match=rf"backend must be one of {names}, got"):
        call(inputs, backend=backend)


def test_triton_backend_on_cpu_without_interpreter(inputs, monkeypatch):
    # triton reads TRITON_INTERPRET when first imported: import it (with the interpreter on) before taking the
    # variable away, or a later Triton test of the same process finds no driver ("0 active drivers").
    pytest.importorskip("attn_fast.kernels.launch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        call(inputs, backend="triton")


def test_empty_batch_and_steps_return_empty_outputs(inputs):
    context, weights = call(inputs, query_proj=inputs["query_proj"][:, :0], need_weights=True)
    assert context.shape == (2, 0, 6) and weights.shape == (2, 0, 4)


def test_empty_source_gives_zeros_not_nan(inputs):
    context, weights = call(inputs, key_proj=inputs["key_proj"][:, :0], value=inputs["value"][:, :0],
                            need_weights=True)
    assert context.shape == (2, 3, 6) and weights.shape == (2, 3, 0)
    assert torch.equal(context, torch.zeros_like(context))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_inputs_are_not_modified(inputs, backend):
    lengths = torch.tensor([4, 0])
    mask = torch.tensor([[False, True, False, False], [False, False, False, True]])
    snapshot = {name: tensor.clone() for name, tensor in inputs.items()}
    call(inputs, key_lengths=lengths, key_padding_mask=mask, causal=True, need_weights=True, backend=backend)
    for name, tensor in inputs.items():
        assert torch.equal(tensor, snapshot[name]), name
    assert torch.equal(lengths, torch.tensor([4, 0]))
    assert torch.equal(mask, torch.tensor([[False, True, False, False], [False, False, False, True]]))


def test_metadata_only_validation_reads_no_value_but_checks_everything_else(inputs, monkeypatch):
    """`check_values=False` (decode steps against a memory checked once): shapes, dtypes and devices are still
    checked, but key_lengths and index values are not read back to the host."""
    from attn_fast.validation import attention_call

    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    lengths, index = torch.tensor([9, 1]), torch.tensor([0, 5])
    score_weights = torch.randn(66)
    call_record = attention_call(*inputs.values(), key_lengths=lengths, index=index, check_values=False,
                                 score_weights=score_weights)
    assert reads == [] and call_record.key_lengths is lengths and call_record.index is index
    assert call_record.score_weights is score_weights
    with pytest.raises(ValueError, match=r"key_lengths must be \[B\] = \[2\]"):
        attention_call(*inputs.values(), key_lengths=torch.tensor([1, 2, 3]), check_values=False)
    with pytest.raises(TypeError, match="all inputs must share one dtype"):
        attention_call(*(t.double() if n == "v" else t for n, t in inputs.items()), check_values=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"key_lengths values must lie in \[0, S\]"):
        attention_call(*inputs.values(), key_lengths=lengths)
