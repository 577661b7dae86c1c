"""A decode step reads nothing back to the host: the memory is validated once, values included, in `precompute`,
and a step (AdditiveAttention, LocationSensitiveAttention, CoverageAttention, with a beam `index` and the beam
reorder) checks only metadata, so that on CUDA it neither syncs nor breaks a CUDA-graph capture. Shown on CPU with
a counter on every way a tensor value reaches Python, and with the step compiled with fullgraph=True."""
import pytest
import torch

from attn_fast import AdditiveAttention
from attn_fast.nn.additive import AttentionMemory
from attn_fast.nn.coverage import CoverageAttention
from attn_fast.nn.location import LocationSensitiveAttention

#: The Tensor methods through which a value reaches the host as a Python object.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
BEAM = 2
B, S, DQ, DK, A = 2, 5, 3, 4, 6


@pytest.fixture
def host_reads(monkeypatch):
    """A list that grows by the method's name at every host read made after the fixture is armed."""
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    def arm():
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        return reads

    return arm


def inputs(device="cpu"):
    generator = torch.Generator().manual_seed(5)
    key = torch.randn(B, S, DK, generator=generator)
    queries = torch.randn(3, B * BEAM, DQ, generator=generator)
    return key.to(device), queries.to(device), torch.tensor([S, 3], device=device)


def beam_index(device="cpu"):
    return torch.arange(B, device=device).repeat_interleave(BEAM)


@pytest.fixture
def device(request, triton_device):
    """Triton cases run where the Triton tests run (GPU, else CPU under the interpreter); the others on CPU."""
    return triton_device if request.node.callspec.params.get("backend") == "triton" else torch.device("cpu")


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_additive_step_and_beam_step_read_nothing_back(backend, host_reads, device):
    torch.manual_seed(0)
    layer = AdditiveAttention(DQ, DK, A, backend=backend, device=device)
    key, queries, lengths = inputs(device)
    memory = layer.precompute(key, key_lengths=lengths)  # the one validation, values included
    assert memory.checked and memory.tanh_form in ("direct", "factorized")
    index = beam_index(device)
    reads = host_reads()
    context, weights = layer.step(queries[0, :B], memory, need_weights=True)
    beam_context, _ = layer.step(queries[1], memory, index=index)
    assert reads == []
    assert context.shape == (B, DK) and beam_context.shape == (B * BEAM, DK)
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("layer_class", [LocationSensitiveAttention, CoverageAttention])
def test_stateful_steps_and_reorder_read_nothing_back(layer_class, backend, host_reads, device):
    torch.manual_seed(0)
    options = {"n_filters": 2, "kernel_size": 3} if layer_class is LocationSensitiveAttention else {}
    layer = layer_class(DQ, DK, A, backend=backend, device=device, **options)
    key, queries, lengths = inputs(device)
    state = layer.precompute(key, key_lengths=lengths)
    backpointers = torch.tensor([1, 0, 3, 3], device=device)
    reads = host_reads()
    state = state.reorder(beam_index(device))  # start a beam
    for query in queries:
        _, weights, state = layer.step(query, state)
        state = state.reorder(backpointers)
    assert reads == []
    assert torch.isfinite(weights).all() and state.index.tolist() == [0, 0, 1, 1]


def test_the_counter_sees_host_reads(host_reads):
    """The counter works: precompute does read values (once), and so does a step against a hand-built memory."""
    layer = AdditiveAttention(DQ, DK, A, backend="torch")
    key, queries, lengths = inputs()
    reads = host_reads()
    memory = layer.precompute(key, key_lengths=lengths)
    assert reads
    reads.clear()
    layer.step(queries[0, :B], AttentionMemory(memory.key_proj, memory.value, lengths))
    assert reads


def test_a_hand_built_memory_is_still_fully_validated():
    """Without precompute's check, a step validates values as every other call does."""
    layer = AdditiveAttention(DQ, DK, A, backend="torch")
    key, queries, _ = inputs()
    memory = AttentionMemory(layer.key_layer(key), key, key_lengths=torch.tensor([S + 1, 1]))
    with pytest.raises(ValueError, match=r"key_lengths values must lie in \[0, S\]"):
        layer.step(queries[0, :B], memory)
    with pytest.raises(ValueError, match=r"key_lengths values must lie in \[0, S\]"):
        layer.precompute(key, key_lengths=torch.tensor([S + 1, 1]))


def test_out_of_range_beam_index_and_backpointers_still_fail():
    layer = CoverageAttention(DQ, DK, A, backend="torch")
    key, queries, _ = inputs()
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 2\)"):
        layer.precompute(key, index=torch.tensor([0, 2]))  # checked once, at precompute
    state = layer.precompute(key, index=beam_index())
    with pytest.raises(IndexError):
        state.reorder(torch.tensor([0, 4, 1, 1]))
    with pytest.raises(IndexError):
        state.reorder(torch.tensor([0, -5, 1, 1]))


def test_step_tanh_form_is_decided_at_precompute():
    layer = AdditiveAttention(DQ, DK, A, backend="torch")
    key, _, _ = inputs()
    assert layer.precompute(key).tanh_form == "factorized"
    assert layer.precompute(key * 1e3).tanh_form == "direct"  # |key_proj| beyond the factorized form's range


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_step_with_a_fixed_tanh_form_matches_the_reference_at_any_query_scale(scale):
    """The factorized form chosen from the keys alone stays exact for saturated queries (e^{2q} = inf or 0)."""
    torch.manual_seed(0)
    layer = AdditiveAttention(DQ, DK, A, backend="torch", dtype=torch.float64)
    key, queries, lengths = inputs()
    key, queries = key.double(), queries.double()
    memory = layer.precompute(key, key_lengths=lengths)
    assert memory.tanh_form == "factorized"
    reference = AdditiveAttention(DQ, DK, A, backend="reference", dtype=torch.float64)
    reference.load_state_dict(layer.state_dict())
    for query in queries * scale:
        context, weights = layer.step(query[:B], memory, need_weights=True)
        expected, expected_weights = reference.step(query[:B], reference.precompute(key, key_lengths=lengths),
                                                    need_weights=True)
        torch.testing.assert_close(context, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["additive", "location", "coverage"])
def test_compiled_step_fullgraph_matches_eager(kind):
    torch._dynamo.reset()
    torch.manual_seed(0)
    key, queries, lengths = inputs()
    index = beam_index()
    if kind == "additive":
        layer = AdditiveAttention(DQ, DK, A, backend="torch")
        memory = layer.precompute(key, key_lengths=lengths)

        def step(query, backpointers):
            context, weights = layer.step(query, memory, index=index.index_select(0, backpointers),
                                          need_weights=True)
            return context, weights

        args = [(query, torch.tensor([1, 0, 3, 2])) for query in queries]
    else:
        if kind == "location":
            layer = LocationSensitiveAttention(DQ, DK, A, n_filters=2, kernel_size=3, backend="torch")
        else:
            layer = CoverageAttention(DQ, DK, A, backend="torch")
        start = layer.precompute(key, key_lengths=lengths).reorder(index)

        def step(query, backpointers):
            context, weights, state = layer.step(query, start)
            state = state.reorder(backpointers)
            if kind == "location":
                return context, weights, state.prev_weights, state.cumulative_weights, state.index
            return context, weights, state.coverage, state.index

        args = [(query, torch.tensor([1, 0, 3, 2])) for query in queries]
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for arguments in args:
        for got, expected in zip(compiled(*arguments), step(*arguments)):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
