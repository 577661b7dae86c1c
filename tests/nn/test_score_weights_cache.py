"""Prepared score weights: a decoding memory keeps the Triton forward's v pre-pass (`AttentionMemory.score_weights`,
made once by `precompute`), so that a decode step launches its score kernel alone instead of the one-program
`_score_vector_kernel` first. Counted here by recording every launch under the Triton interpreter (on the GPU where
there is one), for the plain, location-sensitive and coverage layers and a beam step; results and gradients are
the unprepared step's, and weights made from a v that has changed since are never used.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from attn_fast import AdditiveAttention, CoverageAttention, LocationSensitiveAttention
from attn_fast.functional import additive_attention_on_memory, prepare_score_weights
from attn_fast.nn.additive import ScoreWeightsSource
from attn_fast.tolerances import forward_tolerance
from attn_fast.validation import SCORE_WEIGHTS_ALIGNMENT, score_weights_length

launch = pytest.importorskip("attn_fast.kernels.launch")
forward = pytest.importorskip("attn_fast.kernels.forward")

# The reciprocal tanh forms overflow to +-inf on purpose (kernels/tanh.py); numpy reports it under the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

B, BEAM, S, DQ, DK, A = 2, 2, 7, 5, 6, 8
PRE_PASS = "_score_vector_kernel"
TOLERANCE = forward_tolerance(torch.float32)


@pytest.fixture
def launches(monkeypatch):
    """The names of the kernels launched from now on, in order (every launcher goes through `run_launches`)."""
    names = []
    run_launches = launch.run_launches

    def recording(kernel_launches, device, wrap=None):
        names.extend(kernel_launch.kernel.fn.__name__ for kernel_launch in kernel_launches)
        return run_launches(kernel_launches, device, wrap)

    monkeypatch.setattr(launch, "run_launches", recording)
    return names


def key_and_lengths(device):
    key = torch.randn(B, S, DK, device=device)
    return key, torch.tensor([S, 4], device=device)


def unprepared(memory):
    """The same memory without its prepared score weights: every step runs the pre-pass."""
    return dataclasses.replace(memory, score_weights=None, score_weights_source=None)


def test_the_alignment_is_the_kernels_and_the_length_is_checked_here():
    assert SCORE_WEIGHTS_ALIGNMENT == forward.SCORE_WEIGHTS_ALIGNMENT
    assert [score_weights_length(size) for size in (1, 8, 64, 65)] == [66, 66, 66, 130]


def test_precompute_prepares_score_weights_for_triton_steps_only(triton_device, launches):
    key, lengths = key_and_lengths(triton_device)
    layer = AdditiveAttention(DQ, DK, A, backend="triton", device=triton_device)
    memory = layer.precompute(key, key_lengths=lengths)
    assert launches == [PRE_PASS]  # the pre-pass, once, for the whole memory
    assert memory.score_weights.shape == (score_weights_length(A),) and memory.score_weights.dtype == torch.float32
    assert memory.score_weights_source.dtype == torch.float32
    expected = forward.prepare_score_weights(layer.v.detach(), torch.float32)
    assert torch.equal(memory.score_weights, expected)
    for backend in ("torch", "reference"):  # no pre-pass launch to save there
        other = AdditiveAttention(DQ, DK, A, backend=backend).precompute(key.cpu())
        assert other.score_weights is None and other.score_weights_source is None


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("beam", [False, True])
def test_a_plain_step_is_its_score_kernel_alone(triton_device, launches, need_weights, beam):
    """fp32 keys in the kernels' factorized range: the step launches the prepared-keys score kernel (then the
    context pass when the weights are wanted), and no pre-pass; the unprepared step launches one more."""
    key, lengths = key_and_lengths(triton_device)
    layer = AdditiveAttention(DQ, DK, A, backend="triton", device=triton_device)
    memory = layer.precompute(key, key_lengths=lengths)
    assert memory.key_exp is not None
    index = torch.arange(B, device=triton_device).repeat_interleave(BEAM) if beam else None
    query = torch.randn(B * BEAM if beam else B, DQ, device=triton_device)
    launches.clear()
    prepared = layer.step(query, memory, index=index, need_weights=need_weights)
    step_launches = list(launches)
    assert PRE_PASS not in step_launches and 1 <= len(step_launches) <= 2, step_launches
    assert step_launches[0] == "_attention_forward_prepared_kernel"
    launches.clear()
    plain = layer.step(query, unprepared(memory), index=index, need_weights=need_weights)
    assert launches == [PRE_PASS, *step_launches]
    for got, expected in zip(prepared, plain):
        assert (got is None and expected is None) or torch.equal(got, expected)


def stateful_layer(kind, device, **options):
    if kind == "location":
        return LocationSensitiveAttention(DQ, DK, A, n_filters=2, kernel_size=3, backend="triton", device=device,
                                          **options)
    return CoverageAttention(DQ, DK, A, backend="triton", device=device, **options)


@pytest.mark.parametrize("kind", ["location", "coverage"])
def test_stateful_beam_steps_launch_no_pre_pass_and_match_unprepared_ones(kind, triton_device, launches):
    """Location and coverage steps add an extra key term, which the prepared keys cannot serve; the score weights
    (v does not depend on the keys) still spare every step its pre-pass. Two steps with a beam reorder between."""
    layer = stateful_layer(kind, triton_device)
    key, lengths = key_and_lengths(triton_device)
    start = layer.precompute(key, key_lengths=lengths)
    assert start.memory.score_weights is not None and start.memory.key_exp is None
    beam_start = start.reorder(torch.arange(B, device=triton_device).repeat_interleave(BEAM))
    queries = torch.randn(2, B * BEAM, DQ, device=triton_device)
    backpointers = torch.tensor([1, 0, 3, 3], device=triton_device)
    results = {}
    for prepared in (True, False):
        state = beam_start if prepared else dataclasses.replace(beam_start, memory=unprepared(beam_start.memory))
        launches.clear()
        outputs = []
        for query in queries:
            context, weights, state = layer.step(query, state)
            outputs += [context, weights]
            state = state.reorder(backpointers)
        results[prepared] = outputs
        pre_passes = launches.count(PRE_PASS)
        assert pre_passes == (0 if prepared else len(queries)), launches
    for got, expected in zip(results[True], results[False]):
        assert torch.equal(got, expected)


def test_gradients_through_prepared_steps_equal_unprepared_ones(triton_device):
    """The backward uses v itself (the prepared weights are forward-only): every parameter's gradient, v's too,
    through two location steps (the second reads the first's weights) is the unprepared one's."""
    layer = stateful_layer("location", triton_device)
    key, lengths = key_and_lengths(triton_device)
    queries = torch.randn(2, B, DQ, device=triton_device)
    gradients = {}
    for prepared in (True, False):
        state = layer.precompute(key, key_lengths=lengths)
        if not prepared:
            state = dataclasses.replace(state, memory=unprepared(state.memory))
        loss = 0
        for number, query in enumerate(queries):
            context, weights, state = layer.step(query, state)
            loss = loss + (context * (number + 1)).sum() + weights.square().sum()
        layer.zero_grad()
        loss.backward()
        gradients[prepared] = {name: parameter.grad.clone() for name, parameter in layer.named_parameters()}
    assert gradients[True]["attention.v"].abs().sum() > 0
    for name, gradient in gradients[True].items():
        torch.testing.assert_close(gradient, gradients[False][name], rtol=0, atol=0, msg=name)


def fresh_step(layer, key, lengths, query):
    """The step of a memory made now, from the layer's current parameters."""
    return layer.step(query, layer.precompute(key, key_lengths=lengths), need_weights=True)


@pytest.mark.parametrize("change", ["optimizer", "load_state_dict", "copy_", "new_parameter"])
def test_a_step_after_v_changes_never_uses_stale_weights(change, triton_device, launches):
    layer = AdditiveAttention(DQ, DK, A, backend="triton", device=triton_device)
    key, lengths = key_and_lengths(triton_device)
    memory = layer.precompute(key, key_lengths=lengths)
    query = torch.randn(B, DQ, device=triton_device)
    layer.step(query, memory)
    new_v = torch.randn(A, device=triton_device)
    if change == "optimizer":  # an in-place update of v, as every torch.optim optimizer makes it
        context, _ = layer.step(query, memory)
        context.square().sum().backward()
        torch.optim.SGD([layer.v], lr=10.0).step()  # v alone: the memory's key projection stays valid
    elif change == "load_state_dict":
        layer.load_state_dict({**layer.state_dict(), "v": new_v})
    elif change == "copy_":
        with torch.no_grad():
            layer.v.copy_(new_v)
    else:
        layer.v = torch.nn.Parameter(new_v)
    launches.clear()
    context, weights = layer.step(query, memory, need_weights=True)
    assert launches.count(PRE_PASS) == 1  # the step made its own weights from the v it passed
    expected_context, expected_weights = fresh_step(layer, key, lengths, query)
    assert torch.equal(context, expected_context) and torch.equal(weights, expected_weights)


def test_normalized_steps_reuse_the_score_vector_only_without_gradients(triton_device, launches):
    """normalize=True: score_vector() = g v / ||v||. Without gradients a step passes the vector recorded at
    precompute (no norm per step); with them it recomputes it, so that g and v get their gradients; after g
    changes, neither the weights nor the vector are reused."""
    layer = AdditiveAttention(DQ, DK, A, normalize=True, backend="triton", device=triton_device)
    key, lengths = key_and_lengths(triton_device)
    memory = layer.precompute(key, key_lengths=lengths)
    assert torch.equal(memory.score_weights_source.score_vector, layer.score_vector().detach())
    query = torch.randn(B, DQ, device=triton_device)
    norms = []
    real_norm = torch.linalg.vector_norm

    def counting_norm(*args, **kwargs):
        norms.append(1)
        return real_norm(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.linalg, "vector_norm", counting_norm)
        with torch.no_grad():
            launches.clear()
            inference = layer.step(query, memory, need_weights=True)
        assert norms == [] and PRE_PASS not in launches
        launches.clear()
        context, _ = layer.step(query, memory)
        assert norms == [1] and PRE_PASS not in launches
    context.sum().backward()
    assert layer.g.grad is not None and layer.v.grad.abs().sum() > 0
    for got, expected in zip(inference, layer.step(query, unprepared(memory), need_weights=True)):
        assert torch.equal(got, expected)
    with torch.no_grad():
        layer.g.mul_(3.0)
    launches.clear()
    with torch.no_grad():
        after = layer.step(query, memory, need_weights=True)
    assert launches.count(PRE_PASS) == 1
    for got, expected in zip(after, fresh_step(layer, key, lengths, query)):
        assert torch.equal(got, expected)


def test_the_source_holds_only_for_the_same_tensors_versions_and_dtype():
    v = torch.nn.Parameter(torch.randn(A))
    source = ScoreWeightsSource.of((v,), torch.float32, v)
    assert source.holds_for((v,), torch.float32)
    assert not source.holds_for((v,), torch.bfloat16)  # a step under another autocast dtype
    assert not source.holds_for((torch.nn.Parameter(v.detach().clone()),), torch.float32)  # another tensor
    assert not source.holds_for((v, v), torch.float32)
    v.data = v.data.double()  # module.double() / .to(): same Parameter, new storage
    assert not source.holds_for((v,), torch.float32)
    source = ScoreWeightsSource.of((v,), torch.float64, v, extra=(1.5,))
    assert source.holds_for((v,), torch.float64, (1.5,)) and not source.holds_for((v,), torch.float64, (2.0,))
    with torch.no_grad():
        v.add_(1.0)
    assert not source.holds_for((v,), torch.float64, (1.5,))


def test_no_cache_while_compiling(monkeypatch, triton_device):
    """torch.compile cannot branch on `_version` (a data-dependent symbol in a fullgraph trace): while tracing,
    nothing is prepared, and recorded weights are not used."""
    v = torch.nn.Parameter(torch.randn(A, device=triton_device))
    source = ScoreWeightsSource.of((v,), torch.float32, v)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not source.holds_for((v,), torch.float32)
    assert prepare_score_weights(v, torch.float32, backend="triton") is None


def test_a_compiled_step_runs_the_pre_pass_without_a_graph_break(triton_device, monkeypatch):
    """torch.compile(fullgraph=True) of a step against a memory with prepared weights: no graph break on the
    staleness check (skipped while tracing), results equal to the eager prepared step's. The triton op is kept
    opaque to AOT tracing, the test-only configuration of tests/backends/test_triton_ops.py (see its docstring)."""
    import torch._functorch.config as functorch_config

    monkeypatch.setattr(functorch_config, "decompose_custom_triton_ops", False)
    torch._dynamo.reset()
    layer = AdditiveAttention(DQ, DK, A, backend="triton", device=triton_device)
    key, lengths = key_and_lengths(triton_device)
    memory = layer.precompute(key, key_lengths=lengths)

    def step(query):
        return layer.step(query, memory, need_weights=True)

    query = torch.randn(B, DQ, device=triton_device)
    try:
        compiled = torch.compile(step, fullgraph=True, backend="eager")(query)
    finally:
        torch._dynamo.reset()
    for got, expected in zip(compiled, step(query)):
        assert torch.equal(got, expected)


def test_no_cache_while_capturing_a_cuda_graph(monkeypatch):
    """A captured step replays without its host-side checks: it must read v itself at every replay."""
    from attn_fast.nn import additive

    v = torch.nn.Parameter(torch.randn(A))
    source = ScoreWeightsSource.of((v,), torch.float32, v)
    assert source.holds_for((v,), torch.float32)
    monkeypatch.setattr(additive, "_capturing_cuda_graph", lambda tensor: tensor is v)
    assert not source.holds_for((v,), torch.float32)


@pytest.mark.gpu
def test_a_replayed_cuda_graph_step_sees_v_changed_after_the_capture():
    device = torch.device("cuda")
    layer = AdditiveAttention(DQ, DK, A, backend="triton", device=device).eval()
    key, lengths = key_and_lengths(device)
    memory = layer.precompute(key, key_lengths=lengths)
    query = torch.randn(B, DQ, device=device)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile every kernel the captured step launches, the pre-pass included
            for step_memory in (memory, unprepared(memory)):
                layer.step(query, step_memory, need_weights=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            context, weights = layer.step(query, memory, need_weights=True)
        layer.v.mul_(-2.0)  # in place, after the capture
        graph.replay()
        torch.cuda.synchronize()
        expected_context, expected_weights = fresh_step(layer, key, lengths, query)
    torch.testing.assert_close(context, expected_context, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(weights, expected_weights, rtol=TOLERANCE, atol=TOLERANCE)


def test_prepare_score_weights_is_for_the_triton_backend_only(triton_device):
    v = torch.randn(A)
    assert prepare_score_weights(v, torch.float32, backend="torch") is None
    assert prepare_score_weights(v, torch.float32, backend="reference") is None
    assert prepare_score_weights(v.to(triton_device).double(), torch.float64, backend="triton") is None
    assert prepare_score_weights(v.to("meta"), torch.float32, backend="triton") is None
    weights = prepare_score_weights(v.to(triton_device), torch.float32, backend="triton")
    assert weights.shape == (score_weights_length(A),) and not weights.requires_grad


def test_other_backends_ignore_score_weights():
    """The torch and reference backends have no pre-pass: weights that would give garbage if read change nothing."""
    query_proj, key_proj = torch.randn(B, 1, A), torch.randn(B, S, A)
    value, v = torch.randn(B, S, DK), torch.randn(A)
    garbage = torch.full((score_weights_length(A),), float("nan"))
    for backend in ("torch", "reference"):
        got = additive_attention_on_memory(query_proj, key_proj, value, v, score_weights=garbage, backend=backend)
        expected = additive_attention_on_memory(query_proj, key_proj, value, v, backend=backend)
        assert torch.equal(got[0], expected[0])


def test_float64_triton_calls_drop_the_weights(triton_device, launches):
    """float64 runs the kernels on fp32 copies: weights passed with such a call are not used (the v pre-pass runs
    on the copy), and results match the fp64 reference."""
    query_proj = torch.randn(B, 1, A, device=triton_device, dtype=torch.float64)
    key_proj = torch.randn(B, S, A, device=triton_device, dtype=torch.float64)
    value = torch.randn(B, S, DK, device=triton_device, dtype=torch.float64)
    v = torch.randn(A, device=triton_device, dtype=torch.float64)
    garbage = torch.full((score_weights_length(A),), float("nan"), device=triton_device)
    context, _ = additive_attention_on_memory(query_proj, key_proj, value, v, score_weights=garbage,
                                              backend="triton")
    assert launches.count(PRE_PASS) == 1
    expected, _ = additive_attention_on_memory(query_proj, key_proj, value, v, backend="reference")
    torch.testing.assert_close(context, expected, rtol=TOLERANCE, atol=TOLERANCE)


class SpeechBrainShapedAttention(torch.nn.Module):
    """SpeechBrain's ContentBasedAttention layout (mlp_enc, mlp_dec, mlp_attn, mlp_out, softmax, scaling, reset),
    built here so that the adapter's own memory is tested where speechbrain is not installed."""

    def __init__(self, device):
        super().__init__()
        self.mlp_enc = torch.nn.Linear(DK, A, device=device)
        self.mlp_dec = torch.nn.Linear(DQ, A, device=device)
        self.mlp_attn = torch.nn.Linear(A, 1, bias=False, device=device)
        self.mlp_out = torch.nn.Linear(DK, 4, device=device)
        self.softmax = torch.nn.Softmax(dim=-1)
        self.scaling = 1.5

    def reset(self):
        pass


def test_the_speechbrain_adapter_keeps_score_weights_in_its_memory(triton_device, launches):
    from attn_fast.integrations.speechbrain import FusedContentBasedAttention

    attention = FusedContentBasedAttention(SpeechBrainShapedAttention(triton_device), backend="triton")
    enc_states, enc_len = torch.randn(B, S, DK, device=triton_device), torch.tensor([S, 4.0], device=triton_device)
    queries = torch.randn(3, B, DQ, device=triton_device)
    attention(enc_states, enc_len, queries[0])  # the first call builds the sequence's memory: one pre-pass
    assert launches.count(PRE_PASS) == 1 and attention.checked_memory.score_weights is not None
    launches.clear()
    prepared = attention(enc_states, enc_len, queries[1])
    assert PRE_PASS not in launches
    memory = attention.checked_memory
    attention.checked_memory = dataclasses.replace(memory, score_weights=None, score_weights_source=None)
    unprepared_step = attention(enc_states, enc_len, queries[1])
    attention.checked_memory = memory
    for got, expected in zip(prepared, unprepared_step):
        assert torch.equal(got, expected)

    def fresh(query):
        attention.reset()
        attention(enc_states, enc_len, queries[0])
        return attention(enc_states, enc_len, query)

    for change in ("weight", "scaling"):
        if change == "weight":
            with torch.no_grad():
                attention.mlp_attn.weight.mul_(-2.0)
        else:
            attention.scaling = 0.5
        launches.clear()
        stale_memory_step = attention(enc_states, enc_len, queries[2])
        assert launches.count(PRE_PASS) == 1, change  # its own pre-pass, not the memory's stale weights
        for got, expected in zip(stale_memory_step, fresh(queries[2])):
            assert torch.equal(got, expected), change


def test_weights_serve_only_steps_in_the_dtype_they_were_made_for(triton_device, launches):
    """Under autocast a step computes in the autocast dtype, with v cast to it: weights prepared under the same
    autocast serve it (and equal the unprepared step's results); fp32 weights do not serve a bf16 step."""
    layer = AdditiveAttention(DQ, DK, A, backend="triton", device=triton_device)
    key, lengths = key_and_lengths(triton_device)
    query = torch.randn(B, DQ, device=triton_device)
    fp32_memory = layer.precompute(key, key_lengths=lengths)
    with torch.autocast(triton_device.type, dtype=torch.bfloat16):
        bf16_memory = layer.precompute(key, key_lengths=lengths)
        assert bf16_memory.score_weights_source.dtype == torch.bfloat16
        launches.clear()
        prepared = layer.step(query, bf16_memory, need_weights=True)
        assert PRE_PASS not in launches and prepared[0].dtype == torch.bfloat16
        plain = layer.step(query, unprepared(bf16_memory), need_weights=True)
        launches.clear()
        layer.step(query, fp32_memory)
        assert launches.count(PRE_PASS) == 1
    for got, expected in zip(prepared, plain):
        assert torch.equal(got, expected)
