"""A real `llama_decode` failure (llama.cpp's own status, not an exception raised by a test
hook) fails only its job, clears its slot, and the session's next request works.

How it is made to fail without patching llama.cpp: on the engine thread, between two tokens,
the sequence's KV cells from position 1 on are removed through llama.cpp's own API
(`llama_memory_seq_rm`, what `Model.forget` calls). The scheduler still believes they are
there, so the next decode puts the sequence's token at a position that does not follow the
last one llama.cpp holds, which `llama_decode` refuses (status -1, "inconsistent sequence
positions"): the state a failed decode leaves, "cells in an unknown state", made real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import GREEDY, Server, post_chat, serve, wait_until

if TYPE_CHECKING:
    from chatstream_lite.engine.llama import LlamaEngine

pytestmark = pytest.mark.timeout(120)


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=32)
    async for running in serve(chat_stream):
        yield running


def _lose_kv_cells_at(engine: LlamaEngine, index: int) -> list[int]:
    """Installs the hook; the list it returns records the token index where it struck."""
    struck: list[int] = []

    def lose_cells(token_index: int) -> None:   # on the engine thread, between two decodes
        if token_index == index and not struck:
            struck.append(token_index)
            model = engine._model
            assert model is not None and model.n_seq == 1
            model.forget(seq_id=0, start=1)     # llama_memory_seq_rm: cells 1.. are gone

    engine.faults.before_token = lose_cells
    return struck


async def test_a_real_decode_failure_clears_its_slot_and_the_next_request_works(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    from chatstream_lite.engine.llama import LlamaEngine  # llama_cpp: not at the top

    engine = server.chat_stream.engine
    assert isinstance(engine, LlamaEngine)
    recorder = server.recorder
    async with server.client() as client:
        status, first = await post_chat(client, user_input="Write a long story about a dragon.",
                                        max_new_tokens=16, **GREEDY)
        assert status == 200 and first
        await recorder.wait_for(1)
        struck = _lose_kv_cells_at(engine, 3)
        try:
            async with client.post("/chat_stream", json={
                    "user_input": "Go on, and make it longer.", "max_new_tokens": 32,
                    **GREEDY}) as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()       # the connection is dropped mid-body
            await recorder.wait_for(2)
        finally:
            engine.faults.before_token = None
        assert struck == [3], "the reply ended before the cells were removed"
        failures = [r.getMessage() for r in caplog.records
                    if r.name == "chatstream_lite.engine.scheduler"]
        assert failures == ["llama_decode failed with status -1; failing the 1 jobs in the batch"]
        status, history = recorder.calls[-1]
        assert status == "unknown_error_occurred"
        assert [m["content"] for m in history if m["role"] == "user"] == [
            "Write a long story about a dragon."], "a failed turn is not stored"

        # The same session again: its slot was cleared (in llama.cpp and in the scheduler's
        # record), so nothing is reused and the prompt is read from position 0; had llama.cpp
        # kept cell 0, this decode would be refused too.
        reused = engine.stats.prompt_tokens_reused
        status, body = await post_chat(client, user_input="And then?", max_new_tokens=8,
                                       **GREEDY)
        assert status == 200 and body
        await recorder.wait_for(3)
    assert recorder.calls[-1][0] == "success"
    assert engine.stats.prompt_tokens_reused == reused
    await wait_until(lambda: server.chat_stream.runtime.admission.running == 0)
