"""Copying a sequence's KV cells to another sequence: the two ways give the same logits.

`Model.copy` copies a short sequence through llama.cpp's per-sequence state (only the cells it
holds) and a long one as a whole KV stream (llama.cpp's `llama_memory_seq_cp`). A new session
that borrows a shared prefix, and every extra choice of a prompt (n > 1), decodes on top of
such a copy, so its logits must be exactly those the other way gives. Real model, real
llama.cpp; the model is loaded once for the module, on this thread only.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from chatstream_lite.engine.llama import model as model_module
from chatstream_lite.engine.llama.model import Model

pytestmark = pytest.mark.timeout(120)

N_CTX = 512
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n<|im_start|>user\nWrite a long letter from a sailor to "
          "his family describing a year at sea.<|im_end|>\n<|im_start|>assistant\n")
SHARED = 24   # positions kept after a copy, as a borrowed prefix is trimmed


@pytest.fixture(scope="module")
def model(model_path: str) -> Iterator[Model]:
    loaded = Model.load(Path(model_path), n_ctx=N_CTX, n_batch=512, n_seq=4, n_gpu_layers=0,
                        n_threads=2, verbose=False)
    yield loaded
    loaded.close()


def _decode(model: Model, seq_id: int, start: int, tokens: list[int]) -> list[float]:
    """Decode `tokens` at positions `start`... of `seq_id`; the last token's logits."""
    model.batch.clear()
    for i, token in enumerate(tokens):
        model.batch.add(token, start + i, seq_id, i == len(tokens) - 1)
    assert model.decode() == 0
    logits = llama_cpp.llama_get_logits_ith(model.context.ctx, -1)
    return list(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float))[:model.n_vocab])


def _fresh(model: Model) -> list[int]:
    for seq_id in range(4):
        model.forget(seq_id)
    tokens = model.vocabulary.tokenize(PROMPT, special=True)
    _decode(model, 0, 0, tokens)
    return tokens


def _continue_copy(model: Model, dst: int, tokens: list[int]) -> list[float]:
    """What a borrower does: keep the first SHARED positions, decode the rest of the prompt."""
    model.forget(dst, SHARED)
    return _decode(model, dst, SHARED, tokens[SHARED:])


def test_a_short_sequence_is_copied_cell_by_cell_with_a_stream_copys_logits(
        model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = _fresh(model)
    before = dict(model.copies)
    model.copy(0, 1, len(tokens))
    assert model.copies["cells"] == before["cells"] + 1
    by_cells = _continue_copy(model, 1, tokens)

    monkeypatch.setattr(model_module, "STATE_COPY_CELL_COST", N_CTX + 1)  # never by cells
    model.copy(0, 2, len(tokens))
    assert model.copies["stream"] == before["stream"] + 1
    by_stream = _continue_copy(model, 2, tokens)
    assert by_cells == by_stream


def test_a_long_sequence_is_copied_as_a_whole_stream(model: Model) -> None:
    tokens = _fresh(model)
    long = tokens * (N_CTX // len(tokens))
    _decode(model, 0, len(tokens), long[len(tokens):])   # seq 0 holds len(long) cells now
    assert len(long) * model_module.STATE_COPY_CELL_COST > N_CTX
    before = dict(model.copies)
    model.copy(0, 1, len(long))
    assert model.copies == {"cells": before["cells"], "stream": before["stream"] + 1}
    model.forget(1, SHARED)
    by_stream = _decode(model, 1, SHARED, tokens[SHARED:])
    assert by_stream == _copy_by_cells_of_prefix(model, tokens)


def _copy_by_cells_of_prefix(model: Model, tokens: list[int]) -> list[float]:
    model.forget(0, len(tokens))   # seq 0 holds the prompt alone again
    model.copy(0, 2, len(tokens))
    return _continue_copy(model, 2, tokens)


def test_a_copy_waits_for_a_pending_stream_copy(
        model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream copy is made at the next decode; a copy by cells before it would read a
    stream that does not hold its data yet, so it is made as a stream copy too."""
    tokens = _fresh(model)
    model.copy(0, 3, len(tokens))
    expected = _continue_copy(model, 3, tokens)
    # Seq 1's stream holds other data until the copy into it is made.
    other = model.vocabulary.tokenize("Once upon a time, " * 8, special=False)
    _decode(model, 1, 0, other)
    model.forget(1)

    with monkeypatch.context() as patch:
        patch.setattr(model_module, "STATE_COPY_CELL_COST", N_CTX + 1)
        model.copy(0, 1, len(tokens))            # pending until the next decode
    before = dict(model.copies)
    model.copy(1, 2, len(tokens))                # reads seq 1: must not go by cells now
    assert _continue_copy(model, 2, tokens) == expected
    assert model.copies == {"cells": before["cells"], "stream": before["stream"] + 1}


def test_a_copy_too_big_for_the_state_buffer_is_a_stream_copy(
        model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = _fresh(model)
    model.copy(0, 2, len(tokens))
    by_cells = _continue_copy(model, 2, tokens)
    monkeypatch.setattr(model_module, "MAX_STATE_COPY_BYTES", 1024)
    before = dict(model.copies)
    model.copy(0, 1, len(tokens))
    assert model.copies == {"cells": before["cells"], "stream": before["stream"] + 1}
    assert _continue_copy(model, 1, tokens) == by_cells
