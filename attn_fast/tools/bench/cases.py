"""A benchmark case = shape x dtype x mode x backend: the callable that is timed, and its correctness check.

Modes:
    forward           all T query rows in one call, no autograd (inference; `need_weights=False`)
    forward_backward  the same call with autograd, then `context.backward(grad_context)` with a fixed random
                      output gradient; the input gradients are cleared before every call
    decode_step       one decoder step: T = 1 query row against the shape's memory (key_proj [B, S, A] and
                      value [B, S, D] computed once), as `AdditiveAttention.step` calls the op; no autograd.
                      For a shape that already has T = 1 (tts_step) this is the same problem as its forward.
    prepared_step     the same single step (T = 1; tts_step's own shape) through a prepared memory, as
                      `AdditiveAttention.precompute` / `.step` run it: the memory is checked once and its keys
                      prepared once (`check_memory` chooses the tanh form, `prepare_key_exp` keeps e^{2 key_proj}
                      for the backends that use it), outside the timing; each timed call is
                      `additive_attention_on_memory` (metadata checks only). The eager row is the reference
                      backend through the same call; "compile" has no memory to prepare and times its plain step.

Backends:
    reference  the eager reference (`attn_fast.additive_attention_reference`, validated like every row):
               materializes [B, T, S, A], what Keras / OpenNMT / the PyTorch tutorial do. Every speed-up is
               relative to it.
    compile    `torch.compile(additive_attention_reference)`: compiled by the first call (timed apart, as
               `compile_s`), never inside the timing.
    torch      the memory-bounded chunked torch backend (`additive_attention(..., backend="torch")`).
    cpu        the fused CPU kernels compiled by numba (`backend="cpu"`), CPU only, when numba imports.
    triton     the fused Triton kernels (`backend="triton"`), CUDA only: on CPU they run only under the
               numpy interpreter, which is a test tool, not a backend worth a timing.
The library's backends are read from `attn_fast.validation.BACKENDS`, so a backend registered there gets a column
here; one that cannot run on the device (`backend_unusable_reason`) gets no rows, and the run says why.

Correct before timed: the first call of a case is compared with the float64 reference on the same (rounded)
inputs, with the tolerances of `attn_fast.tolerances`; a case that fails (wrong numbers or an exception, e.g. a
compiler error) is reported as failed, with the reason, and is not timed.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import torch

from attn_fast import validation
from attn_fast.backends import cpu_kernels
from attn_fast.functional import (
    additive_attention,
    additive_attention_on_memory,
    additive_attention_reference,
    check_memory,
    prepare_key_exp,
    prepare_score_weights,
)
from attn_fast.tolerances import forward_tolerance, gradient_tolerance, relative_error
from attn_fast.tools.bench.shapes import DTYPES, ProblemShape, get_shape, make_inputs

MODES = ("forward", "forward_backward", "decode_step", "prepared_step")
#: Modes whose problem is one decoder step (T = 1) whatever the shape's T.
SINGLE_STEP_MODES = ("decode_step", "prepared_step")
#: Column order of the library's backends; one registered later and not listed here comes after them.
LIBRARY_BACKEND_ORDER = ("torch", "cpu", "triton")


def registered_backends() -> tuple[str, ...]:
    """The bench's backends: the eager reference, torch.compile of it, then every backend of the library
    (`attn_fast.validation.BACKENDS`, less "auto" and "reference") in `LIBRARY_BACKEND_ORDER`."""
    library = [backend for backend in validation.BACKENDS if backend not in ("auto", "reference")]
    rank = {backend: position for position, backend in enumerate(LIBRARY_BACKEND_ORDER)}
    return ("reference", "compile", *sorted(library, key=lambda backend: rank.get(backend, len(rank))))


BACKENDS = registered_backends()
BACKEND_LABELS = {"reference": "eager", "compile": "compile(ref)"}


def backend_label(backend: str) -> str:
    """The table's name of a backend: "eager" and "compile(ref)" for the two baselines, else its own name."""
    return BACKEND_LABELS.get(backend, backend)
#: The float64 oracle of the correctness check materializes [rows, T, S, A] in float64 (three such tensors with
#: gradients); above this many bytes per tensor it runs on a prefix of the batch rows (the op is independent per
#: batch row, so the first rows' outputs and input gradients are checked exactly; dv, a sum over rows, is then
#: left out).
ORACLE_TENSOR_BYTES = 256 * 2**20


