"""Mixed precision: the functional API, the layers and the ops inside `torch.autocast` (CPU here: bf16, and fp16,
which CPU autocast also takes; on a GPU the Triton cases run on CUDA), as `F.scaled_dot_product_attention` behaves:
one compute dtype for every floating input, outputs in it, gradients to fp32 parameters, GradScaler working."""
import pytest
import torch

import attn_fast
from attn_fast import AdditiveAttention, additive_attention
from attn_fast.nn.coverage import CoverageAttention
from attn_fast.nn.location import LocationSensitiveAttention
from attn_fast.tolerances import forward_tolerance, gradient_tolerance, relative_error

BACKENDS = ["reference", "torch", "triton"]
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
B, T, S, A, D = 2, 3, 5, 8, 4


@pytest.fixture
def device(request, triton_device):
    """Triton cases run where the Triton tests run (the GPU when there is one, else the CPU under the
    interpreter); the other backends on CPU."""
    return triton_device if request.node.callspec.params.get("backend") == "triton" else torch.device("cpu")


def problem(device, *, extra=False, index=False):
    """fp32 leaves (as a model's fp32 parameters and activations would be), query rows 2 * B with `index`."""
    generator = torch.Generator().manual_seed(3)
    rows = 2 * B if index else B
    tensors = {
        "query_proj": torch.randn(rows, T, A, generator=generator),
        "key_proj": torch.randn(B, S, A, generator=generator),
        "value": torch.randn(B, S, D, generator=generator),
        "v": torch.randn(A, generator=generator),
    }
    if extra:
        tensors["extra_key_term"] = 0.5 * torch.randn(rows, S, A, generator=generator)
    tensors = {name: tensor.to(device).requires_grad_() for name, tensor in tensors.items()}
    options = {"key_lengths": torch.tensor([S, 2], device=device)}
    if index:
        options["index"] = torch.tensor([0, 1, 1, 0], device=device)
    return tensors, options


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra, index", [(False, False), (True, True)], ids=["plain", "extra-index"])
def test_functional_under_autocast_matches_the_float64_reference(backend, dtype, extra, index, device):
    tensors, options = problem(device, extra=extra, index=index)
    with torch.autocast(device.type, dtype=dtype):
        context, weights = additive_attention(**tensors, **options, need_weights=True, backend=backend)
    assert context.dtype == dtype and weights.dtype == dtype
    grad_context = torch.randn(context.shape, generator=torch.Generator().manual_seed(4)).to(device)
    grads = torch.autograd.grad((context.float() * grad_context).sum(), list(tensors.values()))
    assert all(grad.dtype == torch.float32 and torch.isfinite(grad).all() for grad in grads)

    # The oracle: float64 on the same inputs rounded to the autocast dtype (input rounding is not counted).
    rounded = {name: tensor.detach().to(dtype).double().requires_grad_() for name, tensor in tensors.items()}
    ref_context, ref_weights = attn_fast.additive_attention_reference(**rounded, **options, need_weights=True)
    ref_grads = torch.autograd.grad((ref_context * grad_context.double()).sum(), list(rounded.values()))
    assert relative_error(context, ref_context) <= forward_tolerance(dtype)
    assert relative_error(weights, ref_weights) <= forward_tolerance(dtype)
    for name, grad, ref in zip(tensors, grads, ref_grads):
        assert relative_error(grad, ref) <= gradient_tolerance(dtype), name


