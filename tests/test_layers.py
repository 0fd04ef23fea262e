"""The package's layers are folders that import only downward (docs/architecture.md), and only the glue imports
Lightning. Every import counts: at the top, inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_selfish"

#: Layer of each folder, bottom first; a module may import its own folder and folders of a lower layer. The
#: package's top level (``__init__``, ``export``, ``inference``, the documented re-exports) may import any of them.
LAYERS = {"method": 0, "core": 1, "run": 2, "optim": 2, "analysis": 2, "callbacks": 3}
TOP = 4
LIGHTNING = ("pytorch_lightning", "lightning")
GLUE = "callbacks"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module of the package and every outside top-level package that ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {_resolve(target) for target in found}


def _resolve(target: str) -> str:
    """The package's module an import names (its longest prefix that is one), or the outside top-level package."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return parts[0]


GRAPH = {name: {t for t in _imports(name) if t in MODULES and t != name} for name in MODULES}


def _layer(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return LAYERS[parts[1]], parts[1]
    return TOP, ""


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_parser_sees_imports_under_type_checking_and_in_functions() -> None:
    """(The checks below are only as good as this: a TYPE_CHECKING import is an edge too.)"""
    assert "lightning_selfish.method.parts" in GRAPH["lightning_selfish.method.catalogue"]
    assert "lightning_selfish.core.gates" in GRAPH["lightning_selfish.callbacks.sparsity"]
    assert len(MODULES) > 25


def test_no_import_cycle_counting_type_checking_imports() -> None:
    assert _cycle() is None, f"import cycle: {' -> '.join(_cycle() or [])}"


def test_every_layer_imports_only_its_own_folder_or_lower_layers() -> None:
    upward = []
    for name, targets in GRAPH.items():
        rank, folder = _layer(name)
        for target in targets:
            target_rank, target_folder = _layer(target)
            if target_folder != folder and target_rank >= rank:
                upward.append(f"{name} -> {target}")
    assert not upward, f"imports that do not go down a layer: {sorted(upward)}"


def test_only_the_glue_folder_imports_lightning() -> None:
    offenders = sorted(
        name
        for name in MODULES
        if _layer(name)[1] != GLUE and name != "lightning_selfish" and set(_imports(name)) & set(LIGHTNING)
    )
    assert not offenders, f"modules outside lightning_selfish/{GLUE}/ that import Lightning: {offenders}"


def test_every_module_of_the_package_comes_from_this_tree() -> None:
    """An editable install of another checkout answers for a module this tree no longer has (a moved one): every
    ``lightning_selfish`` module imported in this session must be a file of the tree under test."""
    import importlib
    import sys

    for name in MODULES:
        importlib.import_module(name)
    elsewhere = sorted(
        name
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "lightning_selfish"
        and getattr(module, "__file__", None)
        and not Path(module.__file__).resolve().is_relative_to(PACKAGE)
    )
    assert not elsewhere, f"modules imported from outside {PACKAGE}: {elsewhere}"
