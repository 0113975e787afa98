"""The fast tier's import block: `llama_cpp` and `redis` cannot be imported.

`python -m pytest -m "not model"` installs it in the test process (tests/conftest.py) and puts
this folder first on PYTHONPATH, so that every Python the tests start (the CLI, a benchmark, a
`-c` script) runs this file at startup as its `sitecustomize` and is blocked too. A test of
the fast tier that still reaches either module fails with ModuleNotFoundError, as it would on
a machine without them, instead of passing because they happen to be installed here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

BLOCKED = ("llama_cpp", "redis")
MESSAGE = "is blocked in the fast tier (pytest -m 'not model')"


class BlockedImports(MetaPathFinder):
    """Refuses `llama_cpp`, `redis` and their submodules, before any other finder looks."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{fullname} {MESSAGE}", name=fullname)
        return None


def install() -> None:
    if not any(type(finder).__name__ == "BlockedImports" for finder in sys.meta_path):
        sys.meta_path.insert(0, BlockedImports())


install()
