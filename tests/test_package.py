"""The package as a tool: its version, ``python -m biotune``, lazy imports, no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import biotune

SRC = Path(biotune.__file__).resolve().parent


def test_version_is_in_one_place_and_the_cli_says_it():
    done = subprocess.run([sys.executable, "-m", "biotune", "--version"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == f"biotune {biotune.__version__}"
    from importlib.metadata import version

    assert version("biotune") == biotune.__version__


def test_python_dash_m_biotune_is_the_command_line():
    done = subprocess.run([sys.executable, "-m", "biotune", "--help"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.startswith("usage: biotune")


def test_the_evolution_and_the_package_import_without_torch():
    """The evolutionary core is pure numpy: importing it (and biotune itself) loads no torch."""
    code = "import sys, biotune, biotune.evolution; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _module_imports() -> dict[str, set[str]]:
    """biotune module -> the biotune modules it imports at module level (not inside functions,
    which run later and cannot form an import-time cycle)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        targets: set[str] = set()
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("biotune"):
                    targets.add(node.module)
                    targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("biotune"))
        graph[name] = targets
    return {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}


def test_module_level_imports_have_no_cycle():
    graph = _module_imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
