"""The Triton backend's torch.library ops (`attn_fast::triton_forward`, `attn_fast::triton_tanh_pass`) on CPU, under
the Triton interpreter: opcheck's five checks, torch.compile(fullgraph=True) against eager and the float64
reference, and the kernel source Inductor re-emits for a user Triton kernel compiled offline for sm_90.

TEST-ONLY CONFIGURATION (issue 12, point 10). A `triton_op` runs its launcher as its own fake kernel; under the
interpreter the kernels are not wrapped by `wrap_triton`, so they would run on fake tensors. `kernels/launch.py`
skips launches on fake tensors **only while** `torch._functorch.config.decompose_custom_triton_ops` is False, which
the `opaque_triton_ops` fixture below sets for these tests alone. Never one without the other: with the flag on
(torch's default) AOT tracing decomposes the op through the launcher, and a skipped launch would silently drop the
kernel from the compiled graph. The library never changes the flag.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.library import opcheck

import attn_fast
from attn_fast.tolerances import forward_tolerance, gradient_tolerance, relative_error
from attn_fast.tools.testing import random_case

triton_backend = pytest.importorskip("attn_fast.backends.triton_backend")

REPOSITORY = Path(__file__).resolve().parents[2]
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
              "test_aot_dispatch_dynamic")

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def opaque_triton_ops(monkeypatch):
    """Test-only: keep the triton ops opaque to AOT tracing, which is what makes skipping launches on fake tensors
    correct (see the module docstring). Restored after each test."""
    import torch._functorch.config as functorch_config

    monkeypatch.setattr(functorch_config, "decompose_custom_triton_ops", False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_case(triton_device, seed=2):
    return random_case(3, 4, 9, 6, 5, mask="mixed", beam=2, extra_key_term=True, device=triton_device, seed=seed)


def forward_arguments(case) -> tuple:
    leaves = case.cast(torch.float32, requires_grad=True)
    return (*leaves.inputs(), leaves.extra_key_term, leaves.key_lengths, leaves.key_padding_mask, leaves.index,
            leaves.causal, True)


def recorded_tanh_pass_arguments(case, monkeypatch) -> tuple:
    """The arguments the backward really passes to the tanh-pass op (whatever its signature), detached: that op
    is itself a backward and has no autograd formula of its own."""
    calls = []
    original = triton_backend._tanh_pass_op

    def record(*arguments):
        calls.append(arguments)
        return original(*arguments)

    monkeypatch.setattr(triton_backend, "_tanh_pass_op", record)
    leaves = case.cast(torch.float32, requires_grad=True)
    context, weights = attn_fast.additive_attention(*leaves.inputs(), **leaves.options(), need_weights=True,
                                                    backend="triton")
    (context.sum() + weights.square().sum()).backward()
    monkeypatch.setattr(triton_backend, "_tanh_pass_op", original)
    assert len(calls) == 1
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in calls[0])


# ----------------------------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.slow
def test_opcheck_forward_op_all_five_checks(triton_device):
    results = opcheck(triton_backend._forward_op, forward_arguments(small_case(triton_device)), test_utils=ALL_CHECKS)
    assert results == dict.fromkeys(ALL_CHECKS, "SUCCESS"), results


@pytest.mark.slow
def test_opcheck_forward_op_with_prepared_score_weights(triton_device):
    """The op's optional `score_weights` input (a decoding memory's prepared v pre-pass): forward-only, no
    gradient, the same five checks."""
    from attn_fast.kernels.forward import prepare_score_weights

    arguments = forward_arguments(small_case(triton_device))
    score_weights = prepare_score_weights(arguments[3].detach(), torch.float32)
    results = opcheck(triton_backend._forward_op, (*arguments, None, score_weights), test_utils=ALL_CHECKS)
    assert results == dict.fromkeys(ALL_CHECKS, "SUCCESS"), results


@pytest.mark.slow
def test_opcheck_tanh_pass_op_all_five_checks(triton_device, monkeypatch):
    arguments = recorded_tanh_pass_arguments(small_case(triton_device, seed=3), monkeypatch)
    results = opcheck(triton_backend._tanh_pass_op, arguments, test_utils=ALL_CHECKS)
    assert results == dict.fromkeys(ALL_CHECKS, "SUCCESS"), results


def test_fake_tensors_launch_nothing_only_with_opaque_ops(triton_device, monkeypatch):
    """The guard itself: under FakeTensorMode the op gives shapes (no kernel runs) with the flag off; with torch's
    default (flag on) nothing is skipped, so a mis-configured trace fails loudly instead of dropping kernels."""
    import torch._functorch.config as functorch_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attn_fast.kernels import launch

    case = small_case(triton_device)
    decisions = []
    shapes_only = launch._shapes_only

    def spy(launches):
        decisions.append(shapes_only(launches))
        return decisions[-1]

    monkeypatch.setattr(launch, "_shapes_only", spy)

    def call_on_fake_tensors():
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in forward_arguments(case)]
            return triton_backend._forward_op(*fake)

    context, probs = call_on_fake_tensors()
    assert context.shape == (6, 4, 5) and probs.shape == (6, 4, 9)
    assert decisions and all(decisions)

    monkeypatch.setattr(functorch_config, "decompose_custom_triton_ops", True)
    decisions.clear()
    if launch.is_interpreter():  # the unwrapped interpreter kernels really run on the fake tensors, and fail
        with pytest.raises(Exception):  # noqa: B017
            call_on_fake_tensors()
    else:  # on CUDA wrap_triton's traced launch does nothing on fake tensors by itself
        call_on_fake_tensors()
    assert decisions and not any(decisions)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the public API on the Triton backend


def attend(query_proj, key_proj, value, v, **options):
    context, weights = attn_fast.additive_attention(query_proj, key_proj, value, v, **options, need_weights=True,
                                                    backend="triton")
    return context, weights


def run_with_gradients(function, case, grad_context, grad_weights):
    leaves = case.cast(torch.float32, requires_grad=True)
    context, weights = function(*leaves.inputs(), **leaves.options())
    ((context * grad_context).sum() + (weights * grad_weights).sum()).backward()
    return context.detach(), weights.detach(), {name: t.grad for name, t in leaves.float_tensors().items()}


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_matches_eager_and_reference(backend, dynamic, triton_device):
    case = small_case(triton_device, seed=4)
    generator = torch.Generator().manual_seed(5)
    grad_context = torch.randn(6, 4, 5, generator=generator).to(triton_device)
    grad_weights = torch.randn(6, 4, 9, generator=generator).to(triton_device)

    eager = run_with_gradients(attend, case, grad_context, grad_weights)
    compiled = run_with_gradients(torch.compile(attend, backend=backend, fullgraph=True, dynamic=dynamic), case,
                                  grad_context, grad_weights)
    reference = run_with_gradients(
        functools.partial(attn_fast.additive_attention, need_weights=True, backend="reference"),
        case.cast(torch.float64), grad_context.double(), grad_weights.double())

    for got, want, expected in zip(compiled[:2], eager[:2], reference[:2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert relative_error(got, expected) <= forward_tolerance(torch.float32)
    for name, grad in compiled[2].items():
        torch.testing.assert_close(grad, eager[2][name], rtol=1e-4, atol=1e-6, msg=name)
        assert relative_error(grad, reference[2][name]) <= gradient_tolerance(torch.float32), name


# ----------------------------------------------------------------------------------------------------------------
# the kernel source Inductor re-emits, compiled for sm_90

SM90_SCRIPT = """
import dataclasses, importlib.util, pathlib, sys, tempfile
import torch
from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
from benchmarks import static_report

