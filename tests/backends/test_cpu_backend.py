"""The "cpu" backend (fused numba kernels) against the float64 reference: forward and gradients over a seeded random
grid of shapes, masks, layouts, dtypes and both tanh forms, saturated and NaN inputs, decode steps through a
prepared memory, dispatch and fallback, threads, and the torch.library ops (opcheck, torch.compile)."""
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attn_fast
from attn_fast import AdditiveAttention, additive_attention
from attn_fast import functional as functional_module
from attn_fast.backends import common, cpu_backend, cpu_kernels
from attn_fast.functional import resolve_backend
from attn_fast.masking import visible_keys
from attn_fast.tolerances import forward_tolerance, gradient_tolerance, relative_error
from attn_fast.tools.testing import MASK_KINDS, errors_against_reference, random_case
from attn_fast.validation import attention_call

pytest.importorskip("numba")


def additive_attention_cpu(query_proj, key_proj, value, v, *, tanh_form="auto", **options):
    """The cpu backend on a validated call, with its tanh form exposed."""
    return cpu_backend.attend(attention_call(query_proj, key_proj, value, v, **options), tanh_form=tanh_form)


@pytest.fixture(autouse=True)
def poisoned_buffers(poison):
    """Every uninitialized buffer of the backend (P, context) starts as NaN: an element the kernel forgets to write
    shows up."""
    return poison(common)


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (B, T, S, A, D): single step, single key, odd sizes, A and D not powers of two, more steps than one thread's share.
SHAPES = [(1, 1, 1, 1, 1), (2, 1, 7, 5, 3), (3, 5, 1, 6, 4), (2, 9, 13, 17, 11), (2, 16, 32, 24, 40), (1, 33, 3, 7, 2)]


def random_grid(count, seed) -> list:
    rng = random.Random(seed)
    return [
        pytest.param(
            dict(
                shape=rng.choice(SHAPES), mask=MASK_KINDS[number % len(MASK_KINDS)], dtype=rng.choice(DTYPES),
                fully_masked_rows=rng.random() < 0.5, beam=rng.choice([0, 0, 3]), extra=rng.random() < 0.3,
                noncontiguous=rng.random() < 0.4, tanh_form=rng.choice(["auto", "direct", "factorized"]), seed=number,
            ),
            id=f"case{number}",
        )
        for number in range(count)
    ]


def check_case(params, saturate=None):
    case = random_case(*params["shape"], mask=params["mask"], fully_masked_rows=params["fully_masked_rows"],
                       beam=params["beam"], extra_key_term=params["extra"], noncontiguous=params["noncontiguous"],
                       saturate=saturate, seed=params["seed"])

    def run(*inputs, **options):
        return additive_attention_cpu(*inputs, **options, tanh_form=params["tanh_form"])

    errors = errors_against_reference(case, params["dtype"], run, seed=params["seed"])
    for name, error in errors.items():
        tolerance = forward_tolerance(params["dtype"]) if name in ("context", "weights") else \
            gradient_tolerance(params["dtype"])
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:.1g} ({params})"


@pytest.mark.parametrize("params", random_grid(60, seed=1313))
def test_matches_reference(params):
    check_case(params)


@pytest.fixture
def per_row_context(monkeypatch):
    """Every forward with T > 1 takes the per-row product over visible keys (`context_over_visible_prefix`), which
    the small test shapes would otherwise never reach (it pays only when it skips enough keys)."""
    calls = []
    monkeypatch.setattr(common, "PRODUCT_CALL_COST", -1)
    original = common.context_over_visible_prefix
    monkeypatch.setattr(common, "context_over_visible_prefix", lambda *args: calls.append(1) or original(*args))
    return calls


@pytest.mark.parametrize("params", random_grid(24, seed=2626))
def test_per_row_context_matches_reference(params, per_row_context):
    check_case(params)
    assert per_row_context or params["shape"][1] == 1  # T = 1: the kernel's fused context


