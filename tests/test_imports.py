"""The layout holds: every module imports on its own, the engine layer imports nothing of
the HTTP layer, and only `engine.llama` imports llama_cpp (so the mock runs without it)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

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
