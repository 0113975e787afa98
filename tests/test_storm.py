"""A disconnect storm (a smaller one than benchmarks/storm.py runs) leaves nothing behind."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from benchmarks.storm import StormServer, run_storm
from chatstream_lite import ChatStream

pytestmark = pytest.mark.timeout(300)

CLIENTS = 40


@pytest_asyncio.fixture(scope="module")
async def storm_server(model_path: str) -> AsyncIterator[StormServer]:
    chat_stream = ChatStream(model_path, n_ctx=2048, max_new_tokens=16, max_queue_size=CLIENTS)
    server = await StormServer.start(chat_stream)
    try:
        yield server
    finally:
        await server.stop()


async def test_every_accepted_request_gets_one_fitting_callback_and_nothing_is_left(
        storm_server: StormServer) -> None:
    report = await run_storm(storm_server, CLIENTS, seed=7, max_new_tokens=16)
    assert report.problems == []
    assert sum(report.statuses.values()) == CLIENTS - report.drop_points["before_body"]
    # Every kind of departure happened, and the server noticed each kind.
    assert all(report.drop_points[p] for p in report.drop_points)
    assert report.statuses["client_disconnected_before_streaming"] > 0
    assert report.statuses["success"] > 0
    async with aiohttp.ClientSession(f"http://{storm_server.host}:{storm_server.port}") as client:
        async with client.post("/chat_stream", json={"user_input": "after: hello", "max_new_tokens": 4}) as response:
            assert response.status == 200 and await response.text()
