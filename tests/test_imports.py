"""The layout holds: every module imports on its own, the engine layer imports nothing of
the HTTP layer, and only `engine.llama` imports llama_cpp (so the mock runs without it)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import chatstream_lite

from .conftest import ROOT, subprocess_env

pytestmark = pytest.mark.timeout(120)

# `__main__` runs the server when imported, as it should.
MODULES = sorted(m.name for m in pkgutil.walk_packages(chatstream_lite.__path__, "chatstream_lite.")
                 if not m.name.endswith("__main__"))


def _imported_after(module: str) -> set[str]:
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted({m.split('.')[0] if not m.startswith('chatstream_lite') "
            "else m for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


@pytest.mark.model   # engine.llama.* import llama_cpp, sessions.redis imports redis
def test_every_module_imports_on_its_own() -> None:
    assert "chatstream_lite.engine.scheduler" in MODULES and len(MODULES) > 20
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n"
            "    for m in [m for m in sys.modules if m.startswith('chatstream_lite')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), cwd=ROOT, timeout=100)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("chatstream_lite.engine")
                                    and not m.startswith("chatstream_lite.engine.llama")])
def test_the_engine_layer_imports_neither_http_nor_llama_cpp(module: str) -> None:
    loaded = _imported_after(module)
    assert not {"aiohttp", "aiohttp_session", "aiohttp_sse", "llama_cpp"} & loaded
    assert not any(m.startswith("chatstream_lite.server") for m in loaded)


def test_the_errors_module_knows_no_http() -> None:
    assert "aiohttp" not in _imported_after("chatstream_lite.errors")


def _import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports anywhere: at the top,
    under TYPE_CHECKING and inside functions (all of it is coupling)."""
    import ast

    root = ROOT / "chatstream_lite"
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = node.module or ""
                if node.level:
                    module = f"{base}.{module}" if module else base
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back_anywhere_in_the_package() -> None:
    graph = _import_graph()
    assert "chatstream_lite.server.exchange" in graph["chatstream_lite.server.handler"]
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