def test_autocast_leaves_float64_alone_and_mixed_dtypes_still_fail_outside_it():
    tensors, options = problem(torch.device("cpu"))
    doubles = {name: tensor.detach().double() for name, tensor in tensors.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context, _ = additive_attention(**doubles, **options, backend="torch")
    assert context.dtype == torch.float64  # as autocast leaves float64 ops alone
    mixed = dict(tensors, query_proj=tensors["query_proj"].detach().bfloat16())
    with pytest.raises(TypeError, match="all inputs must share one dtype: query_proj is torch.bfloat16 but key_proj"):
        additive_attention(**mixed, **options, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        with pytest.raises(TypeError, match="all inputs must share one dtype"):
            additive_attention(**mixed, **options, backend="torch")


def test_the_op_runs_with_autocast_disabled_inside(monkeypatch):
    """Nothing inside the backend is re-cast: it sees inputs of one dtype and autocast off."""
    from attn_fast.backends import torch_backend

    seen = []
    original = torch_backend.attend

    def spy(call, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), {t.dtype for t in call.float_inputs()}))
        return original(call, **kwargs)

    monkeypatch.setattr(torch_backend, "attend", spy)
    tensors, options = problem(torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        additive_attention(**tensors, **options, backend="torch")
    assert seen == [(False, {torch.bfloat16})]


def _check_layer_under_autocast(layer, run, device, *, every_gradient_nonzero: bool) -> None:
    """`run(layer)` under bf16 autocast: a bf16 output, finite fp32 gradients on every parameter (nonzero too when
    asked), and the output within bf16's gradient tolerance of the same run in float64."""
    with torch.autocast(device.type, dtype=torch.bfloat16):
        output = run(layer)
    assert output.dtype == torch.bfloat16
    output.float().square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name
        assert not every_gradient_nonzero or parameter.grad.abs().sum() > 0, name
    assert _close_to_float64_layer(output, layer, run) <= gradient_tolerance(torch.bfloat16)


def _close_to_float64_layer(output, layer, run):
    """The same layer in float64, run on the same inputs, as the yardstick of the autocast output. The layer's own
    Linear projections run in bf16 under autocast, so their rounding counts here: the gradient column's bound."""
    reference = run(layer.double())
    layer.float()
    return relative_error(output, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_additive_layer_forward_and_steps_under_autocast(backend, device):
    torch.manual_seed(0)
    layer = AdditiveAttention(5, 6, A, backend=backend, device=device)
    query, key = torch.randn(B, T, 5, device=device), torch.randn(B, S, 6, device=device)
    lengths = torch.tensor([S, 2], device=device)
    beam = torch.tensor([0, 0, 1, 1], device=device)

    def run(module):
        dtype = next(module.parameters()).dtype
        context, weights = module(query.to(dtype), key.to(dtype), key_lengths=lengths, need_weights=True)
        memory = module.precompute(key.to(dtype), key_lengths=lengths)
        step_context, _ = module.step(query[:, 0].to(dtype), memory)
        beam_context, _ = module.step(query[:, 1].to(dtype).index_select(0, beam), memory, index=beam)
        return torch.cat([context.flatten(), weights.flatten(), step_context.flatten(), beam_context.flatten()])

    _check_layer_under_autocast(layer, run, device, every_gradient_nonzero=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["location", "coverage"])
def test_stateful_layers_under_autocast(kind, backend, device):
    torch.manual_seed(0)
    if kind == "location":
        layer = LocationSensitiveAttention(5, 6, A, n_filters=3, kernel_size=3, backend=backend, device=device)
    else:
        layer = CoverageAttention(5, 6, A, backend=backend, device=device)
    queries, key = torch.randn(T, B, 5, device=device), torch.randn(B, S, 6, device=device)
    lengths = torch.tensor([S, 2], device=device)

    def run(module):
        dtype = next(module.parameters()).dtype
        state = module.precompute(key.to(dtype), key_lengths=lengths)
        state = state.reorder(torch.tensor([0, 0, 1], device=device))  # a beam over the memory rows
        outputs = []
        for query in queries:
            context, weights, state = module.step(query.to(dtype)[[0, 0, 1]], state)
            outputs += [context.flatten(), weights.flatten()]
        return torch.cat(outputs)

    _check_layer_under_autocast(layer, run, device, every_gradient_nonzero=False)


def test_grad_scaler_step_under_autocast():
    torch.manual_seed(0)
    layer = AdditiveAttention(5, 6, A, backend="torch")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    query, key = torch.randn(B, T, 5), torch.randn(B, S, 6)
    before = [parameter.detach().clone() for parameter in layer.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context, _ = layer(query, key, key_lengths=torch.tensor([S, 2]))
        loss = context.float().square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = [parameter.grad.clone() for parameter in layer.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # no inf/NaN found: the step was taken and the scale kept
    assert all(grad.dtype == torch.float32 and torch.isfinite(grad).all() for grad in grads)
    assert all(not torch.equal(old, new.detach()) for old, new in zip(before, layer.parameters()))


@pytest.mark.parametrize("decoder", ["parallel", "bahdanau"])
def test_seq2seq_training_step_under_autocast(decoder, tmp_path):
    """One step of the Seq2Seq trainer's loss (`Seq2SeqTask.batch_loss`, what `training.train_step` calls) under
    autocast with a GradScaler: a finite loss and finite fp32 gradients on every parameter the batch reaches."""
    from attn_fast.examples.seq2seq.train import Seq2SeqTask, TrainConfig

    config = TrainConfig(train_size=32, valid_size=4, batch_size=8, decoder=decoder, embed_dim=8, hidden_dim=8,
                         attn_dim=8, attention_backend="torch", device="cpu", quiet=True, out_dir=None)
    task = Seq2SeqTask(config)
    torch.manual_seed(0)
    model = task.build_model(task.model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    batch = task.epoch_batches(0)[0]
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.batch_loss(model, batch, torch.device("cpu"))
    assert torch.isfinite(loss.objective) and loss.objective.dtype == torch.float32  # cross_entropy: fp32
    scaler.scale(loss.objective).backward()
    scaler.unscale_(optimizer)
    attention = model.decoder.attention
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in attention.parameters())
    scaler.step(optimizer)
    scaler.update()


def test_compiled_step_under_autocast_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = AdditiveAttention(5, 6, A, backend="torch")
    key, query = torch.randn(B, S, 6), torch.randn(B, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory = layer.precompute(key, key_lengths=torch.tensor([S, 2]))
        compiled = torch.compile(lambda q: layer.step(q, memory, need_weights=True), fullgraph=True,
                                 backend="aot_eager")
        got, expected = compiled(query), layer.step(query, memory, need_weights=True)
    for a, b in zip(got, expected):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_backward_called_inside_autocast_equals_backward_outside(backend, device):
    """The backends' autograd backward functions turn autocast off: backward() inside the autocast block (common,
    though PyTorch recommends outside) gives the same gradients."""
    torch.manual_seed(0)
    layer = AdditiveAttention(5, 6, A, backend=backend, device=device)
    query, key = torch.randn(B, T, 5, device=device), torch.randn(B, S, 6, device=device)
    grads = []
    for inside in (False, True):
        layer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            context, _ = layer(query, key)
            if inside:  # not what PyTorch recommends, but common
                context.float().square().sum().backward()
        if not inside:
            context.float().square().sum().backward()
        grads.append([parameter.grad.clone() for parameter in layer.parameters()])
    for outside_grad, inside_grad in zip(*grads):
        torch.testing.assert_close(inside_grad, outside_grad)