def backend_unusable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` is not timed on `device` (one line), or None when it is: Triton only on CUDA (on CPU it runs
    only in the interpreter, a test tool), the fused CPU kernels only on CPU and only when numba imports."""
    device = torch.device(device)
    if backend == "triton":
        if device.type != "cuda":
            return "the Triton kernels are timed on CUDA only (on CPU they run in the numpy interpreter, a test tool)"
        from attn_fast.functional import triton_unusable_reason

        return triton_unusable_reason(device)
    if backend == "cpu":
        if device.type != "cpu":
            return f"the fused CPU kernels take CPU tensors, not {device.type}"
        return cpu_kernels.unavailable_reason()
    return None


def backends_for(device: torch.device) -> tuple[str, ...]:
    """Backends worth timing on `device`, in column order (see `backend_unusable_reason`)."""
    return tuple(backend for backend in registered_backends() if backend_unusable_reason(backend, device) is None)


def skipped_backends(device: torch.device) -> dict[str, str]:
    """{backend: why it is not timed on `device`} for the registered backends that `backends_for` leaves out."""
    reasons = {backend: backend_unusable_reason(backend, device) for backend in registered_backends()}
    return {backend: reason for backend, reason in reasons.items() if reason is not None}


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """The names of one benchmark case — shape, dtype, mode, backend — and nothing else: no tensors and no callable
    (`PreparedCase` builds those), plain strings only, so that a memory subprocess can rebuild it from JSON. Not
    `attn_fast.tools.testing.AttentionCase`, which holds the input tensors of one problem."""

    shape_name: str
    dtype_name: str  # "fp32", "fp16", "bf16", "fp64"
    mode: str  # one of MODES
    backend: str  # one of registered_backends()

    @property
    def shape(self) -> ProblemShape:
        return get_shape(self.shape_name)

    @property
    def problem(self) -> ProblemShape:
        """The problem actually run: the shape, or its single step for `decode_step` and `prepared_step`."""
        return self.shape.decode_step() if self.mode in SINGLE_STEP_MODES else self.shape

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def key(self) -> str:
        return f"{self.shape_name}/{self.dtype_name}/{self.mode}/{self.backend}"

    @property
    def group(self) -> str:
        """The cases compared with each other (same problem, every backend)."""
        return f"{self.shape_name}/{self.dtype_name}/{self.mode}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_attention(backend: str, device: torch.device, mode: str = "forward"):
    """The attention function of `backend`, called as fn(query_proj, key_proj, value, v, key_lengths=...,
    **memory_options) -> (context, weights). For "compile", a fresh `torch.compile` of the reference (dynamo's
    caches are reset first, so that an earlier case's graphs, guards or automatic-dynamic decisions do not leak
    into this one). For `prepared_step`, the library's step against a checked memory (`additive_attention_on_memory`),
    which takes the memory's `tanh_form`, `key_exp` and `score_weights` (`memory_options`)."""
    if backend == "compile":
        torch._dynamo.reset()
        return torch.compile(additive_attention_reference)
    if backend not in registered_backends():
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(registered_backends())}")
    reason = backend_unusable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend {backend!r} is not timed on {device}: {reason}")
    if mode == "prepared_step":
        return functools.partial(additive_attention_on_memory, backend=backend)
    if backend == "reference":
        return additive_attention_reference
    return functools.partial(additive_attention, backend=backend)


def memory_options(backend: str, inputs) -> dict:
    """What `AdditiveAttention.precompute` keeps for the steps of `backend`, from the inputs' memory (an
    `AttentionCase`): the tanh form `check_memory` chooses (it validates the memory, values included, once), the
    prepared keys e^{2 key_proj} `prepare_key_exp` returns for that backend and the Triton backend's v pre-pass
    `prepare_score_weights` (each None where the backend has no use for it)."""
    tanh_form = check_memory(inputs.key_proj, inputs.value, inputs.v, key_lengths=inputs.key_lengths)
    with torch.no_grad():
        key_exp = prepare_key_exp(inputs.key_proj, tanh_form, backend)
    score_weights = prepare_score_weights(inputs.v, inputs.v.dtype, backend)
    return {"tanh_form": tanh_form, "key_exp": key_exp, "score_weights": score_weights}


class PreparedCase:
    """One `CaseSpec` made runnable on one device: its random inputs (`inputs`, an `AttentionCase`: query_proj
    [B, T, A], key_proj [B, S, A], value [B, S, D], v [A], key_lengths [B], with T = 1 for decode_step), the
    attention function of its backend (`attention`) and, for forward_backward, the fixed output gradient
    (`grad_context` [B, T, D]).

    `run()` is exactly what is timed: one forward (no autograd) or one forward + backward. After it,
    `last_context` [B, T, D] holds the output (and, for forward_backward, the inputs' `.grad` the gradients).
    """

    def __init__(self, spec: CaseSpec, device: torch.device | str, *, seed: int = 0, attention=None):
        """`attention`: an already built function of the case's backend (another input set of the same case
        shares it, so that a compiled graph is compiled once)."""
        self.spec = spec
        self.device = torch.device(device)
        self.with_grad = spec.mode == "forward_backward"
        self.inputs = make_inputs(spec.problem, spec.dtype, self.device, requires_grad=self.with_grad, seed=seed)
        # May raise (e.g. Triton on CPU): the case then fails with that reason.
        self.attention = (attention if attention is not None
                          else build_attention(spec.backend, self.device, spec.mode))
        # A prepared step's memory (tanh form, prepared keys) is built here, once, outside what is timed.
        self.memory_options = {}
        if spec.mode == "prepared_step" and spec.backend != "compile":
            self.memory_options = memory_options(spec.backend, self.inputs)
        self.grad_context = None
        if self.with_grad:
            generator = torch.Generator(device="cpu").manual_seed(seed + 1)
            batch, tgt_len, _, _, value_dim = spec.problem.sizes
            self.grad_context = torch.randn(batch, tgt_len, value_dim, generator=generator).to(self.device, spec.dtype)
        self.last_context: torch.Tensor | None = None

    def leaves(self) -> list[torch.Tensor]:
        return [tensor for tensor in self.inputs.inputs() if tensor.requires_grad]

    def run(self) -> None:
        inputs = self.inputs
        if self.with_grad:
            for tensor in self.leaves():
                tensor.grad = None  # a fresh gradient each call, as an optimizer's zero_grad(set_to_none) leaves
            context, _ = self.attention(*inputs.inputs(), key_lengths=inputs.key_lengths)
            context.backward(self.grad_context)
        else:
            with torch.no_grad():
                context, _ = self.attention(*inputs.inputs(), key_lengths=inputs.key_lengths, **self.memory_options)
        self.last_context = context


@dataclasses.dataclass
class CheckResult:
    """The first call's errors against the float64 reference; `first_call_s` includes compilation."""

    passed: bool
    errors: dict[str, float]
    tolerances: dict[str, float]
    checked_rows: int
    first_call_s: float


def oracle_rows(spec: CaseSpec) -> int:
    """How many batch rows the float64 oracle covers (all of them unless its 4-D tensor would be too large)."""
    problem = spec.problem
    per_row = problem.tanh_elements // problem.batch * 8
    return max(1, min(problem.batch, ORACLE_TENSOR_BYTES // per_row))


def check_case(prepared: PreparedCase) -> CheckResult:
    """Run the case once (the compile call, for "compile") and compare with the float64 reference.

    Forward: relative error of the context. Forward + backward: also of d query_proj, d key_proj, d value and
    (when every row is checked) d v, from the same output gradient. Errors are ||out - ref|| / ||ref||."""
    spec = prepared.spec
    if prepared.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    prepared.run()
    if prepared.device.type == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start

    rows = oracle_rows(spec)
    inputs = prepared.inputs
    names = ("query_proj", "key_proj", "value", "v")
    oracle = {}
    for name, tensor in zip(names, inputs.inputs()):
        exact = (tensor if name == "v" else tensor[:rows]).detach().to(torch.float64)
        oracle[name] = exact.requires_grad_(prepared.with_grad)
    with torch.set_grad_enabled(prepared.with_grad):
        expected, _ = additive_attention_reference(*(oracle[name] for name in names),
                                                   key_lengths=inputs.key_lengths[:rows])
    errors = {"context": relative_error(prepared.last_context[:rows], expected)}
    tolerances = {"context": forward_tolerance(spec.dtype)}
    if prepared.with_grad:
        expected.backward(prepared.grad_context[:rows].to(torch.float64))
        for name, tensor in zip(names, inputs.inputs()):
            if name == "v" and rows < spec.problem.batch:
                continue  # dv sums over every batch row; the prefix cannot check it
            actual = tensor.grad if name == "v" else tensor.grad[:rows]
            errors[f"grad_{name}"] = relative_error(actual, oracle[name].grad)
            tolerances[f"grad_{name}"] = gradient_tolerance(spec.dtype)
    passed = all(errors[name] <= tolerances[name] for name in errors)
    return CheckResult(passed, errors, tolerances, rows, first_call_s)


def case_specs(shape_names, dtype_names, modes, backends) -> list[CaseSpec]:
    """Every combination, in a stable order (shape, dtype, mode, backend), skipping `decode_step` for shapes that
    already have T = 1 (their forward is the decode step; `prepared_step` is kept: it is the step through a
    prepared memory)."""
    specs = []
    for shape_name in shape_names:
        for dtype_name in dtype_names:
            for mode in modes:
                if mode == "decode_step" and get_shape(shape_name).tgt_len == 1:
                    continue
                for backend in backends:
                    specs.append(CaseSpec(shape_name, dtype_name, mode, backend))
    return specs
