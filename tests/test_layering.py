"""The package's floors: imports (deferred ones too) only run downwards, and the CKA math stands
on its own. Read from the source, so a new arrow upwards fails here before it tangles."""

from __future__ import annotations

import ast

from tests.conftest import REPO

PACKAGE = REPO / "src" / "ckaflow"
# what `ckaflow.cka` (the estimators, partitions, Gram statistics, pairs) may import
MATH_MAY_IMPORT = {"ckaflow.devices", "ckaflow.errors"}
MATH_MUST_NOT_IMPORT = {"zarr", "snakemake", "yaml", "jsonschema", "pandas"}


def _modules() -> dict[str, ast.Module]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text())
    return modules


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Every module imported anywhere in `tree` (the package root's `__version__` aside)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return out - {"ckaflow"}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {d for d in _imports(tree, set(modules)) if d in modules and d != name}
        for name, tree in modules.items()
        if name != "ckaflow"  # the facade on top: `ckaflow.compare`
    }


def test_imports_form_no_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_the_cka_math_stands_on_its_own():
    modules = _modules()
    for name, tree in modules.items():
        if name == "ckaflow.cka" or name.startswith("ckaflow.cka."):
            imported = _imports(tree, set(modules))
            ours = {m for m in imported if m.startswith("ckaflow")}
            outside = {m for m in ours if not m.startswith("ckaflow.cka")} - MATH_MAY_IMPORT
            assert not outside, (name, outside)
            assert not {m.split(".")[0] for m in imported} & MATH_MUST_NOT_IMPORT, name


def test_only_the_command_line_and_the_plan_reach_the_stages():
    """Stages sit on top of the library: nothing below them imports one (training aside,
    which only the command line starts)."""
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(("ckaflow.stages", "ckaflow.train")):
            continue
        upward = {d for d in deps if d.startswith(("ckaflow.stages", "ckaflow.train"))}
        assert name in ("ckaflow.cli", "ckaflow.plan") or not upward, (name, upward)
