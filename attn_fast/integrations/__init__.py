"""Drop attn-fast into an existing toolkit's model: `swap_attention(model)` replaces, in place, every attention
module it recognizes by an attn-fast-backed module with the same parameter names and shapes (the framework's
checkpoints load and save unchanged), call signature, return values and per-sequence state.

    from attn_fast.integrations import swap_attention
    report = swap_attention(model)          # SwapReport: what was swapped, what was recognized but left
    print(report)

Importing this package registers the built-in adapters (SpeechBrain, OpenNMT-py, NVIDIA Tacotron-2, Coqui TTS);
none of them imports its framework at import time, so the frameworks stay optional.
"""
from __future__ import annotations

import importlib

from torch import nn

from attn_fast.integrations.registry import (
    Skipped,
    Swapped,
    SwapReport,
    adapt,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from attn_fast.validation import check_backend

__all__ = ["Skipped", "SwapReport", "Swapped", "register_adapter", "registered_adapters", "replacement_for",
           "swap_attention", "unregister_adapter"]

#: The modules that register the built-in adapters when imported, in the order their adapters are tried.
BUILTIN_ADAPTER_MODULES = ("speechbrain", "opennmt", "tacotron2", "coqui")


def _register_builtin_adapters() -> None:
    for name in BUILTIN_ADAPTER_MODULES:
        qualified = f"{__name__}.{name}"
        try:
            importlib.import_module(qualified)
        except ModuleNotFoundError as error:
            # An adapter module of this package not (yet) in the installed tree; any other missing module is a
            # real error of that adapter module and is raised.
            if error.name != qualified:
                raise


def _is_replacement(module: nn.Module) -> bool:
    """An attn-fast module (a replacement from an earlier swap, or the library's own layers): never swapped again.
    Structural recognition would otherwise match a replacement, which keeps the original's parameter names."""
    return type(module).__module__.split(".")[0] == "attn_fast"


def replacement_for(module: nn.Module, *, backend: str = "auto") -> nn.Module | str | None:
    """The attn-fast-backed replacement of one attention module (its training mode kept), the reason it is left
    (str), or None when no adapter recognizes it. Nothing is modified. For a model that is itself an attention
    module, which `swap_attention` cannot replace in place."""
    check_backend(backend)
    if _is_replacement(module):
        return None
    _, result = adapt(module, backend)
    if isinstance(result, nn.Module):
        result.train(module.training)
    return result


def swap_attention(model: nn.Module, *, backend: str = "auto", strict: bool = False) -> SwapReport:
    """Replace, in place, every attention module of `model` that an adapter recognizes.

    backend: the attn-fast backend of every replacement ("auto", "torch", "triton", "reference"; see
        `attn_fast.additive_attention`).
    strict: raise a ValueError listing the modules that were recognized but cannot be swapped (unsupported
        options, unknown subclasses), and then change nothing. Without it, those are left as they are and listed
        in the report's `skipped`: nothing is ever swapped partially without being reported.

    Modules are visited from the root down; a recognized module (swapped or skipped) is not searched further.
    A module held at several places is replaced by one replacement at each of them. Forward hooks registered on
    an original module are not carried over to its replacement. Returns a `SwapReport` (`report.ok`: nothing
    skipped; `print(report)`: a table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_backend(backend)
    report = SwapReport()
    # Plan every replacement first, so that strict mode can refuse before anything is modified.
    planned: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute name, replacement)
    decided: dict[int, nn.Module | str | None] = {}       # id(module) -> its adapter result, for shared modules

    def visit(module: nn.Module, path: str, parent: nn.Module | None, name: str) -> None:
        if _is_replacement(module):
            return
        if id(module) not in decided:
            decided[id(module)] = adapt(module, backend)[1]
            if isinstance(decided[id(module)], nn.Module):
                decided[id(module)].train(module.training)
        result = decided[id(module)]
        original = type(module).__name__
        if result is None:
            for child_name, child in module.named_children():
                visit(child, f"{path}.{child_name}" if path else child_name, module, child_name)
        elif isinstance(result, str):
            report.skipped.append(Skipped(path, original, result))
        elif parent is None:
            report.skipped.append(Skipped(path, original, "the model itself is the attention module and cannot be "
                                          "replaced in place: use attn_fast.integrations.replacement_for(model)"))
        else:
            planned.append((parent, name, result))
            report.swapped.append(Swapped(path, original, type(result).__name__))

    visit(model, "", None, "")
    if strict and report.skipped:
        listed = "\n".join(f"  {entry.path or '<model>'} ({entry.original}): {entry.reason}"
                           for entry in report.skipped)
        raise ValueError(f"swap_attention(strict=True): {len(report.skipped)} attention module(s) cannot be "
                         f"swapped, nothing was changed:\n{listed}")
    for parent, name, replacement in planned:
        setattr(parent, name, replacement)
    return report


_register_builtin_adapters()