shape = static_report.SHAPES["caption"]
dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
targets = (static_report.forward_compile_targets([shape], dtypes)
           + static_report.backward_compile_targets([static_report.SHAPES["nmt_train"]], {"fp32": torch.float32}))
folder = pathlib.Path(tempfile.mkdtemp())
emitted = {}
for use, launch in targets:
    kernel = launch.kernel
    if kernel.__name__ not in emitted:
        # What Inductor's wrapper splices into its output module for a user-defined (wrap_triton) kernel.
        source = user_defined_triton_kernel_transitive_closure_source_code(kernel)
        path = folder / f"reemitted_{kernel.__name__}.py"
        path.write_text("import triton\\nimport triton.language as tl\\n\\n@triton.jit\\n" + source + "\\n")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        emitted[kernel.__name__] = getattr(module, kernel.__name__)
        assert emitted[kernel.__name__] is not kernel
    compiled = static_report.compile_launch(dataclasses.replace(launch, kernel=emitted[kernel.__name__]), arch=90)
    assert compiled.asm["cubin"], use
    print("compiled", use, kernel.__name__)
print("kernels", len(emitted))
"""


@pytest.mark.slow
def test_inductor_reemitted_kernel_source_compiles_for_sm90():
    """Inductor re-emits a wrap_triton kernel's source (and its transitive @triton.jit helpers and constexpr
    globals) into its output module; that text must compile for sm_90 on its own. Compiling needs a process without
    TRITON_INTERPRET (triton decides at @jit time), as benchmarks/static_report.py does."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    finished = subprocess.run([sys.executable, "-c", SM90_SCRIPT], cwd=REPOSITORY, env=environment,
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "compiled caption/fp32" in finished.stdout and "compiled caption/bf16" in finished.stdout
    assert "_attention_backward_kernel" in finished.stdout
