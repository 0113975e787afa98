"""The mock engine (`--mock`): canned text at a set pace, through the real queue, disconnect
detection and callbacks. A product feature for front-end work, tested as itself."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from chatstream_lite import ChatStream
from chatstream_lite.engine.mock import split_tokens

from .conftest import (
    ROOT,
    RawStream,
    Server,
    build_full_app,
    free_port,
    post_chat,
    serve,
    subprocess_env,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

DELAY = 0.02
MAX_QUEUE_SIZE = 1


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[Server]:
    chat_stream = ChatStream("/nonexistent/model.gguf", mock=True, mock_delay=DELAY,
                             max_new_tokens=200, max_queue_size=MAX_QUEUE_SIZE)
    async for running in serve(chat_stream, build_full_app):
        yield running


def test_tokens_join_back_into_the_text() -> None:
    text = "Hello,  world!\n- 日本語です。 Done."
    tokens = split_tokens(text)
    assert "".join(tokens) == text
    assert tokens[:5] == ["Hello,", "  world!", "\n-", " 日", "本"]


async def test_canned_reply_streams_word_by_word_at_the_set_pace(server: Server) -> None:
    before = len(server.recorder.calls)
    async with server.client() as client:
        started = time.monotonic()
        async with client.post("/chat_stream", json={"user_input": "Hi mock"}) as response:
            assert response.status == 200
            chunks = [chunk async for chunk in response.content.iter_any()]
        elapsed = time.monotonic() - started
    reply = b"".join(chunks).decode("utf-8")
    words = split_tokens(reply)
    assert "You said: \u201cHi mock\u201d" in reply and "\n- " in reply and "日本語" in reply
    assert len(chunks) > 10, "pieces arrive one by one, not as one block"
    assert elapsed >= len(words) * DELAY
    await server.recorder.wait_for(before + 1)
    status, history = server.recorder.calls[-1]
    assert status == "success"
    assert history[-2:] == [{"role": "user", "content": "Hi mock"},
                            {"role": "assistant", "content": reply}]


async def test_max_new_tokens_cuts_the_reply(server: Server) -> None:
    async with server.client() as client:
        status, reply = await post_chat(client, user_input="Hi", max_new_tokens=4)
    assert status == 200 and len(split_tokens(reply)) == 4


async def test_client_leaving_mid_stream_is_reported_and_keeps_the_partial_reply(
        server: Server) -> None:
    before = len(server.recorder.calls)
    submitted = server.chat_stream.engine.stats.completion_tokens
    stream = await RawStream.post(server, {"user_input": "Go on"})
    await stream.read_headers()
    first = await stream.read_chunk()
    stream.close()
    await server.recorder.wait_for(before + 1)
    status, history = server.recorder.calls[-1]
    assert status == "client_disconnected_while_streaming"
    assert history[-1]["role"] == "assistant" and history[-1]["content"].startswith(first.decode())
    generated = server.chat_stream.engine.stats.completion_tokens - submitted
    assert generated < len(split_tokens(history[-1]["content"])) + 3


async def test_queue_bound_is_exact(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    admission = server.chat_stream.runtime.admission
    # The first reply would stream for a minute (200 words, 0.3 s each): the burst finds the
    # slot taken however slowly it arrives; its client leaving frees the slot after.
    monkeypatch.setattr(server.chat_stream.engine, "delay", 0.3)
    first = await RawStream.post(server, {"user_input": "Hi"})
    clients = [server.client() for _ in range(4)]
    try:
        await first.read_headers()
        assert first.status == 200
        burst = [asyncio.create_task(post_chat(c, user_input="Hi", max_new_tokens=1))
                 for c in clients]
        # Every request of the burst answered (429) or admitted (one may still be preparing).
        await wait_until(lambda: sum(task.done() for task in burst) + admission.running
                         + admission.queued == 1 + len(burst))
        assert (admission.running, admission.queued) == (1, MAX_QUEUE_SIZE)
        first.close()
        results = await asyncio.gather(*burst)
    finally:
        first.close()
        for c in clients:
            await c.close()
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * MAX_QUEUE_SIZE + [429] * (4 - MAX_QUEUE_SIZE)


async def test_openai_route_and_health_work_on_the_mock(server: Server) -> None:
    async with aiohttp.ClientSession(server.url) as client:
        async with client.post("/v1/chat/completions", json={
                "model": "mock", "max_tokens": 3,
                "messages": [{"role": "user", "content": "Hi"}]}) as response:
            completion = await response.json()
        async with client.get("/health") as response:
            health = await response.json()
    assert completion["choices"][0]["message"]["content"] == "This is the"
    assert completion["choices"][0]["finish_reason"] == "length"
    assert health["status"] == "ok" and health["model"] == "mock"


async def test_cli_mock_serves_without_any_model() -> None:
    port = free_port()
    env = subprocess_env(CHATSTREAM_MODEL="/nonexistent/model.gguf", CHATSTREAM_PORT=str(port),
                         CHATSTREAM_MOCK="1", CHATSTREAM_MOCK_DELAY="0.001")
    process = subprocess.Popen([sys.executable, "-m", "chatstream_lite"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            for _ in range(200):
                try:
                    async with client.get("/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    assert process.poll() is None, "the server exited early"
                await asyncio.sleep(0.1)
            async with client.post("/chat_stream", json={"user_input": "Hello"}) as response:
                assert response.status == 200
                assert "You said: \u201cHello\u201d" in await response.text()
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "model ready: mock" in output
