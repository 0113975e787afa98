"""A second llama.cpp context on the loaded weights, for embeddings: mean pooling, L2-normalized.

    >>> embedder = Embedder(model, n_tokens=512, n_seq=8, n_threads=2)   # on the engine thread
    >>> vectors = embedder.embed([[1, 2, 3], [4, 5]])                   # one llama_decode

Why a context of its own rather than an embeddings pass on the generation context: pooling is
a property of a context, the generation context's KV streams hold conversations (an
embeddings pass would need a free sequence and would evict a warm session), and its outputs
are logits. This one shares the weights (no second copy in memory), holds `n_tokens` KV cells
for all its sequences together (cleared after every batch), and is used only by the engine
thread, between generation steps. Every input is read whole in one batch (llama.cpp pools a
sequence only within one ubatch), so an input is at most `n_tokens` long.
"""

from __future__ import annotations

import ctypes

import llama_cpp
from llama_cpp import _internals

from ..embeddings import normalized
from .model import Batch, Model

__all__ = ["EmbeddingFailed", "Embedder"]


class EmbeddingFailed(RuntimeError):
    """`llama_decode` failed on an embeddings batch."""


class Embedder:
    def __init__(self, model: Model, *, n_tokens: int, n_seq: int, n_threads: int,
                 verbose: bool = False) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_tokens
        params.n_batch = n_tokens
        params.n_ubatch = n_tokens
        params.n_seq_max = n_seq
        params.kv_unified = True          # the sequences of one batch share its cells
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.context = _internals.LlamaContext(model=model.llama_model, params=params,
                                               verbose=verbose)
        self.n_tokens = n_tokens
        self.n_seq = n_seq
        self.n_embd = int(llama_cpp.llama_model_n_embd(model.llama_model.model))
        self.batch = Batch(n_tokens)
        self._memory = self.context.memory

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One batch: each input a sequence of its own, read whole; its mean-pooled vector."""
        batch = self.batch
        batch.clear()
        for seq_id, tokens in enumerate(inputs):
            for pos, token in enumerate(tokens):
                batch.add(token, pos, seq_id, logits=True)
        try:
            status = int(llama_cpp.llama_decode(self.context.ctx, batch.native))
            if status != 0:
                raise EmbeddingFailed(f"llama_decode returned {status} on an embeddings batch")
            vectors = []
            for seq_id in range(len(inputs)):
                pointer = llama_cpp.llama_get_embeddings_seq(self.context.ctx, seq_id)
                if not pointer:
                    raise EmbeddingFailed("llama.cpp gave no pooled embedding")
                row = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float * self.n_embd))
                vectors.append(normalized(list(row.contents)))
            return vectors
        finally:
            llama_cpp.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        self.batch.close()
        self.context.close()