def test_per_row_context_is_taken_only_where_it_skips_enough_keys():
    limits = torch.tensor([50, 10, 5, 50]).numpy()
    # 85 hidden keys x 100 steps x 512 = 4.4 M multiply-adds saved, against 4 calls of PRODUCT_CALL_COST (4 M).
    assert common.worth_skipping_hidden_keys(limits, 100, 50, 512)
    assert not common.worth_skipping_hidden_keys(limits, 50, 50, 512)  # 2.2 M saved
    assert not common.worth_skipping_hidden_keys(torch.full((4,), 50).numpy(), 50, 50, 512)  # nothing hidden


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["none", "mixed"])
def test_saturated_inputs(dtype, mask):
    """|q + k| up to ~1e4 on half the units: "auto" must take the direct form, and stay exact."""
    params = dict(shape=(2, 6, 9, 10, 5), mask=mask, dtype=dtype, fully_masked_rows=True, beam=0, extra=False,
                  noncontiguous=False, tanh_form="auto", seed=3)
    check_case(params, saturate=3e3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factorized_form_is_exact_where_the_product_overflows(dtype):
    """|q|, |k| within the exp-safe range but e^{2q} e^{2k} = inf (q + k = 70) or 0: the compiled division must give
    tanh = +-1 exactly (a reciprocal estimate refined by Newton steps would give NaN from 1/inf)."""
    limit = common.EXP_SAFE_MAGNITUDE[dtype]
    case = random_case(2, 4, 6, 8, 3, mask="lengths", seed=4, dtype=dtype)
    query = case.query_proj.sign() * limit * 0.9  # e^{2q} finite, the product with e^{2k} often not
    keys = case.key_proj.sign() * limit * 0.9
    context, weights = additive_attention_cpu(query, keys, case.value, case.v, key_lengths=case.key_lengths,
                                              need_weights=True, tanh_form="factorized")
    expected, expected_weights = attn_fast.additive_attention_reference(
        query.double(), keys.double(), case.value.double(), case.v.double(), key_lengths=case.key_lengths,
        need_weights=True)
    assert relative_error(context, expected) <= forward_tolerance(dtype)
    assert relative_error(weights, expected_weights) <= forward_tolerance(dtype)


def test_gradcheck_float64():
    case = random_case(2, 3, 5, 4, 3, mask="mixed", fully_masked_rows=True, beam=2, extra_key_term=True,
                       noncontiguous=True, dtype=torch.float64, seed=11).cast(torch.float64, requires_grad=True)
    names = list(case.float_tensors())

    def function(*tensors):
        options = case.options() | {"extra_key_term": tensors[4]}
        return additive_attention_cpu(*tensors[:4], **options, need_weights=True)

    assert torch.autograd.gradcheck(function, [getattr(case, name) for name in names], eps=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    sizes=st.tuples(*[st.integers(1, 9)] * 5),
    mask=st.sampled_from(MASK_KINDS),
    beam=st.sampled_from([0, 2]),
    extra=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_small_problem_matches_reference(sizes, mask, beam, extra, seed):
    """Hypothesis explores shapes the fixed grid does not name (float64: exact to rounding)."""
    case = random_case(*sizes, mask=mask, fully_masked_rows=seed % 2 == 0, beam=beam, extra_key_term=extra, seed=seed)
    errors = errors_against_reference(case, torch.float64, additive_attention_cpu, seed=seed)
    assert max(errors.values()) <= gradient_tolerance(torch.float64), errors


@pytest.mark.parametrize("per_row", [False, True], ids=["batched_context", "per_row_context"])
@pytest.mark.parametrize("mask", ["lengths", "padding", "padding_per_query", "causal"])
@pytest.mark.parametrize("steps", [1, 6])
def test_hidden_keys_never_reach_a_row(mask, steps, per_row, request):
    """NaN and inf in key_proj, extra_key_term and value at keys hidden from a row leave its context, weights and
    gradients unchanged; every context and weight is written (poisoned buffers). Both context products for T > 1:
    one batched product (which multiplies hidden values by 0 and is then redone) and the per-row one."""
    if per_row:
        request.getfixturevalue("per_row_context")
    case = random_case(3, steps, 7, 6, 5, mask=mask, extra_key_term=True, seed=5)
    if mask == "padding_per_query":  # per-step random masks seldom hide a key from every step: hide the last two
        case.key_padding_mask[:, :, 5:] = True
    hidden = ~visible_keys(3, steps, 7, key_lengths=case.key_lengths,
                                             key_padding_mask=case.key_padding_mask, causal=case.causal)
    hidden_everywhere = hidden.all(dim=1)  # [B, S]: keys no step of the row sees
    assert hidden_everywhere.any()

    def run(poisoned: bool):
        tensors = {name: tensor.detach().clone() for name, tensor in case.float_tensors().items()}
        if poisoned:
            for name, value in (("key_proj", float("nan")), ("extra_key_term", float("inf")),
                                ("value", float("nan"))):
                tensors[name][hidden_everywhere] = value
        leaves = {name: tensor.requires_grad_() for name, tensor in tensors.items()}
        options = case.options() | {"extra_key_term": leaves["extra_key_term"]}
        context, weights = additive_attention(leaves["query_proj"], leaves["key_proj"], leaves["value"],
                                              leaves["v"], **options, need_weights=True, backend="cpu")
        (context.sum() + (weights * torch.arange(7.0)).sum()).backward()
        return context, weights, {name: leaf.grad for name, leaf in leaves.items()}

    clean, poisoned = run(False), run(True)
    torch.testing.assert_close(poisoned[0], clean[0])
    torch.testing.assert_close(poisoned[1], clean[1])
    for name in ("query_proj", "v"):
        torch.testing.assert_close(poisoned[2][name], clean[2][name])
    for name in ("key_proj", "value", "extra_key_term"):
        torch.testing.assert_close(poisoned[2][name][~hidden_everywhere], clean[2][name][~hidden_everywhere])


def test_nan_a_row_sees_propagates_to_that_row_only():
    case = random_case(3, 2, 5, 4, 3, seed=6)
    key_proj = case.key_proj.clone()
    key_proj[1, 2, 0] = float("nan")
    context, weights = additive_attention(case.query_proj, key_proj, case.value, case.v, need_weights=True,
                                          backend="cpu")
    assert context[1].isnan().all() and weights[1].isnan().all()
    assert torch.isfinite(context[[0, 2]]).all() and torch.isfinite(weights[[0, 2]]).all()


@pytest.mark.parametrize("beam", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_steps_through_a_prepared_memory(beam, dtype):
    """precompute keeps e^{2k} for the cpu backend's steps; a step reads it (no exponential of the keys), and
    matches the reference, gradients included."""
    torch.manual_seed(0)
    layer = AdditiveAttention(6, 5, 8, backend="cpu").to(dtype)
    reference = AdditiveAttention(6, 5, 8, backend="reference").to(dtype)
    reference.load_state_dict(layer.state_dict())
    key = torch.randn(2, 7, 5, dtype=dtype)
    lengths = torch.tensor([7, 3])
    index = torch.arange(2).repeat_interleave(beam) if beam else None
    rows = 2 * beam if beam else 2
    query = torch.randn(rows, 6, dtype=dtype)
    memory = layer.precompute(key, key_lengths=lengths, index=index)
    assert memory.key_exp is not None and memory.tanh_form == "factorized"
    context, weights = layer.step(query, memory, index=index, need_weights=True)
    expected, expected_weights = reference.step(query, reference.precompute(key, key_lengths=lengths, index=index),
                                                index=index, need_weights=True)
    assert relative_error(context, expected) <= forward_tolerance(dtype)
    assert relative_error(weights, expected_weights) <= forward_tolerance(dtype)
    (context.sum() + weights.square().sum()).backward()
    assert layer.key_layer.weight.grad is not None and torch.isfinite(layer.key_layer.weight.grad).all()


def test_a_prepared_step_computes_no_exponential_of_the_keys(monkeypatch):
    case = random_case(4, 1, 9, 8, 3, mask="lengths", seed=7)
    key_exp = torch.mul(case.key_proj, 2.0).exp_()
    exponentials = []
    real_exp = torch.Tensor.exp_
    monkeypatch.setattr(torch.Tensor, "exp_", lambda tensor: exponentials.append(tensor.shape) or real_exp(tensor))
    context, _ = functional_module.additive_attention_on_memory(
        *case.inputs(), key_lengths=case.key_lengths, backend="cpu", tanh_form="factorized", key_exp=key_exp)
    assert tuple(case.key_proj.shape) not in exponentials, exponentials  # only e^{2q} [B, 1, A]
    expected, _ = attn_fast.additive_attention_reference(*case.inputs(), key_lengths=case.key_lengths)
    assert relative_error(context, expected) <= forward_tolerance(torch.float32)


def test_auto_picks_cpu_on_cpu_tensors_and_falls_back_with_one_notice(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "cpu"
    monkeypatch.setattr(functional_module, "cpu_unusable_reason", lambda device: "numba is not importable (test)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
        assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    notices = [warning for warning in caught if "pip install numba" in str(warning.message)]
    assert len(notices) == 1
    with pytest.raises(ValueError, match="backend='cpu' is not available"):
        resolve_backend("cpu", torch.device("cpu"))


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match="backend='cpu'.*CPU tensors"):
        resolve_backend("cpu", torch.device("cuda"))


def test_meta_tensors_give_meta_outputs():
    case = random_case(2, 3, 4, 5, 6, mask="lengths", seed=8)
    meta = [tensor.to("meta") for tensor in case.inputs()]
    context, weights = additive_attention(*meta, key_lengths=case.key_lengths.to("meta"), need_weights=True,
                                          backend="cpu")
    assert context.device.type == "meta" and context.shape == (2, 3, 6) and weights.shape == (2, 3, 4)


def test_returned_weights_are_safe_to_edit():
    case = random_case(2, 3, 4, 5, 6, seed=9).cast(torch.float32, requires_grad=True)
    context, weights = additive_attention(*case.inputs(), need_weights=True, backend="cpu")
    expected = torch.autograd.grad(context.sum(), case.query_proj, retain_graph=True)[0]
    with torch.no_grad():
        weights.fill_(123.0)  # must not be the P the backward reads
    torch.testing.assert_close(torch.autograd.grad(context.sum(), case.query_proj)[0], expected)


def test_integer_index_of_any_dtype():
    case = random_case(2, 2, 5, 4, 3, beam=2, seed=10)
    expected, _ = additive_attention(*case.inputs(), index=case.index, backend="cpu")
    context, _ = additive_attention(*case.inputs(), index=case.index.to(torch.int32), backend="cpu")
    torch.testing.assert_close(context, expected, rtol=0, atol=0)


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    """Forward items are independent and the backward's order is fixed per thread count: torch ops and the kernels
    alternate at 1 and 2 threads without crashes, and the forward is bit-identical."""
    monkeypatch.setattr(cpu_kernels, "ONE_THREAD_BELOW_ELEMENTS", 0)  # this small case on 2 threads too
    case = random_case(3, 9, 11, 16, 5, mask="mixed", beam=2, seed=12).cast(torch.float32, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            context, weights = additive_attention(*case.inputs(), **case.options(), need_weights=True, backend="cpu")
            torch.randn(256, 256) @ torch.randn(256, 256)  # a threaded torch op between kernels
            grads = torch.autograd.grad(context.sum() + weights.square().sum(), case.query_proj)
            results.append((context, weights, grads[0]))
    finally:
        torch.set_num_threads(threads)
    for context, weights, grad in results[1:]:
        assert torch.equal(context, results[0][0]) and torch.equal(weights, results[0][1])
        torch.testing.assert_close(grad, results[0][2], rtol=1e-5, atol=1e-6)


def test_small_launches_run_on_one_thread(monkeypatch):
    """A launch below ONE_THREAD_BELOW_ELEMENTS tanh elements runs on one thread whatever torch's count (the
    wake-up of a second worker costs more than it saves), in the serial build of the forward; a larger one on
    torch's count."""
    import numba

    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", max(2, numba.config.NUMBA_NUM_THREADS))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_kernels.threads_for(cpu_kernels.ONE_THREAD_BELOW_ELEMENTS - 1) == 1
        assert cpu_kernels.threads_for(cpu_kernels.ONE_THREAD_BELOW_ELEMENTS) == 2
        seen = []
        original = cpu_kernels.use_torch_threads
        monkeypatch.setattr(cpu_kernels, "use_torch_threads", lambda elements=None: seen.append(
            original(elements)) or seen[-1])
        case = random_case(2, 3, 5, 4, 3, seed=3)
        # ... through the serial build, which never wakes numba's pool: the parallel launcher must not be called.
        from attn_fast.backends.cpu_kernels import forward

        def parallel_launch(*args):
            raise AssertionError("a one-thread launch went through the parallel kernel")

        monkeypatch.setattr(forward, "attention_forward", parallel_launch)
        context = additive_attention(*case.inputs(), backend="cpu")[0]
        assert seen == [1] and torch.isfinite(context).all()
    finally:
        torch.set_num_threads(threads)


def _forward_in_forked_child(case, connection):
    # One torch thread, as DataLoader workers run: torch's own OpenMP hangs in a child forked from a parent that
    # used it. The kernels' thread count must be 1 here even where torch's is not.
    torch.set_num_threads(2)
    threads = cpu_kernels.threads_for(None)
    torch.set_num_threads(1)
    leaves = [tensor.detach().clone().requires_grad_() for tensor in case.inputs()]
    context, _ = additive_attention(*leaves, **case.options(), backend="cpu")
    context.square().sum().backward()
    connection.send((context.detach().numpy(), leaves[0].grad.numpy(), threads))  # plain bytes, no shared memory
    connection.close()


@pytest.mark.parametrize("parent_threads", [1, 2])
def test_a_child_forked_after_a_launch_runs_the_serial_builds(monkeypatch, parent_threads):
    """numba's "omp" layer (GNU OpenMP) terminates a forked child that starts a parallel region once its parent
    started the layer, which any launch does (a one-thread launch too): such a child runs every kernel (forward and
    backward) in its serial build, whatever torch's thread count, with the same results."""
    import multiprocessing

    monkeypatch.setattr(cpu_kernels, "ONE_THREAD_BELOW_ELEMENTS", 0)  # this small case on 2 threads in the parent
    threads = torch.get_num_threads()
    case = random_case(3, 9, 11, 16, 5, mask="mixed", beam=2, seed=12)
    try:
        torch.set_num_threads(parent_threads)
        leaves = [tensor.detach().clone().requires_grad_() for tensor in case.inputs()]
        expected, _ = additive_attention(*leaves, **case.options(), backend="cpu")
        expected.square().sum().backward()
        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_forward_in_forked_child, args=(case, sender))
        child.start()
        sender.close()
        assert receiver.poll(120), f"the forked child gave no result (exit code {child.exitcode})"
        child_context, child_grad, child_threads = receiver.recv()
        child.join(30)
    finally:
        torch.set_num_threads(threads)
    assert child.exitcode == 0 and cpu_kernels._pool_started and child_threads == 1
    torch.testing.assert_close(torch.from_numpy(child_context), expected.detach())
    torch.testing.assert_close(torch.from_numpy(child_grad), leaves[0].grad)


def test_inputs_are_scanned_once_per_forward_and_backward(monkeypatch):
    scans = []
    real_scan = common.largest_operand
    monkeypatch.setattr(common, "largest_operand", lambda *args: scans.append(1) or real_scan(*args))
    case = random_case(2, 3, 5, 4, 3, seed=1).cast(torch.float32, requires_grad=True)
    context, _ = additive_attention(*case.inputs(), backend="cpu")
    context.sum().backward()
    assert len(scans) == 1


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    dict(), dict(mask="mixed", fully_masked_rows=True), dict(mask="padding_per_query", beam=2, extra_key_term=True),
])
def test_opcheck_ops(options):
    from torch.library import opcheck

    case = random_case(3, 4, 5, 6, 7, **options, seed=1).cast(torch.float32, requires_grad=True)
    arguments = (*case.inputs(), case.extra_key_term, case.key_lengths, case.key_padding_mask, case.index,
                 case.causal, "auto")
    results = opcheck(cpu_backend._forward_op, arguments)
    assert set(results.values()) == {"SUCCESS"}, results
    _, probs = cpu_backend._forward_op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in arguments])
    backward_arguments = (torch.randn(probs.shape[:2] + (7,)), torch.randn_like(probs),
                          *[t.detach() for t in case.inputs()],
                          None if case.extra_key_term is None else case.extra_key_term.detach(), case.index, probs,
                          case.causal, "auto", case.key_lengths)
    results = opcheck(cpu_backend._backward_op, backward_arguments, test_utils=("test_schema", "test_faketensor"))
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.slow
def test_compiled_layer_matches_eager_fullgraph():
    torch.manual_seed(0)
    layer = AdditiveAttention(6, 5, 7, backend="cpu")
    query, key = torch.randn(2, 4, 6), torch.randn(2, 5, 5)
    lengths = torch.tensor([5, 2])

    def loss(module):
        context, weights = module(query, key, key_lengths=lengths, need_weights=True)
        return context.square().mean() + weights.square().mean()

    eager = loss(layer)
    eager.backward()
    expected = {name: parameter.grad.clone() for name, parameter in layer.named_parameters()}
    layer.zero_grad()
    torch._dynamo.reset()
    compiled = loss(torch.compile(layer, fullgraph=True))
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    for name, parameter in layer.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-5, atol=1e-7)


def test_calls_from_several_python_threads():
    """numba's workqueue layer aborts the process on overlapping launches; the kernels hold the GIL, so calls from
    several Python threads (a data loader thread, a server) queue instead."""
    import threading

    case = random_case(4, 8, 16, 32, 8, mask="lengths", seed=13)
    expected, _ = additive_attention(*case.inputs(), key_lengths=case.key_lengths, backend="cpu")
    results, errors = [], []

    def worker():
        try:
            for _ in range(20):
                results.append(additive_attention(*case.inputs(), key_lengths=case.key_lengths, backend="cpu")[0])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 60
    for context in results:
        assert torch.equal(context, expected)
