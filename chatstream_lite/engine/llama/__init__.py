"""The llama.cpp engine: the only part of chatstream_lite that imports llama_cpp."""

from .engine import DEFAULT_N_BATCH, DEFAULT_N_CTX, LlamaConfig, LlamaEngine

__all__ = ["DEFAULT_N_BATCH", "DEFAULT_N_CTX", "LlamaConfig", "LlamaEngine"]
