"""The import graph of the installed package: layers that point one way, no cycle, imports at the top.

    nashray (root: layout, models, weights, internals)   imports nothing above it
    nashray.oracles                                       root, oracles
    nashray.cluster.config, nashray.cluster.placement     root, oracles, config
    nashray.trainers                                      root, oracles, trainers, config/placement
    nashray.actors                                        root, oracles, trainers, actors, config/placement
    nashray.cluster (driver, roles, evaluation, CLI, …)   anything

A function-level import of a nashray module needs a ``# lazy: <reason>`` comment on its line (the reason is start-up
cost: torch, vLLM); ``if TYPE_CHECKING:`` imports are annotations only and are not part of the graph.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"nashray": "nashray", "cluster": "nashray.cluster", "actors": "nashray.actors",
           "trainers": "nashray.trainers", "oracles": "nashray.oracles"}
GENERIC = ("cluster", "actors", "trainers", "oracles")  # the folders' names, never import names
CONFIG_LAYER = {"nashray.cluster.config", "nashray.cluster.placement"}
ENTRY_POINTS = {"nashray.cli"}  # `python -m nashray.cli`: the CLI itself, under the package root's name


@dataclass(frozen=True)
class Import:
    source: str    # the importing module
    target: str    # the imported nashray module
    line: int
    lazy: bool     # inside a function
    reason: bool   # a `# lazy:` comment on the line


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, source: str, modules: set[str]) -> list[Import]:
    """Every runtime import of a nashray module in ``source`` (module ``name``), ``from X import Y`` resolved to the
    module X.Y when that is a module."""
    lines = source.splitlines()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                targets = [f"{child.module}.{alias.name}" if f"{child.module}.{alias.name}" in modules
                           else child.module for alias in child.names]
            for target in targets:
                if target.split(".")[0] in ("nashray",) + GENERIC:
                    found.append(Import(name, target, child.lineno, in_function,
                                        "# lazy:" in lines[child.lineno - 1]))
            visit(child, function)

    visit(ast.parse(source), False)
    return list(dict.fromkeys(found))  # `from X import a, b` of one module: one import


SUBPACKAGES = ("cluster", "actors", "trainers", "oracles")
LAYERS = ("root", "oracles", "config", "trainers", "actors", "cluster")
ALLOWED = {"root": {"root"}, "oracles": {"root", "oracles"}, "config": {"root", "oracles", "config"},
           "trainers": {"root", "oracles", "config", "trainers"},
           "actors": {"root", "oracles", "config", "trainers", "actors"},
           "cluster": set(LAYERS), "entry": set(LAYERS)}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module in ENTRY_POINTS:
        return "entry"
    if len(parts) == 1 or parts[1] not in SUBPACKAGES:
        return "root"
    if module in CONFIG_LAYER:
        return "config"
    return parts[1]


def layer_allows(source: str, target: str) -> bool:
    return layer_of(target) in ALLOWED[layer_of(source)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    modules = project_modules()
    return [imp for name, path in modules.items()
            for imp in imports_of(name, path.read_text(encoding="utf-8"), set(modules))]


def test_no_generic_top_level_import_names(graph):
    generic = [f"{i.source}:{i.line} imports {i.target}" for i in graph if i.target.split(".")[0] in GENERIC]
    assert not generic, "import through `nashray.` only:\n" + "\n".join(generic)


def test_layers_point_one_way(graph):
    wrong = [f"{i.source}:{i.line} imports {i.target}" for i in graph
             if i.target.startswith("nashray") and not layer_allows(i.source, i.target)]
    assert not wrong, "an import against the layers (see this file's docstring):\n" + "\n".join(wrong)


def test_roles_never_import_the_driver_side(graph):
    driver_side = {"nashray.cluster.driver", "nashray.cluster.cli", "nashray.cluster.evaluation",
                   "nashray.cluster.report", "nashray.cluster.export", "nashray.cluster.roles"}
    wrong = [f"{i.source}:{i.line} imports {i.target}" for i in graph
             if i.source.split(".")[1:2] in (["trainers"], ["actors"], ["oracles"]) and i.target in driver_side]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle(graph):
    edges: dict[str, set[str]] = {}
    for i in graph:
        edges.setdefault(i.source, set()).add(i.target)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_lazy_project_imports_state_a_reason(graph):
    unexplained = [f"{i.source}:{i.line} imports {i.target} inside a function" for i in graph
                   if i.lazy and not i.reason]
    assert not unexplained, ("import project modules at the top of the file, or say why not on the line "
                             "(`# lazy: <reason>`):\n" + "\n".join(unexplained))


# ------------------------------------------------------------------------------------------ the checker itself

def test_checker_finds_cycles_and_wrong_layers():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert not layer_allows("nashray.trainers.learner", "nashray.cluster.driver")
    assert not layer_allows("nashray.oracles.llm_judge", "nashray.trainers.models")
    assert not layer_allows("nashray.layout", "nashray.trainers.learner")
    assert not layer_allows("nashray.cluster.config", "nashray.cluster.driver")
    assert layer_allows("nashray.actors.generator", "nashray.cluster.config")
    assert layer_allows("nashray.cluster.driver", "nashray.trainers.learner")
    source = "import os\nfrom nashray.cluster import driver\n\ndef f():\n    import nashray.layout  # lazy: why\n"
    found = imports_of("nashray.trainers.x", source, {"nashray.cluster.driver", "nashray.layout"})
    assert [(i.target, i.lazy, i.reason) for i in found] == [("nashray.cluster.driver", False, False),
                                                               ("nashray.layout", True, True)]
