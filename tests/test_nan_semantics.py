"""One NaN/inf rule on every backend (README, "NaN and inf"):

- a key hidden from a row (key_lengths, key_padding_mask, causal) never influences that row: any value, NaN or inf
  included, in key_proj, extra_key_term or value at that key leaves its context, weights and every gradient as
  they were, and the gradients at the hidden key are exactly 0; memory rows no `index` selects, likewise;
- a NaN in what a row sees (its query_proj, its visible keys and values, v) makes that row's outputs NaN, and
  leaves the other rows alone;
- a row with no visible key gets context 0, weights 0 and gradients 0, whatever its hidden keys hold;
- the returned weights are the caller's to edit in place: the backward does not change.

Every case runs on every backend of `attn_fast.validation.BACKENDS` but "auto" (Triton on the GPU, else under the
interpreter: tiny shapes), against the float64 reference of the same inputs with the poison replaced by ordinary
values, with the torch backend's buffers filled with NaN before each run.
"""
import math

import pytest
import torch

from attn_fast import additive_attention
from attn_fast.backends import common
from attn_fast.masking import visible_keys
from attn_fast.tolerances import forward_tolerance, gradient_tolerance, relative_error
from tests.backend_cases import RUN_BACKENDS, backend_device

B, T, S, A, D = 2, 3, 5, 4, 3

# Under the Triton interpreter the fused P @ value multiplies a hidden inf value by P = 0 in numpy, which warns
# before the backend notices the NaN and recomputes that context without the hidden key (what these tests check).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")


@pytest.fixture
def device(request, triton_device):
    return backend_device(request.node.callspec.params["backend"], triton_device)


def fresh_inputs(query_rows: int, memory_rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float64 inputs, never zeros: query_proj [B_q, T, A], key_proj [B_m, S, A], value [B_m, S, D], v [A],
    extra_key_term [B_q, S, A]."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return {"query_proj": normal(query_rows, T, A), "key_proj": normal(memory_rows, S, A),
            "value": normal(memory_rows, S, D), "v": normal(A), "extra_key_term": 0.5 * normal(query_rows, S, A)}


def hiding_case(kind: str):
    """(options, hidden) for one way of hiding keys: `hidden` lists (tensor name, row, key) positions that every
    row reading them has hidden (memory rows for key_proj and value, query rows for extra_key_term); poisoning
    them must change nothing."""
    query_rows = memory_rows = B
    options, hidden = {}, []
    if kind == "key_lengths":  # row 1 has no visible key at all
        options["key_lengths"] = torch.tensor([3, 0])
        hidden = [(name, 0, j) for j in (3, 4) for name in ("key_proj", "value", "extra_key_term")]
        hidden += [(name, 1, j) for j in range(S) for name in ("key_proj", "value", "extra_key_term")]
    elif kind == "padding":
        mask = torch.zeros(B, S, dtype=torch.bool)
        mask[0, 1] = mask[1, 0] = mask[1, 4] = True
        options["key_padding_mask"] = mask
        hidden = [(name, b, j) for b, j in ((0, 1), (1, 0), (1, 4)) for name in ("key_proj", "value", "extra_key_term")]
    elif kind == "padding_per_query":  # key 2 of query row 0 hidden at every step; key 3 of row 1 at steps 0, 1 only
        mask = torch.zeros(B, T, S, dtype=torch.bool)
        mask[0, :, 2] = True
        mask[1, :2, 3] = True
        options["key_padding_mask"] = mask
        hidden = [(name, 0, 2) for name in ("key_proj", "value", "extra_key_term")]
    elif kind == "causal":  # T = 3 < S = 5: keys 3 and 4 are after every step
        options["causal"] = True
        hidden = [(name, b, j) for b in range(B) for j in (3, 4) for name in ("key_proj", "value", "extra_key_term")]
    elif kind == "index":  # memory row 1 is read by no query row; memory row 2 has a key length
        query_rows, memory_rows = 3, 3
        options["index"] = torch.tensor([0, 2, 2])
        options["key_lengths"] = torch.tensor([S, S, 2])
        hidden = [(name, 1, j) for j in range(S) for name in ("key_proj", "value")]
        hidden += [(name, 2, j) for j in range(2, S) for name in ("key_proj", "value")]
        hidden += [("extra_key_term", b, j) for b in (1, 2) for j in range(2, S)]
    else:
        raise AssertionError(kind)
    return query_rows, memory_rows, options, hidden


KINDS = ["key_lengths", "padding", "padding_per_query", "causal", "index"]


