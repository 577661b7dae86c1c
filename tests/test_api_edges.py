"""API edges (issue 14, item 5): each one a named ValueError/TypeError or a documented behaviour, on every backend
of `attn_fast.validation.BACKENDS` but "auto" (Triton under the interpreter without a GPU, tiny shapes).

- index / key_lengths of a small integer dtype (int8, int16, uint8) are cast to int64: same results as int64;
- meta tensors give meta outputs of the right shapes on every backend, layers included, without reading a value;
- S = 0 gives zeros everywhere (functional, gradients, every layer's forward and step);
- layer arguments: sizes that are bools, non-floating dtypes, inputs of another dtype, eager weights of a wrong
  shape (nothing broadcast or reshaped but v's [1, A]), v = 0 with normalize, coverage_loss over no row.
"""
import numpy as np
import pytest
import torch

from attn_fast import AdditiveAttention, additive_attention
from attn_fast.nn.coverage import CoverageAttention, coverage_loss
from attn_fast.nn.location import LocationSensitiveAttention
from attn_fast.tolerances import forward_tolerance, relative_error
from tests.backend_cases import RUN_BACKENDS, backend_device

B, T, S, A, D = 2, 3, 4, 5, 3


@pytest.fixture
def device(request, triton_device):
    return backend_device(request.node.callspec.params["backend"], triton_device)


def random_inputs(query_rows=B, memory_rows=B, src_len=S, device="cpu", requires_grad=False):
    generator = torch.Generator().manual_seed(7)
    shapes = {"query_proj": (query_rows, T, A), "key_proj": (memory_rows, src_len, A),
              "value": (memory_rows, src_len, D), "v": (A,)}
    return {name: torch.randn(*shape, generator=generator).to(device).requires_grad_(requires_grad)
            for name, shape in shapes.items()}


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32], ids=str)
@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_small_integer_index_and_lengths_are_cast(backend, device, dtype):
    inputs = random_inputs(query_rows=4, memory_rows=3, device=device, requires_grad=True)
    index, lengths = torch.tensor([2, 0, 0, 1]), torch.tensor([4, 1, 3])
    results = []
    for index_dtype in (torch.int64, dtype):
        context, weights = additive_attention(*inputs.values(), index=index.to(device, index_dtype),
                                              key_lengths=lengths.to(device, index_dtype), need_weights=True,
                                              backend=backend)
        gradients = torch.autograd.grad((context.sum() + weights[..., 0].sum()), list(inputs.values()))
        results.append((context, weights, *gradients))
    for expected, actual in zip(*results):
        assert torch.equal(expected, actual)


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_meta_tensors_give_meta_outputs(backend, monkeypatch):
    """Shapes only: no value is read (every way a tensor value reaches Python is made to fail)."""
    inputs = {name: tensor.to("meta").requires_grad_(True) for name, tensor in random_inputs(query_rows=3).items()}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        def refuse(self, *args, _name=name, **kwargs):
            raise AssertionError(f"a value was read: Tensor.{_name}")

        monkeypatch.setattr(torch.Tensor, name, refuse)
    options = dict(index=torch.tensor([0, 1, 1], device="meta"), key_lengths=torch.tensor([4, 2], device="meta"),
                   key_padding_mask=torch.zeros(3, T, S, dtype=torch.bool, device="meta"), causal=True,
                   extra_key_term=torch.empty(3, S, A, device="meta"))
    context, weights = additive_attention(*inputs.values(), need_weights=True, backend=backend, **options)
    assert context.device.type == "meta" and context.shape == (3, T, D)
    assert weights.device.type == "meta" and weights.shape == (3, T, S)
    (context.sum() + weights.sum()).backward()
    for name, tensor in inputs.items():
        assert tensor.grad.device.type == "meta" and tensor.grad.shape == tensor.shape, name


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_layers_on_meta_tensors(backend):
    layer = AdditiveAttention(4, 6, A, backend=backend, device="meta")
    key, query = torch.empty(B, S, 6, device="meta"), torch.empty(B, T, 4, device="meta")
    context, weights = layer(query, key, key_lengths=torch.tensor([4, 2], device="meta"), need_weights=True)
    assert context.shape == (B, T, 6) and weights.shape == (B, T, S) and context.device.type == "meta"
    memory = layer.precompute(key, key_lengths=torch.tensor([4, 2], device="meta"))
    context, weights = layer.step(query[:, 0], memory, need_weights=True)
    assert context.shape == (B, 6) and weights.shape == (B, S) and weights.device.type == "meta"


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_empty_source_gives_zeros_and_zero_gradients(backend, device):
    inputs = random_inputs(src_len=0, device=device, requires_grad=True)
    context, weights = additive_attention(*inputs.values(), need_weights=True, backend=backend)
    assert context.shape == (B, T, D) and weights.shape == (B, T, 0)
    assert torch.equal(context.cpu(), torch.zeros(B, T, D))
    gradients = torch.autograd.grad(context.sum(), list(inputs.values()), allow_unused=True)
    for name, gradient in zip(inputs, gradients):
        assert gradient is None or torch.equal(gradient.cpu(), torch.zeros_like(gradient.cpu())), name


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_layers_with_empty_source_give_zeros(backend, device):
    key = torch.randn(B, 0, 6, device=device)
    additive = AdditiveAttention(4, 6, A, backend=backend, device=device)
    context, weights = additive(torch.randn(B, T, 4, device=device), key, need_weights=True)
    assert torch.equal(context.cpu(), torch.zeros(B, T, 6)) and weights.shape == (B, T, 0)
    context, weights = additive.step(torch.randn(B, 4, device=device), additive.precompute(key), need_weights=True)
    assert torch.equal(context.cpu(), torch.zeros(B, 6)) and weights.shape == (B, 0)
    for layer in (LocationSensitiveAttention(4, 6, A, n_filters=2, kernel_size=3, backend=backend, device=device),
                  CoverageAttention(4, 6, A, backend=backend, device=device)):
        state = layer.precompute(key)
        for _ in range(2):  # a second step reads the state the first one left
            context, weights, state = layer.step(torch.randn(B, 4, device=device), state)
            assert torch.equal(context.cpu(), torch.zeros(B, 6)) and weights.shape == (B, 0), type(layer).__name__


