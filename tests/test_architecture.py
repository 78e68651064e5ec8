"""The structure docs/DEVELOPING.md describes, checked: imports point down the layers, no two
selfalign modules import each other (directly or around a loop), and no function hides an import
of a selfalign module (outside ``selfalign.commands``) or of anything but an optional heavy
dependency."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp

import selfalign

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(selfalign.__file__).resolve().parent

# Optional or slow-to-import dependencies a function may import when it needs them.
HEAVY_OPTIONAL = ("diffusers", "matplotlib", "timm", "wandb", "torch.utils.tensorboard")



def test_imports_point_down_the_layers():
    """The ``layers`` contract in pyproject.toml, run by import-linter as ``lint-imports`` runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                               "sys.exit(lint_imports_command())",
         "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (
        "an import breaks the layers of docs/DEVELOPING.md: import only from layers below (move the "
        "code down, or pass what it needs in as an argument)\n" + result.stdout + result.stderr)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of a directed graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_strongly_connected_finds_loops_and_only_loops():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert sorted(map(sorted, strongly_connected(graph))) == [["a", "b", "c"], ["d"], ["e"]]


def test_no_import_cycles():
    graph = grimp.build_graph("selfalign", cache_dir=None)
    imports = {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    cycles = [frozenset(c) for c in strongly_connected(imports) if len(c) > 1]
    assert not cycles, (f"import cycles {[sorted(c) for c in cycles]}: move what the modules share into a lower module, or have "
                     f"the lower one declare an interface the higher one implements")


def local_imports(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import inside a function of ``source``, the text of
    module ``module`` (a package's ``__init__.py`` is ``package.__init__``)."""
    tree = ast.parse(source)
    inside = {node for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for node in inside:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        else:
            base = module.split(".")[:-node.level] if node.level else []
            found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
    return sorted(found)


def test_local_imports_are_found_with_absolute_names():
    source = ("import os\n"
              "def f():\n    import numpy.linalg\n    from . import b\n"
              "    def g():\n        from ..c import d\n")
    assert local_imports(source, "selfalign.x.a") == [(3, "numpy.linalg"), (4, "selfalign.x"), (6, "selfalign.c")]
    assert local_imports("def f():\n    from .step import S\n", "selfalign.training.__init__") == \
        [(2, "selfalign.training.step")]


def _allowed(module: str) -> bool:
    return any(module == heavy or module.startswith(heavy + ".") for heavy in HEAVY_OPTIONAL)


def test_functions_import_only_optional_heavy_dependencies():
    """Outside ``selfalign.commands`` (which keeps ``selfalign --help`` fast), imports sit at the top
    of the module: an import hidden in a function hides an upward import or a cycle from the checks."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("commands/"):
            continue
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for line, module in local_imports(path.read_text(), name):
            if _allowed(module):
                continue
            offenders.append(f"{relative}:{line} imports {module}")
    assert not offenders, ("imports inside functions: move them to the top of the module (only "
                           f"{', '.join(HEAVY_OPTIONAL)} may be imported where needed)\n" + "\n".join(offenders))