def run(backend, device, inputs, options, *, grad_context, grad_weights, dtype=torch.float32):
    """Forward (need_weights) and backward on `backend`: (context, weights, {name: gradient}), float64 on CPU."""
    leaves = {name: tensor.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
              for name, tensor in inputs.items()}
    moved = {name: (value.to(device) if isinstance(value, torch.Tensor) else value) for name, value in options.items()}
    context, weights = additive_attention(
        leaves["query_proj"], leaves["key_proj"], leaves["value"], leaves["v"], extra_key_term=leaves["extra_key_term"],
        need_weights=True, backend=backend, **moved)
    loss = (context.double() * grad_context.to(device)).sum() + (weights.double() * grad_weights.to(device)).sum()
    loss.backward()
    gradients = {name: leaf.grad.detach().double().cpu() for name, leaf in leaves.items()}
    return context.detach().double().cpu(), weights.detach().double().cpu(), gradients


@pytest.mark.parametrize("poison_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_hidden_keys_never_influence_anything(backend, device, kind, poison_value, poison_buffers):
    generator = torch.Generator().manual_seed(KINDS.index(kind))
    query_rows, memory_rows, options, hidden = hiding_case(kind)
    clean = fresh_inputs(query_rows, memory_rows, generator)
    # The same inputs rounded to fp32, so that the float64 reference and the backend see the same numbers.
    clean = {name: tensor.float().double() for name, tensor in clean.items()}
    poisoned = {name: tensor.clone() for name, tensor in clean.items()}
    for name, row, key in hidden:
        poisoned[name][row, key] = poison_value
    grad_context = torch.randn(query_rows, T, D, generator=generator, dtype=torch.float64)
    grad_weights = torch.randn(query_rows, T, S, generator=generator, dtype=torch.float64)

    expected = run("reference", "cpu", clean, options, grad_context=grad_context, grad_weights=grad_weights,
                   dtype=torch.float64)
    context, weights, gradients = run(backend, device, poisoned, options, grad_context=grad_context,
                                      grad_weights=grad_weights)

    assert torch.isfinite(context).all() and torch.isfinite(weights).all()
    assert relative_error(context, expected[0]) <= forward_tolerance(torch.float32)
    assert relative_error(weights, expected[1]) <= forward_tolerance(torch.float32)
    for name, gradient in gradients.items():
        assert torch.isfinite(gradient).all(), name
        assert relative_error(gradient, expected[2][name]) <= gradient_tolerance(torch.float32), name
    for name, row, key in hidden:  # exactly zero, not merely small
        assert torch.equal(gradients[name][row, key], torch.zeros_like(gradients[name][row, key])), (name, row, key)
    visible = visible_keys(query_rows, T, S, index=options.get("index"), key_lengths=options.get("key_lengths"),
                           key_padding_mask=options.get("key_padding_mask"), causal=options.get("causal", False))
    assert torch.equal(weights[~visible], torch.zeros_like(weights[~visible]))


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_row_without_visible_key_is_zero_whatever_it_holds(backend, device, poison_buffers):
    """Row 1 sees no key (key_lengths 0): NaN in its query, keys, values and extra term give context 0, weights 0
    and gradients 0 for all of them; row 0 is computed as usual."""
    generator = torch.Generator().manual_seed(11)
    inputs = {name: tensor.float().double() for name, tensor in fresh_inputs(B, B, generator).items()}
    for name in ("query_proj", "key_proj", "value", "extra_key_term"):
        inputs[name][1] = math.nan
    options = {"key_lengths": torch.tensor([S, 0])}
    grad_context = torch.randn(B, T, D, generator=generator, dtype=torch.float64)
    grad_weights = torch.randn(B, T, S, generator=generator, dtype=torch.float64)
    context, weights, gradients = run(backend, device, inputs, options, grad_context=grad_context,
                                      grad_weights=grad_weights)
    assert torch.equal(context[1], torch.zeros(T, D, dtype=torch.float64))
    assert torch.equal(weights[1], torch.zeros(T, S, dtype=torch.float64))
    for name in ("query_proj", "key_proj", "value", "extra_key_term"):
        assert torch.equal(gradients[name][1], torch.zeros_like(gradients[name][1])), name
    expected = run("reference", "cpu", {name: tensor[:1] if name != "v" else tensor for name, tensor in inputs.items()},
                   {}, grad_context=grad_context[:1], grad_weights=grad_weights[:1], dtype=torch.float64)
    assert relative_error(context[:1], expected[0]) <= forward_tolerance(torch.float32)
    assert relative_error(gradients["v"], expected[2]["v"]) <= gradient_tolerance(torch.float32)


def visible_nan_case(where: str):
    """(name, position to set NaN, rows [(b, i)] that must turn NaN, and the columns of the context that do)."""
    if where == "query_proj":
        return "query_proj", (0, 1, 2), [(0, 1)], slice(None)
    if where == "key_proj":  # key 1 of row 0 is visible to steps 1 and 2 only (causal)
        return "key_proj", (0, 1, 3), [(0, 1), (0, 2)], slice(None)
    if where == "extra_key_term":
        return "extra_key_term", (1, 0, 0), [(1, 0), (1, 1), (1, 2)], slice(None)
    if where == "value":  # only column 2 of the rows that see key 1 of row 0
        return "value", (0, 1, 2), [(0, 1), (0, 2)], slice(2, 3)
    raise AssertionError(where)


def visible_nan_params():
    """(backend, where) pairs. Under the Triton interpreter the kernels clamp the exponent of their tanh with
    tl.minimum / tl.maximum, which drop a NaN there (kernels/tanh.py exp2_fast; on the GPU ex2.approx keeps it): a
    NaN score turns finite. Those cases run on the GPU only; a NaN value goes through no clamp and runs everywhere."""
    for backend in RUN_BACKENDS:
        for where in ("query_proj", "key_proj", "extra_key_term", "value"):
            marks = [pytest.mark.gpu] if backend == "triton" and where != "value" else []
            yield pytest.param(backend, where, marks=marks, id=f"{backend}-{where}")


@pytest.mark.parametrize("backend, where", list(visible_nan_params()))
def test_nan_in_what_a_row_sees_propagates_to_that_row_only(backend, device, where, poison_buffers):
    generator = torch.Generator().manual_seed(3)
    inputs = {name: tensor.float().double() for name, tensor in fresh_inputs(B, B, generator).items()}
    expected = run("reference", "cpu", inputs, {"causal": True}, grad_context=torch.zeros(B, T, D),
                   grad_weights=torch.zeros(B, T, S), dtype=torch.float64)
    name, position, nan_rows, columns = visible_nan_case(where)
    inputs[name][position] = math.nan
    with torch.no_grad():
        context, weights = additive_attention(
            *(inputs[n].float().to(device) for n in ("query_proj", "key_proj", "value", "v")), causal=True,
            extra_key_term=inputs["extra_key_term"].float().to(device), need_weights=True, backend=backend)
    context, weights = context.double().cpu(), weights.double().cpu()
    untouched = torch.ones(B, T, dtype=torch.bool)
    for b, i in nan_rows:
        untouched[b, i] = False
        assert torch.isnan(context[b, i, columns]).all(), (b, i)
        if where != "value":
            assert torch.isnan(weights[b, i, : i + 1]).all(), (b, i)
    if where == "value":  # the weights do not depend on the values, nor the other columns
        other_columns = [d for d in range(D) if d != 2]
        assert relative_error(weights, expected[1]) <= forward_tolerance(torch.float32)
        assert relative_error(context[..., other_columns], expected[0][..., other_columns]) <= forward_tolerance(
            torch.float32)
    assert relative_error(context[untouched], expected[0][untouched]) <= forward_tolerance(torch.float32)
    assert relative_error(weights[untouched], expected[1][untouched]) <= forward_tolerance(torch.float32)


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_nan_in_v_reaches_every_row_with_a_visible_key(backend, device):
    generator = torch.Generator().manual_seed(4)
    inputs = {name: tensor.float() for name, tensor in fresh_inputs(B, B, generator).items()}
    inputs["v"][1] = math.nan
    context, weights = additive_attention(*(inputs[n].to(device) for n in ("query_proj", "key_proj", "value", "v")),
                                          key_lengths=torch.tensor([S, 0], device=device), need_weights=True,
                                          backend=backend)
    assert torch.isnan(context[0].cpu()).all() and torch.isnan(weights[0].cpu()).all()
    assert torch.equal(context[1].cpu(), torch.zeros(T, D)) and torch.equal(weights[1].cpu(), torch.zeros(T, S))


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_returned_weights_are_safe_to_edit_in_place(backend, device):
    """Editing the weights after the forward changes neither the gradients nor anything the backend saved."""
    generator = torch.Generator().manual_seed(5)
    inputs = {name: tensor.float() for name, tensor in fresh_inputs(B, B, generator).items()}
    grad_context = torch.randn(B, T, D, generator=generator)

    def gradients(edit: bool):
        leaves = {name: tensor.to(device, copy=True).requires_grad_(True) for name, tensor in inputs.items()}
        context, weights = additive_attention(
            leaves["query_proj"], leaves["key_proj"], leaves["value"], leaves["v"],
            extra_key_term=leaves["extra_key_term"], key_lengths=torch.tensor([S, 2], device=device),
            need_weights=True, backend=backend)
        loss = (context * grad_context.to(device)).sum() + weights[:, :, 0].sum()
        if edit:
            with torch.no_grad():
                weights.mul_(-3.0).add_(7.0)  # after the loss used them: autograd must not see the edit
        loss.backward()
        return {name: leaf.grad.cpu() for name, leaf in leaves.items()}

    untouched, edited = gradients(False), gradients(True)
    for name in untouched:
        assert torch.equal(untouched[name], edited[name]), name


@pytest.fixture
def poison_buffers(poison):
    """Every uninitialized buffer of the torch backend starts as NaN (conftest `poison`)."""
    return poison(common)
