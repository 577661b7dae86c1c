"""The Triton backend through the public API (under the interpreter on CPU): forward and gradients against the
float64 reference, the layer on it, and a training step equal to the torch backend's."""
import functools
import random

import pytest
import torch
from torch import nn

from attn_fast import AdditiveAttention, additive_attention
from attn_fast.tolerances import forward_tolerance, gradient_tolerance
from attn_fast.tools.testing import MASK_KINDS, errors_against_reference, random_case

# (B, T, S, A, D): single step, single key, odd sizes around the kernels' tiles (BLOCK_S 32, BLOCK_A 8).
SHAPES = [(2, 1, 37, 12, 5), (3, 4, 1, 8, 8), (2, 17, 33, 10, 6), (1, 3, 70, 9, 20)]


def grid(count, seed) -> list:
    """`count` random cases (a list: pytest may iterate parameters more than once, a generator only once)."""
    rng = random.Random(seed)
    return [
        pytest.param(dict(
            shape=rng.choice(SHAPES), mask=MASK_KINDS[number % len(MASK_KINDS)],
            dtype=[torch.float32, torch.float16, torch.bfloat16][number % 3],
            fully_masked_rows=rng.random() < 0.5, beam=rng.choice([0, 2]), extra=rng.random() < 0.3,
            noncontiguous=rng.random() < 0.4, seed=number,
        ), id=f"case{number}")
        for number in range(count)
    ]


def test_float64_runs_the_fp32_kernels_forward_and_backward(triton_device):
    """Explicit backend="triton" on float64: fp32 kernels, results and gradients in float64 at fp32 accuracy."""
    case = random_case(2, 3, 9, 8, 5, mask="lengths", beam=2, extra_key_term=True, seed=4, device=triton_device)
    errors = errors_against_reference(case, torch.float64, functools.partial(additive_attention, backend="triton"),
                                      seed=4)
    for name, error in errors.items():
        tolerance = (forward_tolerance if name in ("context", "weights") else gradient_tolerance)(torch.float32)
        assert error <= tolerance, f"{name}: {error:.3g} > {tolerance:.1g}"


def test_auto_sends_float64_to_the_torch_backend():
    from attn_fast.functional import cpu_unusable_reason, resolve_backend

    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"
    # CPU tensors never go to Triton under "auto": the fused CPU kernels when numba imports, else the torch backend.
    on_cpu = "cpu" if cpu_unusable_reason(torch.device("cpu")) is None else "torch"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == on_cpu

@pytest.mark.parametrize("params", grid(18, seed=7))
def test_forward_and_gradients_match_reference(params, triton_device):
    case = random_case(*params["shape"], mask=params["mask"], fully_masked_rows=params["fully_masked_rows"],
                       beam=params["beam"], extra_key_term=params["extra"], noncontiguous=params["noncontiguous"],
                       seed=params["seed"], device=triton_device)
    errors = errors_against_reference(case, params["dtype"], functools.partial(additive_attention, backend="triton"),
                                      seed=params["seed"])
    for name, error in errors.items():
        tolerance = (forward_tolerance if name in ("context", "weights") else gradient_tolerance)(params["dtype"])
        assert error <= tolerance, f"{name}: {error:.3g} > {tolerance:.1g} ({params})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saturated_inputs(dtype, triton_device):
    case = random_case(2, 5, 9, 10, 4, mask="lengths", saturate=3e3, seed=4, device=triton_device)
    errors = errors_against_reference(case, dtype, functools.partial(additive_attention, backend="triton"))
    assert errors["context"] <= forward_tolerance(dtype) and errors["weights"] <= forward_tolerance(dtype), errors
    assert max(v for k, v in errors.items() if k.startswith("grad_")) <= gradient_tolerance(dtype), errors


def test_weights_only_when_asked(triton_device):
    case = random_case(2, 3, 5, 4, 6, seed=1, device=triton_device)
    context, weights = additive_attention(*case.inputs(), backend="triton")
    assert weights is None and context.dtype == torch.float32
    half = case.cast(torch.float16)
    _, weights = additive_attention(*half.inputs(), backend="triton", need_weights=True)
    assert weights.dtype == torch.float16 and weights.shape == (2, 3, 5)


