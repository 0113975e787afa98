"""The queue bound is exact under a burst: N running + max_queue_size waiting, the rest 429."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import GREEDY, Gate, Server, serve, wait_until

pytestmark = pytest.mark.timeout(120)

MAX_QUEUE_SIZE = 2
BURST = 12


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=16,
                             num_of_concurrent_executions=1, max_queue_size=MAX_QUEUE_SIZE)
    async for running in serve(chat_stream):
        yield running


@pytest_asyncio.fixture(scope="module")
async def server_of_two(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=16,
                             num_of_concurrent_executions=2, max_queue_size=MAX_QUEUE_SIZE)
    async for running in serve(chat_stream):
        yield running


async def _post(client: aiohttp.ClientSession) -> tuple[int, dict[str, str], str]:
    async with client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 4, **GREEDY}) as response:
        return response.status, dict(response.headers), await response.text()


async def _burst_while_the_engine_is_held(server: Server, running: int) -> None:
    """BURST requests at once while the engine thread is held at the first token: exactly
    `running` + MAX_QUEUE_SIZE accepted (each with one success callback), the rest 429."""
    engine = server.chat_stream.engine
    admission = server.chat_stream.runtime.admission
    accepted_count = running + MAX_QUEUE_SIZE
    gate = Gate()
    engine.faults.before_token = gate  # the first job to reach a token holds the thread
    clients = [server.client() for _ in range(BURST)]
    try:
        tasks = [asyncio.create_task(_post(c)) for c in clients]
        await gate.wait_reached()
        # Every request either answered (429) or admitted; the last admitted one may still
        # be in preparation (waiting) for a moment before it gets its slot.
        await wait_until(lambda: sum(t.done() for t in tasks) + admission.running
                         + admission.queued == BURST)
        await wait_until(lambda: admission.queued <= MAX_QUEUE_SIZE, timeout=5)
        assert (admission.running, admission.queued) == (running, MAX_QUEUE_SIZE)
        gate.open()
        results = await asyncio.gather(*tasks)
    finally:
        gate.open()
        engine.faults.before_token = None
        for c in clients:
            await c.close()
    accepted = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 429]
    assert len(accepted) == accepted_count
    assert len(rejected) == BURST - accepted_count
    for _, headers, body in rejected:
        assert headers["Retry-After"].isdigit()
        assert headers["Content-Type"].startswith("application/json")
        assert '"error": "too_many_requests"' in body
    await server.recorder.wait_for(accepted_count)
    await wait_until(lambda: admission.running == 0 and admission.queued == 0)
    assert server.recorder.statuses == ["success"] * accepted_count, "no callback for a 429"


async def test_burst_accepts_exactly_running_plus_queue_and_rejects_the_rest(server: Server) -> None:
    await _burst_while_the_engine_is_held(server, running=1)


async def test_queue_frees_up_after_the_burst(server: Server) -> None:
    async with server.client() as client:
        status, _, body = await _post(client)
    assert status == 200 and body


async def test_with_two_concurrent_executions_the_bound_is_two_running_plus_the_queue(
        server_of_two: Server) -> None:
    await _burst_while_the_engine_is_held(server_of_two, running=2)
    async with server_of_two.client() as client:
        status, _, body = await _post(client)
    assert status == 200 and body
