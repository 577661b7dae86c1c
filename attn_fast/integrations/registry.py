"""The adapter registry behind `swap_attention`, and the report it returns.

An adapter recognizes one framework's attention module and builds its attn-fast-backed replacement:

    adapter(module: nn.Module, *, backend: str) -> nn.Module | str | None

    an nn.Module  the replacement (same parameter names and shapes, call signature, return values and state);
    a str         the module is recognized, but uses an option the replacement does not support: the reason;
    None          not recognized: the next adapter is tried.

Adapters are tried in registration order, so a framework registers its most specific adapters first. An adapter
written as `adapter(module)` (no `backend` keyword) is accepted too: it then builds its replacement with the
default backend ("auto").
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

#: What an adapter returns: the replacement, the reason the module is left as it is, or None (not recognized).
AdapterResult = nn.Module | str | None
Adapter = Callable[..., AdapterResult]


@dataclass(frozen=True)
class Swapped:
    """A module replaced in place: its dotted `path` in the model ("" for the model itself), the class names of
    the `original` and of its `replacement`."""

    path: str
    original: str
    replacement: str


@dataclass(frozen=True)
class Skipped:
    """A module recognized as attention but left as it is: its dotted `path`, `original` class name, and the
    `reason` (an option the replacement does not support, an unknown subclass, ...)."""

    path: str
    original: str
    reason: str


@dataclass
class SwapReport:
    """What `swap_attention` replaced (`swapped`) and what it recognized but left (`skipped`), in model order."""

    swapped: list[Swapped] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing recognized was left unswapped."""
        return not self.skipped

    def __str__(self) -> str:
        rows = [("status", "path", "original", "replacement / reason")]
        rows += [("swapped", entry.path or "<model>", entry.original, entry.replacement) for entry in self.swapped]
        rows += [("skipped", entry.path or "<model>", entry.original, entry.reason) for entry in self.skipped]
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        lines = [f"swap_attention: {len(self.swapped)} swapped, {len(self.skipped)} skipped"]
        if len(rows) > 1:
            for number, row in enumerate(rows):
                lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
                if number == 0:
                    lines.append("  ".join("-" * width for width in widths) + "  " + "-" * len(row[3]))
        return "\n".join(line.rstrip() for line in lines)


@dataclass(frozen=True)
class RegisteredAdapter:
    """One entry of the registry: the `framework` it belongs to (shown nowhere but in `registered_adapters`)."""

    framework: str
    adapter: Adapter
    takes_backend: bool


_ADAPTERS: list[RegisteredAdapter] = []


def _accepts_backend(adapter: Adapter) -> bool:
    """Whether `adapter` can be called with a `backend=` keyword."""
    try:
        parameters = inspect.signature(adapter).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: call them the plain way
        return False
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD
               or (parameter.name == "backend" and parameter.kind is not inspect.Parameter.POSITIONAL_ONLY)
               for parameter in parameters)


def register_adapter(framework: str, adapter: Adapter) -> None:
    """Add `adapter` for `framework` (e.g. "speechbrain") after the adapters already registered.

    Registering the same callable twice is a no-op, so re-importing an adapter module does not duplicate it.
    """
    if not isinstance(framework, str) or not framework:
        raise ValueError(f"framework must be a non-empty str, got {framework!r}")
    if not callable(adapter):
        raise TypeError(f"adapter must be callable, got {type(adapter).__name__}")
    if any(entry.adapter is adapter for entry in _ADAPTERS):
        return
    _ADAPTERS.append(RegisteredAdapter(framework, adapter, _accepts_backend(adapter)))


def unregister_adapter(adapter: Adapter) -> bool:
    """Remove `adapter` from the registry; False when it was not registered."""
    for position, entry in enumerate(_ADAPTERS):
        if entry.adapter is adapter:
            del _ADAPTERS[position]
            return True
    return False


def registered_adapters() -> tuple[RegisteredAdapter, ...]:
    """The registry, in the order the adapters are tried."""
    return tuple(_ADAPTERS)


def adapt(module: nn.Module, backend: str) -> tuple[str, AdapterResult]:
    """Ask the adapters in order; the first that recognizes `module` answers. Returns (framework, result), with
    ("", None) when none recognizes it."""
    for entry in _ADAPTERS:
        result = entry.adapter(module, backend=backend) if entry.takes_backend else entry.adapter(module)
        if result is None:
            continue
        if not isinstance(result, (nn.Module, str)):
            raise TypeError(f"the {entry.framework} adapter {getattr(entry.adapter, '__name__', entry.adapter)!r} "
                            f"returned {type(result).__name__}; it must return an nn.Module, a str or None")
        return entry.framework, result
    return "", None


def recognize(module: nn.Module, framework_module: str, class_name: str) -> str | None:
    """How `module` relates to the framework class `framework_module.class_name`, without importing the framework
    (a model that holds its modules has imported it already; importing it here could fail or be slow):

        "class"      an instance of that very class;
        "structure"  an instance of another class of the same name (a vendored copy of the framework's code, or
                     the framework loaded under another module path): the adapter must check its structure;
        "subclass"   a subclass (of the class, or of a class of that name): its forward may differ, never swapped;
        None         unrelated.
    """
    framework = sys.modules.get(framework_module)
    framework_class = getattr(framework, class_name, None) if framework is not None else None
    if isinstance(framework_class, type) and isinstance(module, framework_class):
        return "class" if type(module) is framework_class else "subclass"
    if type(module).__name__ == class_name:
        return "structure"
    if any(ancestor.__name__ == class_name for ancestor in type(module).__mro__[1:]):
        return "subclass"
    return None


def qualified_name(cls: type) -> str:
    """`module.Class`, as a report names a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def adopt_submodules(replacement: nn.Module, original: nn.Module) -> None:
    """Make `replacement` hold the original's own parameters, buffers and child modules, the very objects, under
    the same names and in the same order: state_dict keys and order, `parameters()` order, and an optimizer
    built before the swap (it holds the Parameter objects) all stay valid."""
    for name, parameter in original.named_parameters(recurse=False):
        replacement.register_parameter(name, parameter)
    saved = original.state_dict(keep_vars=True)  # a buffer of the module's own is saved under its bare name
    for name, buffer in original.named_buffers(recurse=False):
        replacement.register_buffer(name, buffer, persistent=name in saved)
    for name, child in original.named_children():
        replacement.add_module(name, child)


def linear_shape(module: nn.Module, name: str, *, bias: bool | None) -> tuple[int, int] | str:
    """(in_features, out_features) of child `name` when it is a plain nn.Linear (with a bias when `bias` is
    True, without when False, either when None), else the reason it is not."""
    child = getattr(module, name, None)
    if type(child) is not nn.Linear:
        return f"{name} is {type(child).__name__}, not nn.Linear"
    if bias is True and child.bias is None:
        return f"{name} has no bias"
    if bias is False and child.bias is not None:
        return f"{name} has a bias"
    return child.in_features, child.out_features
