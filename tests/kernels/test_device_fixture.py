"""Every Triton test builds its inputs on the one `triton_device` fixture (tests/conftest.py: CUDA when present, else
the CPU under the interpreter), so that the same tests run on a GPU instead of failing with "need CUDA tensors".

Checked on the source (an AST walk, so it needs no GPU): in the Triton test files, every `random_case(...)` and
`random_grad_scores(...)` inside a test passes `device=triton_device` and the test takes the fixture; nothing picks a
device by itself (`.cuda()`, `device="cuda"`, a module-level DEVICE, `skipif(not torch.cuda.is_available())`, which
the `gpu` marker replaces). The checker is itself tested on sources that break each rule.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
CHECKED = sorted({*TESTS.glob("kernels/test_*.py"), TESTS / "backends" / "test_triton_backend.py",
                  TESTS / "backends" / "test_triton_ops.py"})
INPUT_BUILDERS = ("random_case", "random_grad_scores")
#: Tests about CPU tensors as such (refused without the interpreter): they build CPU inputs on purpose.
CPU_ON_PURPOSE = {"test_cpu_tensors_without_interpreter_are_refused"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def device_violations(source: str) -> list[str]:
    """Where `source` (a test module) builds Triton inputs without the fixture, as "line: what" strings."""
    tree = ast.parse(source)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(_name(target) == "DEVICE" for target in node.targets):
            problems.append(f"{node.lineno}: a module-level DEVICE instead of the triton_device fixture")
        if isinstance(node, ast.Call) and _name(node.func) == "cuda" and isinstance(node.func, ast.Attribute):
            problems.append(f"{node.lineno}: .cuda() instead of .to(triton_device)")
        if isinstance(node, ast.keyword) and node.arg == "device" and isinstance(node.value, ast.Constant) \
                and str(node.value.value).startswith("cuda"):
            problems.append(f"{node.lineno}: device='cuda' instead of triton_device")
        if isinstance(node, ast.Call) and _name(node.func) == "skipif" and "is_available" in ast.unparse(node):
            problems.append(f"{node.lineno}: skipif(no CUDA) instead of @pytest.mark.gpu")
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")):
        takes_fixture = "triton_device" in {argument.arg for argument in function.args.args}
        for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
            if not isinstance(call.func, ast.Name) or call.func.id not in INPUT_BUILDERS:
                continue
            device = next((keyword.value for keyword in call.keywords if keyword.arg == "device"), None)
            if function.name in CPU_ON_PURPOSE and isinstance(device, ast.Constant) and device.value == "cpu":
                continue
            if not (isinstance(device, ast.Name) and device.id == "triton_device"):
                problems.append(f"{call.lineno}: {function.name} calls {call.func.id} without device=triton_device")
            elif not takes_fixture:
                problems.append(f"{call.lineno}: {function.name} does not take the triton_device fixture")
    return problems


@pytest.mark.parametrize("path", CHECKED, ids=lambda path: str(path.relative_to(TESTS)))
def test_triton_tests_take_their_device_from_the_fixture(path):
    assert not device_violations(path.read_text()), device_violations(path.read_text())


@pytest.mark.parametrize("source, expected", [
    ("def test_a(triton_device):\n    random_case(1, 2, 3, 4, 5)\n", "without device=triton_device"),
    ("def test_a():\n    random_case(1, 2, 3, 4, 5, device=triton_device)\n", "does not take"),
    ("def test_a(triton_device):\n    random_grad_scores(1, 2, 3, device='cpu')\n", "without device=triton_device"),
    ("DEVICE = 'cuda'\n", "module-level DEVICE"),
    ("def test_a():\n    x = torch.zeros(3).cuda()\n", ".cuda()"),
    ("def test_a():\n    x = torch.zeros(3, device='cuda')\n", "device='cuda'"),
    ("@pytest.mark.skipif(not torch.cuda.is_available(), reason='gpu')\ndef test_a():\n    pass\n", "skipif"),
])
def test_the_checker_catches_each_violation(source, expected):
    problems = device_violations(source)
    assert problems and expected in problems[0], problems


def test_the_checker_accepts_the_fixture_and_cpu_on_purpose():
    assert not device_violations("def test_a(x, triton_device):\n    random_case(1, 2, 3, 4, 5, device=triton_device)\n"
                                 "def test_cpu_tensors_without_interpreter_are_refused():\n"
                                 "    random_case(1, 2, 3, 4, 5, device='cpu')\n")


def test_the_fixture_is_the_gpu_when_there_is_one(triton_device):
    assert triton_device == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
