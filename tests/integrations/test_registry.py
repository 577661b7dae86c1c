"""swap_attention's walk, registry and report, with a toy adapter (no framework needed): paths, shared modules,
the root, strict mode, training mode, the backend passed through, and adapters that answer wrongly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attn_fast
from attn_fast.integrations import (
    Skipped,
    Swapped,
    SwapReport,
    register_adapter,
    registered_adapters,
    replacement_for,
    swap_attention,
    unregister_adapter,
)


class ToyAttention(nn.Module):
    """Stands for a framework's attention module; `unsupported` stands for an option the replacement lacks."""

    def __init__(self, unsupported: bool = False):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.unsupported = unsupported


class ToyReplacement(nn.Module):
    def __init__(self, original: ToyAttention, backend: str):
        super().__init__()
        self.proj, self.backend = original.proj, backend


def toy_adapter(module: nn.Module, *, backend: str = "auto"):
    if not isinstance(module, ToyAttention):
        return None
    return "the unsupported option" if module.unsupported else ToyReplacement(module, backend)


@pytest.fixture
def toy():
    register_adapter("toy", toy_adapter)
    yield
    assert unregister_adapter(toy_adapter)


def test_builtin_adapters_are_registered():
    frameworks = [entry.framework for entry in registered_adapters()]
    assert "speechbrain" in frameworks and "opennmt" in frameworks


def test_swaps_in_place_at_every_path(toy):
    model = nn.Sequential(nn.Linear(3, 3), nn.ModuleDict({"attn": ToyAttention(), "layers": nn.ModuleList(
        [nn.ReLU(), ToyAttention()])}))
    report = swap_attention(model, backend="reference")
    assert report == SwapReport(swapped=[Swapped("1.attn", "ToyAttention", "ToyReplacement"),
                                         Swapped("1.layers.1", "ToyAttention", "ToyReplacement")], skipped=[])
    assert report.ok
    assert type(model[1]["attn"]) is ToyReplacement and type(model[1]["layers"][1]) is ToyReplacement
    assert model[1]["attn"].backend == "reference"
    assert swap_attention(model) == SwapReport()  # nothing left to swap


def test_a_shared_module_gets_one_replacement(toy):
    shared = ToyAttention()
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    report = swap_attention(model)
    assert [entry.path for entry in report.swapped] == ["a", "b.0"]
    assert model["a"] is model["b"][0] and type(model["a"]) is ToyReplacement
    assert len(list(model.parameters())) == 2  # still one weight and one bias


def test_training_mode_is_kept(toy):
    model = nn.ModuleDict({"attn": ToyAttention()}).eval()
    swap_attention(model)
    assert not model["attn"].training


def test_strict_refuses_and_changes_nothing(toy):
    model = nn.ModuleDict({"good": ToyAttention(), "bad": ToyAttention(unsupported=True)})
    with pytest.raises(ValueError, match=r"1 attention module\(s\) cannot be swapped, nothing was changed:\n"
                                         r"  bad \(ToyAttention\): the unsupported option"):
        swap_attention(model, strict=True)
    assert type(model["good"]) is ToyAttention
    report = swap_attention(model)
    assert report.skipped == [Skipped("bad", "ToyAttention", "the unsupported option")] and not report.ok
    assert type(model["good"]) is ToyReplacement and type(model["bad"]) is ToyAttention


def test_the_root_is_reported_and_replacement_for_builds_it(toy):
    model = ToyAttention()
    report = swap_attention(model)
    assert report.swapped == [] and report.skipped[0].path == "" and "replacement_for" in report.skipped[0].reason
    replacement = replacement_for(model.eval(), backend="torch")
    assert type(replacement) is ToyReplacement and replacement.backend == "torch" and not replacement.training
    assert replacement_for(nn.Linear(2, 2)) is None


def test_the_report_reads_as_a_table():
    report = SwapReport([Swapped("decoder.attn", "ContentBasedAttention", "FusedContentBasedAttention")],
                        [Skipped("decoder.copy", "GlobalAttention", "attn_type='dot' is Luong attention")])
    lines = str(report).splitlines()
    assert lines[0] == "swap_attention: 1 swapped, 1 skipped"
    assert lines[1].split() == ["status", "path", "original", "replacement", "/", "reason"]
    assert lines[3].split() == ["swapped", "decoder.attn", "ContentBasedAttention", "FusedContentBasedAttention"]
    assert lines[4].startswith("skipped  decoder.copy  GlobalAttention")
    assert lines[4].endswith("attn_type='dot' is Luong attention")
    # The columns line up: each row's third and fourth cells start where the header's do.
    third, fourth = lines[1].index("original"), lines[1].index("replacement")
    assert lines[3][third:].startswith("ContentBasedAttention") and lines[4][third:].startswith("GlobalAttention")
    assert lines[3][fourth:] == "FusedContentBasedAttention"
    assert str(SwapReport()) == "swap_attention: 0 swapped, 0 skipped"


def test_attn_fast_modules_are_never_handed_to_adapters():
    seen = []

    def spy(module, *, backend="auto"):
        seen.append(type(module).__name__)
        return None

    register_adapter("spy", spy)
    try:
        swap_attention(nn.Sequential(attn_fast.AdditiveAttention(4, 4, 4), nn.Linear(2, 2)))
    finally:
        unregister_adapter(spy)
    assert seen == ["Sequential", "Linear"]


def test_adapters_without_a_backend_keyword_and_registration_order():
    calls = []

    def plain(module):
        calls.append("plain")
        return None

    def second(module, *, backend="auto"):
        calls.append(f"second:{backend}")
        return None

    register_adapter("plain", plain)
    register_adapter("plain", plain)  # a second registration is a no-op
    register_adapter("second", second)
    try:
        swap_attention(nn.Sequential(), backend="torch")
        assert calls == ["plain", "second:torch"]
    finally:
        assert unregister_adapter(plain) and unregister_adapter(second) and not unregister_adapter(plain)


def test_a_wrong_answer_from_an_adapter_is_an_error():
    def broken(module):
        return 42

    register_adapter("broken", broken)
    try:
        with pytest.raises(TypeError, match="returned int; it must return an nn.Module, a str or None"):
            swap_attention(nn.Linear(2, 2))
    finally:
        unregister_adapter(broken)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        swap_attention(torch.zeros(2))
    with pytest.raises(ValueError, match="backend"):
        swap_attention(nn.Linear(2, 2), backend="fastest")
    with pytest.raises(ValueError, match="framework"):
        register_adapter("", toy_adapter)
    with pytest.raises(TypeError, match="callable"):
        register_adapter("toy", 3)