def test_coverage_loss_over_no_row_is_zero():
    empty = torch.zeros(0, S)
    for reduction in ("mean", "sum"):
        loss = coverage_loss(empty, empty, reduction=reduction)
        assert loss.shape == () and float(loss) == 0.0, reduction
    assert coverage_loss(empty, empty, reduction="none").shape == (0,)


@pytest.mark.parametrize("name", ["query_dim", "key_dim", "attn_dim"])
def test_layer_sizes_must_be_ints_not_bools(name):
    sizes = {"query_dim": 4, "key_dim": 6, "attn_dim": A} | {name: True}
    with pytest.raises(ValueError, match=rf"{name} must be a positive int, got True"):
        AdditiveAttention(**sizes)


@pytest.mark.parametrize("option", ["n_filters", "kernel_size"])
def test_location_sizes_must_be_ints_not_bools(option):
    with pytest.raises(ValueError, match=rf"{option} must be a positive (odd )?int, got True"):
        LocationSensitiveAttention(4, 6, A, **{option: True})


@pytest.mark.parametrize("layer_class", [AdditiveAttention, LocationSensitiveAttention, CoverageAttention])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "float32"])
def test_layer_dtype_must_be_floating(layer_class, dtype):
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype .* got"):
        layer_class(4, 6, A, dtype=dtype)


def test_additive_layer_names_an_input_of_another_dtype():
    layer = AdditiveAttention(4, 6, A)
    query, key = torch.randn(B, T, 4), torch.randn(B, S, 6)
    with pytest.raises(TypeError, match=r"query must have the layer's dtype torch.float32, got torch.float64"):
        layer(query.double(), key)
    with pytest.raises(TypeError, match=r"key must have the layer's dtype torch.float32, got torch.float16"):
        layer(query, key.half())
    memory = layer.precompute(key)
    with pytest.raises(TypeError, match=r"query must have the layer's dtype torch.float32, got torch.bfloat16"):
        layer.step(query[:, 0].bfloat16(), memory)
    with pytest.raises(TypeError, match=r"key must have the layer's dtype"):
        layer.precompute(key.double())


def eager_weights(attn_dim=10, query_dim=4, key_dim=6):
    generator = torch.Generator().manual_seed(1)
    return {"query_weight": torch.randn(attn_dim, query_dim, generator=generator),
            "key_weight": torch.randn(attn_dim, key_dim, generator=generator),
            "v": torch.randn(attn_dim, generator=generator),
            "query_bias": torch.randn(attn_dim, generator=generator),
            "key_bias": torch.randn(attn_dim, generator=generator)}


