"""The import graph of the library's own code, read from the source (nothing is imported or run).

    python -m benchmarks.layout        # files, lines and internal import edges (benchmarks/NOTES.md quotes it)

tests/test_layout.py holds the rules of docs/DESIGN.md ("Layout") against this graph: rings, no cycles, no
backend importing another, no private name imported across modules.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Source folders of the installed package: kernels/ is installed as attn_fast.kernels (setup.py's package_dir).
PACKAGE_FOLDERS = {"attn_fast": "attn_fast", "kernels": "attn_fast.kernels"}


@dataclasses.dataclass(frozen=True)
class ImportEdge:
    """`importer` imports `imported` (both dotted module names); `names` are the names it takes from it."""

    importer: str
    imported: str
    names: tuple[str, ...]
    line: int


def module_files(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every module of the package (tests and benchmarks are not in it)."""
    modules = {}
    for folder, package in PACKAGE_FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute name of `from <level dots><module> import ...` written in module `importer`."""
    if level == 0:
        return module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_edges(root: pathlib.Path = ROOT) -> list[ImportEdge]:
    """Every import of one package module by another, wherever it stands (module level or inside a function)."""
    modules = module_files(root)
    edges = []
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(importer, is_package, node.module, node.level)
                targets = []
                for alias in node.names:  # `from package import module` imports the module itself
                    submodule = f"{base}.{alias.name}"
                    targets.append((submodule, ()) if submodule in modules else (base, (alias.name,)))
            else:
                continue
            for target, names in targets:
                while target and target not in modules:  # attn_fast.x.y -> the module that defines it
                    target = target.rpartition(".")[0]
                if target and target != importer:
                    edges.append(ImportEdge(importer, target, names, node.lineno))
    return edges


def private_attribute_uses(root: pathlib.Path = ROOT) -> list[ImportEdge]:
    """`module._name` reads, where `module` is another package module imported under that name: a private name
    reached through the module instead of imported (e.g. `from . import forward as fwd; fwd._sm_count(...)`)."""
    modules = module_files(root)
    uses = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        aliases = {}  # local name -> module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(importer, is_package, node.module, node.level)
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                uses.append(ImportEdge(importer, aliases[node.value.id], (node.attr,), node.lineno))
    return uses


def layout_figures(root: pathlib.Path = ROOT) -> dict[str, int]:
    """Python files and lines of the package, benchmarks/ included (tests excluded), and internal import edges."""
    files = list(module_files(root).values()) + sorted((root / "benchmarks").glob("*.py"))
    pairs = {(edge.importer, edge.imported) for edge in import_edges(root)}
    return {
        "files": len(files),
        "lines": sum(len(path.read_text().splitlines()) for path in files),
        "import_edges": len(pairs),
    }


def main() -> None:
    figures = layout_figures()
    print(f"{figures['files']} Python files, {figures['lines']} lines (package and benchmarks/, tests excluded), "
          f"{figures['import_edges']} internal import edges between package modules")


if __name__ == "__main__":
    main()
