"""The fast tier, `python -m pytest -m "not model"`: every test that needs neither the model
nor llama_cpp nor Redis, run with llama_cpp and redis blocked (tests/conftest.py), here and in
every Python those tests start."""

from __future__ import annotations

import importlib
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from .conftest import FAST_TIER, ROOT, imports_blocked, subprocess_env

pytestmark = pytest.mark.timeout(400)

BLOCKED = "is blocked in the fast tier"
MIN_FAST_TESTS = 150


@pytest.mark.skipif(not imports_blocked(), reason="only the fast tier blocks them (-m 'not model')")
@pytest.mark.parametrize("module", ["llama_cpp", "llama_cpp.llama", "redis", "redis.asyncio"])
def test_the_fast_tier_can_import_neither_llama_cpp_nor_redis(module: str) -> None:
    with pytest.raises(ModuleNotFoundError, match=BLOCKED):
        importlib.import_module(module)
    child = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                           env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert child.returncode == 1 and BLOCKED in child.stderr, child.stderr[-2000:]


def _pytest(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.model   # slow-ish: the whole fast tier, and two collections
def test_the_fast_tier_passes_alone_with_llama_cpp_and_redis_blocked(tmp_path: Path) -> None:
    report = tmp_path / "fast-tier.xml"
    fast = _pytest("-m", FAST_TIER, "-q", f"--junitxml={report}", timeout=300)
    assert fast.returncode == 0, fast.stdout[-6000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    assert suite is not None and suite.get("errors") == "0", fast.stdout[-6000:]
    cases = list(suite.iter("testcase"))
    ran = {f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}": case
           for case in cases if case.get("classname")}
    passed = [node for node, case in ran.items()
              if not any(case.find(tag) is not None for tag in ("skipped", "failure", "error"))]
    assert len(passed) >= MIN_FAST_TESTS, (len(passed), fast.stdout[-3000:])
    # The block was on: its own check ran and passed, not skipped.
    assert sum("test_the_fast_tier_can_import_neither" in node for node in passed) == 4
    # A module skipped whole (pytest.importorskip) is skipped for the block, nothing else.
    for case in cases:
        if not case.get("classname"):
            skipped = case.find("skipped")
            assert skipped is not None and BLOCKED in (skipped.text or ""), \
                (case.get("name"), ElementTree.tostring(case)[:1000])
    # Nothing model-free was lost with a module the block kept out: without the block,
    # -m "not model" selects exactly the tests the fast tier ran. ("(not model)" is the same
    # expression, which does not turn the block on.)
    unblocked = _pytest("--collect-only", "-q", "-m", f"({FAST_TIER})", timeout=120)
    assert unblocked.returncode == 0, unblocked.stdout[-3000:]
    selected = {line for line in unblocked.stdout.splitlines() if "::" in line}
    assert selected == set(ran), (selected ^ set(ran))
