"""The loaded GGUF model and its llama.cpp context: tokens in, one batch decoded, logits out.

    >>> model = Model.load(path, n_ctx=4096, n_batch=512, n_seq=4, ...)   # on the engine thread
    >>> tokens = model.vocabulary.tokenize("Hi", special=False)          # any thread
    >>> model.batch.add(tokens[0], pos=0, seq_id=3, logits=True)
    >>> model.decode()                      # 0 ok, 1 no room in the KV cache, other: failure

Not thread-safe: created, used and closed on the engine thread only.

Loading, tokenizing, detokenizing and metadata use llama-cpp-python's own `LlamaModel`, the
object inside `Llama`, so tokens and text are exactly what `Llama` gives. The context is made
here with the raw API because `Llama` cannot ask for several sequences: `n_seq` sequence ids,
each with a KV stream of its own of `n_ctx` cells (`kv_unified` off, as llama-server's
slots). Measured on CPU: over a unified cache the logits of a sequence change with what else
is in the batch (greedy replies drift after a few tokens); with a stream per sequence one
token of each sequence per batch gives bit-identical logits to decoding it alone, and each
token attends to its own conversation only. Everything else is `Llama`'s default; flash
attention is the caller's choice (`Llama` turns it off, llama.cpp's context defaults to auto).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import _internals
from llama_cpp._logger import set_verbose

from ...errors import StartupError
from .guidance import Vocab, vocabulary
from .kernels import Machine, choose

__all__ = ["FLASH_ATTN", "MAX_STATE_COPY_BYTES", "STATE_COPY_CELL_COST", "Batch", "Model",
           "ModelLoadError", "Vocabulary"]

log = logging.getLogger(__name__)

# A KV cell copied through llama.cpp's per-sequence state (serialised, then restored) costs
# about as much as this many cells of a whole-stream copy (a memcpy of every one of the
# stream's n_ctx cells). Measured on the 2-core CPU with SmolLM2-135M at n_ctx 4,096: a
# stream copy 19-29 ms whatever the sequence holds; by cells 3 ms at 50 cells, 7 at 500, 14
# at 1,000, 21 at 2,000, 37 at 4,000 (`python -m benchmarks.kv_copy`,
# benchmarks/results/kv-copy-cpu-2core.json).
STATE_COPY_CELL_COST = 2
FLASH_ATTN = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
              "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
# The most bytes copied by cells (the buffer is kept for the next copy): 2,900 cells of
# SmolLM2-135M, 128 of a 7B model with an F16 cache.
MAX_STATE_COPY_BYTES = 64 << 20


class ModelLoadError(StartupError):
    """The model file is there, but llama.cpp cannot load it."""


class Batch:
    """A reusable `llama_batch`; rows are added one token at a time, then decoded together."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._batch: llama_cpp.llama_batch | None = llama_cpp.llama_batch_init(capacity, 0, 1)
        # Typed views of the C arrays, looked up once: attribute access on the struct builds
        # a new pointer object every time, which the per-token path should not pay for.
        self._token = self._batch.token
        self._pos = self._batch.pos
        self._logits = self._batch.logits
        self._seq_id = [self._batch.seq_id[i] for i in range(capacity)]
        for i in range(capacity):
            self._batch.n_seq_id[i] = 1
        self.size = 0

    def clear(self) -> None:
        self.size = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Append one token of sequence `seq_id` at position `pos`; returns its row."""
        row = self.size
        if row >= self.capacity:  # the ctypes writes below are not bounds-checked
            raise IndexError(f"batch full ({self.capacity} rows)")
        self._token[row] = token
        self._pos[row] = pos
        self._seq_id[row][0] = seq_id
        self._logits[row] = logits
        self.size = row + 1
        return row

    @property
    def native(self) -> llama_cpp.llama_batch:
        assert self._batch is not None, "the batch was freed"
        self._batch.n_tokens = self.size
        return self._batch

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None


class Vocabulary:
    """The model's tokenizer. Read-only after loading, so safe to use from any thread: the
    request path tokenizes in its own worker while the engine thread decodes."""

    def __init__(self, model: _internals.LlamaModel) -> None:
        self._model = model

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """`special`: parse control-token text (`<|im_start|>`) as control tokens. True for
        the chat template's own text only, never for what a user wrote. No BOS is added:
        templates write it themselves, as llama-cpp-python's Jinja2 chat formatter assumes."""
        if not text:
            return []
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=special)


