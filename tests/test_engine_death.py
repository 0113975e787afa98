"""The executor thread itself dies (its loop raises, through the engine's test hook, on the
real model): every request in flight ends with its callback or a 503, `/health` says the
thread died, and new requests get a JSON 503 at once. Nothing hangs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import (
    GREEDY,
    Gate,
    RawStream,
    Server,
    build_full_app,
    post_chat,
    serve,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

DEATH = "test: the engine thread dies"


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=64,
                             num_of_concurrent_executions=1, max_queue_size=2)
    async for running in serve(chat_stream, build_full_app):
        yield running  # the teardown closes a dead engine: that must not raise either


async def _read_to_end(stream: RawStream) -> tuple[bytes, bool]:
    """The chunked body so far and whether it ended properly (the final empty chunk)."""
    body = b""
    try:
        while line := await stream.reader.readline():
            size = int(line.strip(), 16)
            if size == 0:
                return body, True
            body += (await stream.reader.readexactly(size + 2))[:-2]
    except asyncio.IncompleteReadError as cut:
        body += cut.partial
    return body, False


async def _get_json(server: Server, method: str, path: str, body: Any = None
                    ) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as client:
        async with client.request(method, server.url + path, json=body) as response:
            return response.status, dict(response.headers), json.loads(await response.read())


async def test_a_dead_engine_thread_fails_what_it_served_and_refuses_the_rest_with_503(
        server: Server) -> None:
    engine, recorder = server.chat_stream.engine, server.recorder
    admission = server.chat_stream.runtime.admission
    gate = Gate()
    engine.faults.before_token = gate
    stream = await RawStream.post(server, {"user_input": "Tell me a story.", "max_new_tokens": 64,
                                           **GREEDY})
    await stream.read_headers()
    assert stream.status == 200        # streaming: the headers went out with Started
    await gate.wait_reached()
    async with server.client() as waiting_client:
        waiting = asyncio.create_task(post_chat(waiting_client, user_input="Hi"))
        await wait_until(lambda: admission.queued == 1)
        engine.faults.kill_thread(RuntimeError(DEATH))
        gate.open()
        _, complete = await asyncio.wait_for(_read_to_end(stream), 10)
        waiting_status, waiting_body = await asyncio.wait_for(waiting, 10)
    stream.close()
    # The stream in flight: cut so that its client can tell, and its one callback.
    assert not complete
    await recorder.wait_for(1, timeout=10)
    assert recorder.statuses == ["unknown_error_occurred"]
    assert recorder.calls[0][1] == [], "a failed turn leaves the history unchanged"
    # The request that was waiting: refused, no callback.
    assert waiting_status == 503 and json.loads(waiting_body)["error"] == "service_unavailable"
    assert admission.running == 0 and admission.queued == 0
    # /health says why, and stays 503.
    status, _, health = await asyncio.wait_for(_get_json(server, "GET", "/health"), 5)
    assert status == 503 and health["status"] == "unavailable"
    assert health["engine"].startswith("thread died") and DEATH in health["engine"]
    assert health["checks"]["engine"] is False
    # New requests: a JSON 503 at once, on both endpoints.
    status, headers, error = await asyncio.wait_for(
        _get_json(server, "POST", "/chat_stream", {"user_input": "Hello?"}), 5)
    assert status == 503 and headers["Retry-After"] == "1"
    assert error["error"] == "service_unavailable" and "thread died" in error["message"]
    status, _, error = await asyncio.wait_for(_get_json(
        server, "POST", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 4}), 5)
    assert status == 503 and error["error"]["type"] == "unavailable_error"
    assert "thread died" in error["error"]["message"]
    assert len(recorder.calls) == 1, "no callback for the refused requests"
