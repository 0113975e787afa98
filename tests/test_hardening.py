"""Issue 11, the engine and session side: nothing a client does can wedge a session, lose a
callback, corrupt memory or hide a stalled engine. Real model, real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import GREEDY, Gate, RawStream, Server, build_full_app, post_chat, serve, wait_until

pytestmark = pytest.mark.timeout(120)

STORY = {"user_input": "Tell me a long story about a dragon.", "max_new_tokens": 200, **GREEDY}


@pytest_asyncio.fixture(scope="module")
async def cancelling(model_path: str) -> AsyncIterator[Server]:
    """An app that asks aiohttp to cancel a handler whose client leaves."""
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=200, stall_timeout=0.5)
    async for running in serve(chat_stream, build_full_app, handler_cancellation=True):
        yield running


@pytest.fixture(autouse=True)
def no_hook(cancelling: Server) -> None:
    cancelling.chat_stream.engine.faults.before_token = None


async def test_a_cancelled_handler_still_gives_one_callback_and_cancels_its_job(
        cancelling: Server) -> None:
    engine, recorder = cancelling.chat_stream.engine, cancelling.recorder
    admission = cancelling.chat_stream.runtime.admission
    before, generated = len(recorder.calls), engine.stats.completion_tokens
    stream = await RawStream.post(cancelling, STORY)
    await stream.read_headers()
    assert stream.status == 200
    assert await stream.read_chunk()
    stream.close()          # aiohttp cancels the handler task (handler_cancellation=True)
    await recorder.wait_for(before + 1)
    await wait_until(lambda: admission.running == 0)
    assert engine.stats.completion_tokens - generated < 200   # the job stopped, not ran out
    status, text = await _ask(cancelling, "Hello")
    assert status == 200 and text
    # The next request's callback comes after any second one of the cancelled request
    # would have: exactly these two, in this order.
    await recorder.wait_for(before + 2)
    assert recorder.statuses[before:] == ["client_disconnected_while_streaming", "success"]


async def test_a_wedged_engine_makes_health_say_stalled(cancelling: Server) -> None:
    gate = Gate()
    cancelling.chat_stream.engine.faults.before_token = gate   # the thread stops mid-step
    async with cancelling.client() as client:
        reply = asyncio.create_task(post_chat(client, user_input="Hi", max_new_tokens=4))
        await gate.wait_reached()
        # Held, no step ends: past stall_timeout (0.5 s) /health says so, and stays so.
        assert await _health_until(cancelling, "stalled") == 503
        gate.open()
        assert (await reply)[0] == 200
    # Once the job has left its slot (the reply can be read before), nothing waits: ready.
    await wait_until(lambda: cancelling.chat_stream.runtime.admission.running == 0)
    status, body = await _health(cancelling)
    assert status == 200 and body["engine"] == "ready"


async def test_an_unreadable_stored_history_starts_afresh_and_never_wedges_the_session(
        cancelling: Server) -> None:
    storage = cancelling.chat_stream.session_store.storage
    async with cancelling.client() as client:
        status, _ = await post_chat(client, user_input="Remember: green.", max_new_tokens=4,
                                    **GREEDY)
        assert status == 200
        cookie = next(c for c in client.cookie_jar if c.key == storage.cookie_name).value
        last_use, text = storage._data[cookie]
        stored = json.loads(text)
        stored["session"]["chat"]["turns"][0]["role"] = "tool"     # not a role we store
        storage._data[cookie] = (last_use, json.dumps(stored))
        for _ in range(2):   # the first request resets it; the session is not left locked
            status, reply = await post_chat(client, user_input="Hi again", max_new_tokens=4,
                                            **GREEDY)
            assert status == 200 and reply
        history = cancelling.recorder.calls[-1][1]
        assert [m["content"] for m in history if m["role"] == "user"] == ["Hi again", "Hi again"]


def test_n_batch_below_the_concurrent_executions_is_refused_at_construction(
        model_path: str) -> None:
    with pytest.raises(ValueError, match="n_batch"):
        ChatStream(model_path, n_batch=2, num_of_concurrent_executions=4)


async def _ask(server: Server, text: str) -> tuple[int, str]:
    async with server.client() as client:
        return await post_chat(client, user_input=text, max_new_tokens=4, **GREEDY)


async def _health(server: Server) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as client:
        async with client.get(server.url + "/health") as response:
            return response.status, await response.json()


async def _health_until(server: Server, engine: str, timeout: float = 30) -> int:
    """Polls /health until its engine state is `engine`; returns that answer's status."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status, body = await _health(server)
        if body["engine"] == engine:
            return status
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.05)