class Model:
    """One GGUF model with one llama.cpp context of `n_seq` sequences of `n_ctx` KV cells each."""

    def __init__(self, model: _internals.LlamaModel, context: _internals.LlamaContext,
                 n_batch: int, n_gpu_layers: int = 0, path: Path | None = None) -> None:
        self._model = model
        self.path = path
        self.context = context
        self.metadata = model.metadata()
        self.n_ctx = llama_cpp.llama_n_ctx_seq(context.ctx)   # per sequence
        self.n_seq = llama_cpp.llama_n_seq_max(context.ctx)
        self.n_vocab = model.n_vocab()
        self.batch = Batch(n_batch)
        self._vocab = model.vocab
        self.vocabulary = Vocabulary(model)
        self._memory = context.memory
        self._pieces: dict[int, bytes] = {}
        # Copying only the cells a sequence holds is a host round trip; with the KV cache on
        # a GPU the whole-stream copy stays on the device and is the cheaper one.
        self._copy_cells = not (n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload())
        self._state_buffer = (ctypes.c_uint8 * 0)()
        self._stream_copy_pending = False   # made by llama.cpp at the next decode
        self.copies = {"cells": 0, "stream": 0}

    @classmethod
    def load(cls, path: Path, *, n_ctx: int, n_batch: int, n_seq: int, n_gpu_layers: int,
             n_threads: int, verbose: bool, extra_buffers: bool | None = None,
             flash_attn: str = "off",
             progress: Callable[[float], None] | None = None) -> Model:
        """`progress(fraction)`: called on this thread as llama.cpp loads the weights.
        `extra_buffers`: let llama.cpp repack weights for AMX or CPU_REPACK; None: what
        `kernels.choose` picks for this machine (off where the AMX kernels would fault).
        `flash_attn`: "on", "off" (Llama's default), or "auto" (llama.cpp's: on where the
        backend supports it for this model)."""
        if extra_buffers is None:
            extra_buffers = choose(Machine.detect()).extra_buffers
        _init_backend(verbose)
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
        model_params.use_extra_bufts = extra_buffers
        callback = _progress_callback(progress) if progress is not None else None
        if callback is not None:   # called during the load only; `callback` keeps it alive
            model_params.progress_callback = callback
        # verbose=True only stops LlamaModel from pointing the process's fds 1 and 2 at
        # /dev/null for the whole load, which silenced every other thread (the server
        # answering /health meanwhile) and the progress lines; llama.cpp's own log lines
        # are filtered by `set_verbose` in `_init_backend`.
        try:
            model = _internals.LlamaModel(path_model=str(path), params=model_params,
                                          verbose=True)
        except ValueError:   # llama.cpp said only "Failed to load model from file"
            raise ModelLoadError(
                f"llama.cpp could not load {path}: not a GGUF model it reads (a truncated "
                "download, another format, or an architecture newer than this "
                "llama-cpp-python)") from None
        n_batch = min(n_ctx, n_batch)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq               # llama.cpp splits it evenly among the streams
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)        # Llama(n_ubatch=512)
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        try:
            context = _internals.LlamaContext(model=model, params=params, verbose=verbose)
        except Exception:
            model.close()
            raise
        return cls(model, context, n_batch, n_gpu_layers, path)

    def close(self) -> None:
        self.batch.close()
        self.context.close()
        self._model.close()

    def guidance_vocab(self) -> Vocab:
        """This model file's vocabulary for llguidance, loaded apart and kept for the process
        (guidance.Vocab says why: never this model's own, which `close` frees)."""
        if self.path is None:
            raise ValueError("llguidance needs the model's file")
        return vocabulary(self.path)

    @property
    def llama_model(self) -> _internals.LlamaModel:
        """The weights, for another context on them (embedder.py)."""
        return self._model

    # -- vocabulary ---------------------------------------------------------------------------
    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (control tokens give b""), as `Llama.detokenize`."""
        data = self._pieces.get(token)
        if data is None:
            # Bounded by the vocabulary; after warm-up the hot path is one dict lookup.
            data = self._pieces[token] = self._model.detokenize([token], special=False)
        return data

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def token_text(self, token: int) -> str:
        return self._model.token_get_text(token) if token != -1 else ""

    @property
    def add_bos(self) -> bool:
        """Whether the vocabulary wants a BOS token before a prompt (chat templates write
        their own; a plain-text prompt gets it from here)."""
        return bool(self._model.add_bos_token())

    @property
    def bos_token(self) -> int:
        return self._model.token_bos()

    @property
    def eos_token(self) -> int:
        return self._model.token_eos()

    # -- decoding -----------------------------------------------------------------------------
    def decode(self) -> int:
        """Evaluate the batch: 0 ok, 1 no free KV cells, 2 aborted, < 0 error (see llama.h)."""
        status = int(llama_cpp.llama_decode(self.context.ctx, self.batch.native))
        if status == 0:
            self._stream_copy_pending = False   # a decode makes the pending copies first
        return status

    # -- KV memory ------------------------------------------------------------------------------
    def forget(self, seq_id: int, start: int = 0) -> None:
        """Free the cells of `seq_id` from position `start` on."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, start, -1)

    def copy(self, src_seq_id: int, dst_seq_id: int, cells: int) -> None:
        """Make `dst_seq_id` hold what `src_seq_id` holds (`cells` of them, by position).

        Each sequence has its own KV stream, and llama.cpp copies between streams only whole
        (every cell of the stream, at the next decode), which costs a new session ~20 ms of
        its first token on a CPU even when the prefix it borrows is 20 tokens long. A sequence
        holding few cells is copied through llama.cpp's per-sequence state instead: only its
        cells, byte for byte, at the same positions (the same logits follow, as with a stream
        copy: tests/test_kv_copy.py). That reads and writes the cells now, so it is used
        only while no stream copy waits for the next decode (which would copy a stream's
        data as it is then, while the cells' positions were taken when it was asked for).
        """
        if (self._copy_cells and cells * STATE_COPY_CELL_COST <= self.n_ctx
                and not self._stream_copy_pending
                and self._copy_through_state(src_seq_id, dst_seq_id)):
            self.copies["cells"] += 1
            return
        llama_cpp.llama_memory_seq_cp(self._memory, src_seq_id, dst_seq_id, -1, -1)
        self._stream_copy_pending = True
        self.copies["stream"] += 1

    def _copy_through_state(self, src_seq_id: int, dst_seq_id: int) -> bool:
        """Serialise `src_seq_id`'s cells and restore them as `dst_seq_id`'s (which loses
        what it held). False when not made: too big, or llama.cpp refused (`dst_seq_id` is
        empty then)."""
        ctx = self.context.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, src_seq_id)
        if size > MAX_STATE_COPY_BYTES:
            return False
        if size > len(self._state_buffer):
            # Grows to the largest sequence copied this way and is reused: allocating (and
            # zeroing) it for each copy cost as much as the copy.
            self._state_buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, self._state_buffer, size, src_seq_id)
        if written == 0:
            return False
        return bool(llama_cpp.llama_state_seq_set_data(ctx, self._state_buffer, written,
                                                        dst_seq_id))


def _progress_callback(progress: Callable[[float], None]) -> Any:
    """llama.cpp's `progress_callback`: it runs inside the C load, so it never raises (an
    exception would make ctypes answer False, which aborts the load); the first error is
    logged and the load goes on."""
    failed = False

    def callback(fraction: float, _user_data: ctypes.c_void_p) -> bool:
        nonlocal failed
        try:
            progress(fraction)
        except Exception:  # a report must never stop the load
            if not failed:
                failed = True
                log.exception("reporting the load progress failed; the load goes on")
        return True

    return llama_cpp.llama_progress_callback(callback)


_backend_ready = False


def _init_backend(verbose: bool) -> None:
    """What `Llama()` does once per process before loading a model."""
    global _backend_ready
    set_verbose(verbose)  # llama.cpp's log lines go through the bindings' own logger
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True
