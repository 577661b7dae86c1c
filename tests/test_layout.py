"""The layout rules of docs/DESIGN.md ("Layout"), held against the import graph read from the source."""
from __future__ import annotations

import pytest

from benchmarks.layout import import_edges, module_files, private_attribute_uses

EDGES = import_edges()
MODULES = module_files()

#: Rings from the bottom up: a module may import modules of its own ring and of the rings below, never above.
RINGS = (
    ("attn_fast.kernels",),
    ("attn_fast.validation", "attn_fast.masking", "attn_fast.tolerances", "attn_fast.cpu_warmup"),
    ("attn_fast.backends",),
    ("attn_fast.functional",),
    ("attn_fast.nn",),
    ("attn_fast",),  # the package's __init__: the public names
    ("attn_fast.integrations",),  # swap_attention and the framework adapters: optional, imported by nobody below
    ("attn_fast.examples",),
    ("attn_fast.tools",),
)
BACKENDS = ("attn_fast.backends.reference", "attn_fast.backends.torch_backend", "attn_fast.backends.triton_backend",
            "attn_fast.backends.cpu_backend")


def ring_of(module: str) -> int:
    """Index in RINGS of the longest prefix that names `module` or a package above it."""
    best = None
    for index, prefixes in enumerate(RINGS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no ring"
    return best[0]


def test_the_graph_is_read():
    """The rules below are only as good as the graph: it must see the package and its known edges."""
    assert {"attn_fast.functional", "attn_fast.kernels.forward", "attn_fast.backends.common"} <= set(MODULES)
    pairs = {(edge.importer, edge.imported) for edge in EDGES}
    assert ("attn_fast.backends.triton_backend", "attn_fast.kernels.forward") in pairs
    assert ("attn_fast.functional", "attn_fast.validation") in pairs


@pytest.mark.parametrize("edge", EDGES, ids=lambda edge: f"{edge.importer}->{edge.imported}")
def test_imports_go_down_the_rings(edge):
    assert ring_of(edge.imported) <= ring_of(edge.importer), (
        f"{edge.importer} (line {edge.line}) imports {edge.imported}, which sits in a ring above it")


def test_no_backend_imports_another_backend():
    crossings = [edge for edge in EDGES
                 if edge.importer in BACKENDS and edge.imported in BACKENDS and edge.importer != edge.imported]
    assert not crossings, crossings


def application_of(module: str) -> str | None:
    """"seq2seq" or "captioning" for a module of that example application, else None (shared example modules)."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "examples" and parts[2] in ("seq2seq", "captioning"):
        return parts[2]
    return None


def test_the_example_applications_do_not_import_each_other():
    crossings = [edge for edge in EDGES
                 if None is not application_of(edge.importer) != application_of(edge.imported) is not None]
    assert not crossings, crossings


def test_no_private_name_is_used_from_another_module():
    private = [edge for edge in EDGES if any(name.startswith("_") for name in edge.names)]
    assert not private, private
    reached = private_attribute_uses()
    assert not reached, reached


def test_no_import_cycles():
    graph = {}
    for edge in EDGES:
        graph.setdefault(edge.importer, set()).add(edge.imported)
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for importer, imported in list(graph.items()):
        graph[importer] = {target for target in imported if not target.startswith(importer + ".")}
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