@pytest.mark.parametrize("name, bad, error, expected", [
    ("query_bias", torch.randn(9), ValueError, r"query_bias must have shape \[10\], got \[9\]"),
    ("key_bias", torch.randn(1), ValueError, r"key_bias must have shape \[10\], got \[1\]"),
    ("key_bias", torch.randn(10, 1), ValueError, r"key_bias must have shape \[10\], got \[10, 1\]"),
    ("v", torch.randn(2, 5), ValueError, r"v must have shape \[10\] or \[1, 10\], got \[2, 5\]"),
    ("v", torch.randn(10, 1), ValueError, r"v must have shape \[10\] or \[1, 10\], got \[10, 1\]"),
    ("query_weight", torch.randn(10, 5), ValueError, r"query_weight must have shape \[10, 4\], got \[10, 5\]"),
    ("key_weight", torch.ones(10, 6, dtype=torch.int64), TypeError, r"key_weight must be a floating tensor"),
    ("query_bias", [0.0] * 10, TypeError, r"query_bias must be a torch.Tensor, got list"),
])
def test_load_eager_weights_refuses_wrong_shapes(name, bad, error, expected):
    layer = AdditiveAttention(4, 6, 10)
    before = {key: tensor.clone() for key, tensor in layer.state_dict().items()}
    with pytest.raises(error, match=expected):
        layer.load_eager_weights(**(eager_weights() | {name: bad}))
    for key, tensor in layer.state_dict().items():  # nothing half-loaded
        assert torch.equal(tensor, before[key]), key


def test_load_eager_weights_takes_v_as_one_row():
    weights = eager_weights()
    flat, row = AdditiveAttention(4, 6, 10), AdditiveAttention(4, 6, 10)
    flat.load_eager_weights(**weights)
    row.load_eager_weights(**(weights | {"v": weights["v"][None, :]}))
    for key, tensor in flat.state_dict().items():
        assert torch.equal(tensor, row.state_dict()[key]), key
    assert torch.equal(flat.query_layer.bias.detach(), weights["query_bias"] + weights["key_bias"])


def test_coverage_load_eager_weights_refuses_wrong_coverage_weight():
    layer = CoverageAttention(4, 6, 10)
    for bad in (torch.randn(1, 10), torch.randn(5, 2), torch.randn(1)):
        with pytest.raises(ValueError, match=r"coverage_weight must have shape \[10\] or \[10, 1\]"):
            layer.load_eager_weights(**eager_weights(), coverage_weight=bad)


def test_normalize_with_zero_v_gives_uniform_weights_not_nan():
    layer = AdditiveAttention(4, 6, A, normalize=True, backend="reference")
    with torch.no_grad():
        layer.v.zero_()
    query, key = torch.randn(B, T, 4), torch.randn(B, S, 6)
    context, weights = layer(query, key, need_weights=True)
    assert torch.allclose(weights, torch.full((B, T, S), 1.0 / S))
    assert torch.allclose(context, key.mean(dim=1, keepdim=True).expand(B, T, 6))
    context.sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


def test_numpy_bool_flags_are_named():
    inputs = random_inputs()
    with pytest.raises(TypeError, match=r"need_weights must be a Python bool \(True or False\), got numpy.bool"):
        additive_attention(*inputs.values(), need_weights=np.bool_(True))


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_precompute_zeroes_non_finite_hidden_keys_once(backend, device):
    """NaN garbage in the padding of the encoder states: steps against the memory are those of clean padding, and
    the memory's hidden keys are 0 (steps read no value back, so the zeroing happens at precompute)."""
    layer = AdditiveAttention(4, 6, A, backend=backend, device=device)
    key, lengths = torch.randn(B, S, 6, device=device), torch.tensor([S, 2], device=device)
    poisoned = key.clone()
    poisoned[1, 2:] = float("nan")
    memory = layer.precompute(poisoned, key_lengths=lengths)
    assert torch.equal(memory.key_proj[1, 2:].cpu(), torch.zeros(S - 2, A))
    assert torch.equal(memory.value[1, 2:].cpu(), torch.zeros(S - 2, 6))
    query = torch.randn(B, 4, device=device)
    context, weights = layer.step(query, memory, need_weights=True)
    expected_context, expected_weights = layer.step(query, layer.precompute(key, key_lengths=lengths),
                                                    need_weights=True)
    assert relative_error(context, expected_context) <= forward_tolerance(torch.float32)
    assert relative_error(weights, expected_weights) <= forward_tolerance(torch.float32)
