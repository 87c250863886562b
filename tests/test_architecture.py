"""The layout keeps its promises (docs/architecture.md): no import cycles, even behind function-level imports;
dependencies point one way between the subpackages; only the napari shell imports Qt or napari; the package's
top level stays small; no function grows past 100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "napari_meddiff"
# from the top down: a subpackage may import those on its own level or below, never above
LAYERS = [
    {"cli", "_napari"},
    {"training", "review", "audit"},
    {"tasks", "testing"},
    {"diffusion", "autoencoder"},
    {"models", "data"},
    {"io"},
    {"runtime", "choices", "errors"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in a file (function-level imports too; TYPE_CHECKING ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name in modules:
                found.add(name)
                break
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return [*path, module, dep]
            if dep not in state and (cycle := visit(dep, [*path, module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert (cycle := visit(module, [])) is None, " -> ".join(cycle)


def test_dependencies_point_down():
    level = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = []
    for module, deps in _graph().items():
        own = level.get(_subpackage(module))
        for dep in deps:
            theirs = level.get(_subpackage(dep))
            if own is not None and theirs is not None and theirs < own:
                upward.append(f"{module} imports {dep}")
    assert not upward, upward
    assert set(level) >= {_subpackage(m) for m in _modules()} - {""}, "a subpackage missing from LAYERS"


def test_only_the_napari_shell_imports_qt():
    offenders = []
    for module, path in _modules().items():
        if _subpackage(module) == "_napari":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{module}: {n}" for n in names if n.split(".")[0] in ("qtpy", "PyQt5", "PyQt6", "napari")]
    assert not offenders, offenders


def test_a_small_top_level_and_short_functions():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_the_readme_stays_a_guide():
    """The README is a user guide of at most 200 lines; figures and history live in docs/."""
    readme = PACKAGE.parent / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
    assert all(
        (PACKAGE.parent / "docs" / name).is_file() for name in ("architecture.md", "performance.md", "training.md")
    )
