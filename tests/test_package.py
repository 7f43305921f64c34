"""The package as a tool: its version, ``python -m biotune``, lazy imports, no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import biotune

SRC = Path(biotune.__file__).resolve().parent


def test_version_is_in_one_place_and_the_cli_says_it():
    done = subprocess.run(
        [sys.executable, "-m", "biotune", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"biotune {biotune.__version__}"
    from importlib.metadata import version

    assert version("biotune") == biotune.__version__


def test_python_dash_m_biotune_is_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "biotune", "--help"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("usage: biotune")


def test_the_package_imports_without_torch():
    """``import biotune`` is lazy: it loads no torch until a name that needs it is used."""
    code = "import sys, biotune; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_every_public_name_resolves_to_the_module_that_defines_it():
    for name in biotune.__all__:
        value = getattr(biotune, name)
        assert value.__module__ == biotune._EXPORTS[name], name


def test_every_core_module_imports_with_torch_blocked():
    """``biotune.core`` is pure logic (plans, the evolution, budgets, splits, costs, records):
    each of its modules imports while any import of torch fails."""
    code = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "import biotune.core\n"
        "names = [m.name for m in pkgutil.iter_modules(biotune.core.__path__, 'biotune.core.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(','.join(sorted(names)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = sorted(f"biotune.core.{p.stem}" for p in (SRC / "core").glob("[!_]*.py"))
    assert done.stdout.strip().split(",") == expected
    assert {"biotune.core.evolution", "biotune.core.plan", "biotune.core.records"} <= set(expected)


def test_the_core_imports_nothing_of_biotune_outside_it_but_errors():
    """Imports point one way: everything may import the core, the core imports none of it."""
    graph = _module_imports()
    for module, targets in graph.items():
        if module.startswith("biotune.core"):
            outside = {t for t in targets if not t.startswith("biotune.core")} - {"biotune.errors"}
            assert not outside, f"{module} imports {sorted(outside)}"


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
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_module_imports_a_private_name_of_another():
    """A leading ``_`` means module-private: another module uses a public helper instead (a
    package may still import its own private submodules, as ``runner.search`` does)."""
    reached = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        package = ".".join(rel.parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module != package:
                private = [a.name for a in node.names if a.name[:1] == "_" != a.name[1:2]]
                reached += [f"{rel}: {node.module}.{name}" for name in private]
    assert not reached
