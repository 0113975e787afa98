"""The llama.cpp engine: the only part of chatstream_lite that imports llama_cpp.

The names below are imported on first use, so that the modules here that need no llama_cpp
(`kernels`, the CPU-kernel policy) can be imported, and tested, where it is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import LlamaEngine

__all__ = ["LlamaEngine"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".engine", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