class TinySeq2SeqHead(nn.Module):
    """Attention + readout, the part of a Seq2Seq decoder that the backends change."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.attn = AdditiveAttention(6, 5, 12, backend=backend)
        self.readout = nn.Linear(5 + 6, 4)

    def forward(self, states, encoder_states, lengths):
        context, weights = self.attn(states, encoder_states, key_lengths=lengths, need_weights=True)
        logits = self.readout(torch.cat([context, states], dim=-1))
        return logits.logsumexp(-1).mean() + 0.1 * weights.square().sum(-1).mean()


def test_training_step_equals_torch_backend(triton_device):
    generator = torch.Generator().manual_seed(3)
    states = torch.randn(3, 7, 6, generator=generator).to(triton_device)
    encoder_states = torch.randn(3, 9, 5, generator=generator).to(triton_device)
    lengths = torch.tensor([9, 4, 1], device=triton_device)
    parameters = {}
    for backend in ("torch", "triton"):
        model = TinySeq2SeqHead(backend).to(triton_device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model(states, encoder_states, lengths).backward()
        optimizer.step()
        parameters[backend] = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, value in parameters["torch"].items():
        torch.testing.assert_close(parameters["triton"][name], value, rtol=1e-5, atol=1e-6)


def test_deterministic_mode_is_bit_identical(triton_device):
    case = random_case(2, 9, 21, 10, 6, mask="lengths", beam=2, extra_key_term=True, seed=5, device=triton_device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            leaves = case.cast(torch.float32, requires_grad=True)
            context, weights = additive_attention(*leaves.inputs(), **leaves.options(), need_weights=True,
                                                  backend="triton")
            (context.square().sum() + weights[..., :3].sum()).backward()
            runs.append([context, weights] + [t.grad for t in leaves.float_tensors().values()])
    finally:
        torch.use_deterministic_algorithms(previous)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_only_requested_gradients_are_computed(triton_device):
    case = random_case(2, 4, 6, 5, 3, seed=6, device=triton_device)
    query = case.query_proj.clone().requires_grad_()
    context, _ = additive_attention(query, case.key_proj, case.value, case.v, backend="triton")
    context.sum().backward()
    leaves = case.cast(torch.float64, requires_grad=True)
    expected, _ = additive_attention(*leaves.inputs(), backend="reference")
    expected.sum().backward()
    torch.testing.assert_close(query.grad, leaves.query_proj.grad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saved_for_backward_is_never_of_tanh_size(backend, triton_device):
    """The autograd graph keeps the inputs and P [B, T, S] only, never anything of size B*T*S*A."""
    batch, tgt_len, src_len, attn_dim, value_dim = 2, 6, 7, 16, 3
    case = random_case(batch, tgt_len, src_len, attn_dim, value_dim, mask="lengths", seed=8, device=triton_device)
    leaves = case.cast(torch.float32, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        context, _ = additive_attention(*leaves.inputs(), **leaves.options(), backend=backend)
    context.sum().backward()
    assert saved, "nothing was saved: the hook did not see the backend's autograd node"
    largest_input = max(t.numel() for t in leaves.float_tensors().values())
    assert max(saved) <= max(batch * tgt_len * src_len, largest_input) < batch * tgt_len * src_len * attn_dim


@pytest.mark.gpu
def test_opcheck_triton_ops_on_cuda(triton_device):
    from torch.library import opcheck

    from attn_fast.backends.triton_backend import _forward_op

    case = random_case(3, 9, 40, 16, 8, mask="mixed", beam=2, extra_key_term=True, device=triton_device, seed=2)
    leaves = case.cast(torch.float32, requires_grad=True)
    arguments = (*leaves.inputs(), leaves.extra_key_term, leaves.key_lengths, leaves.key_padding_mask, leaves.index,
                 True, True)
    results = opcheck(_forward_op, arguments)
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["fullgraph", "cuda-graphs"])
def test_compiled_cuda_training_step_matches_eager(mode, triton_device):
    """torch.compile(fullgraph=True) traces the Triton launches without graph breaks; "reduce-overhead" captures
    forward and backward in CUDA graphs, which fails on any host sync or data-dependent allocation."""
    generator = torch.Generator().manual_seed(3)
    states = torch.randn(4, 20, 6, generator=generator).to(triton_device)
    encoder_states = torch.randn(4, 33, 5, generator=generator).to(triton_device)
    lengths = torch.tensor([33, 20, 7, 1]).to(triton_device)
    eager = TinySeq2SeqHead("triton").to(triton_device)
    compiled_model = TinySeq2SeqHead("triton").to(triton_device)
    compiled = torch.compile(compiled_model, fullgraph=True, mode=mode)
    eager(states, encoder_states, lengths).backward()
    for _ in range(3):  # warm-up runs, then the captured graph replays
        compiled_model.zero_grad()
        loss = compiled(states, encoder_states, lengths)
        loss.backward()
    for (name, parameter), reference in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
