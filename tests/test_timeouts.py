"""Time limits on the real model: `max_queue_wait` refuses a request that waited too long for
a slot (503, never reaches the model); `max_generation_time` ends a reply like
`max_new_tokens` does (finish reason "length")."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import (
    GREEDY,
    Gate,
    Server,
    build_full_app,
    post_chat,
    sample,
    scrape,
    serve,
    start_cli,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

# Not less: a request let in "well before" it must get its slot within it after the gate
# opens (the running reply's last tokens), on a loaded 2-core machine too.
MAX_QUEUE_WAIT = 2.0
# Not less: a reply cut by it must still have read its prompt and made a token, loaded too.
MAX_GENERATION_TIME = 1.0
LONG = 1500     # far more tokens than MAX_GENERATION_TIME allows on any CPU
# Greedy, this runs on far longer than MAX_GENERATION_TIME allows. Its exact text differs from
# one CPU to another (llama.cpp's kernels round differently: "1, 2, 3, ..." on one machine,
# "1234567890123..." on another), so no test below looks at the text, only at its length.
COUNTING = "Write the numbers from 1 to 3000 separated by commas."


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=2048, max_new_tokens=LONG,
                             num_of_concurrent_executions=1, max_queue_size=2,
                             max_queue_wait=MAX_QUEUE_WAIT,
                             max_generation_time=MAX_GENERATION_TIME)
    async for running in serve(chat_stream, build_full_app):
        yield running


@pytest.fixture(autouse=True)
def no_hook(server: Server) -> None:
    server.chat_stream.engine.faults.before_token = None


async def _post(client: aiohttp.ClientSession, path: str, body: dict[str, Any]
                ) -> tuple[int, dict[str, str], Any]:
    async with client.post(path, json=body) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


def _openai_body(content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            **GREEDY, **extra}


async def test_a_request_waiting_past_max_queue_wait_gets_503_and_never_reaches_the_model(
        server: Server) -> None:
    engine, recorder = server.chat_stream.engine, server.recorder
    admission = server.chat_stream.runtime.admission
    gate = Gate()
    engine.faults.before_token = gate  # the running generation holds the only slot until opened
    async with server.client() as alice, server.client() as bob, server.client() as carol:
        running = asyncio.create_task(post_chat(alice, user_input="Hello", max_new_tokens=4,
                                                **GREEDY))
        await gate.wait_reached()
        started, expired = engine.stats.jobs_started, engine.stats.jobs_expired
        calls = len(recorder.calls)
        before = await scrape(server)
        sent = time.monotonic()
        (chat_status, chat_headers, chat_error), (v1_status, v1_headers, v1_error) = (
            await asyncio.gather(
                _post(bob, "/chat_stream", {"user_input": "Hi", "max_new_tokens": 4}),
                _post(carol, "/v1/chat/completions", _openai_body("Hi", 4))))
        waited = time.monotonic() - sent
        after = await scrape(server)
        # Refused while alice still holds the slot: they never got one.
        assert admission.running == 1 and admission.queued == 0 and not running.done()
        assert engine.stats.jobs_started == started
        assert engine.stats.jobs_expired == expired + 2
        assert len(recorder.calls) == calls, "no callback for a refused request"
        gate.open()
        assert (await running)[0] == 200
        # Bob's session is free and unchanged: his next turn is his first.
        status, reply = await post_chat(bob, user_input="Hi", max_new_tokens=4, **GREEDY)
        assert status == 200 and reply
    assert waited >= MAX_QUEUE_WAIT
    assert chat_status == 503 and chat_headers["Retry-After"].isdigit()
    assert chat_headers["Content-Type"].startswith("application/json")
    assert chat_error["error"] == "queue_timeout"
    assert v1_status == 503 and v1_headers["Retry-After"].isdigit()
    assert v1_error["error"]["type"] == "unavailable_error"
    assert v1_error["error"]["code"] == "queue_timeout"
    for endpoint in ("chat_stream", "chat_completions"):
        assert sample(after, "chatstream_requests_total", endpoint=endpoint, status="rejected") \
            - sample(before, "chatstream_requests_total", endpoint=endpoint,
                     status="rejected") == 1
        assert sample(after, "chatstream_rejected_requests_total", endpoint=endpoint,
                      code="queue_timeout") - sample(
            before, "chatstream_rejected_requests_total", endpoint=endpoint,
            code="queue_timeout") == 1
    await recorder.wait_for(calls + 2)
    assert recorder.statuses[calls:] == ["success", "success"]     # alice's, bob's retry
    bob_history, = [h for _, h in recorder.calls[calls:] if h[0]["content"] == "Hi"]
    assert [m["role"] for m in bob_history] == ["user", "assistant"]
    assert engine.stats.jobs_started == started + 1


async def test_a_request_that_gets_its_slot_in_time_is_served_and_not_expired_later(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    engine = server.chat_stream.engine
    admission = server.chat_stream.runtime.admission
    gate = Gate()
    engine.faults.before_token = gate
    expired = engine.stats.jobs_expired
    async with server.client() as alice, server.client() as bob:
        first = asyncio.create_task(post_chat(alice, user_input="Hello", max_new_tokens=4,
                                              **GREEDY))
        await gate.wait_reached()
        second = asyncio.create_task(post_chat(bob, user_input="Hi", max_new_tokens=4, **GREEDY))
        await wait_until(lambda: admission.queued == 1)
        gate.open()         # well before MAX_QUEUE_WAIT
        assert [(await first)[0], (await second)[0]] == [200, 200]
    await asyncio.sleep(MAX_QUEUE_WAIT * 2)  # the started job's timer, had it been left running
    assert engine.stats.jobs_expired == expired
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_max_generation_time_ends_an_openai_stream_with_finish_reason_length(
        server: Server) -> None:
    engine = server.chat_stream.engine
    tokens = engine.stats.completion_tokens
    chunks: list[dict[str, Any]] = []
    async with server.client() as client:
        sent = time.monotonic()
        async with client.post("/v1/chat/completions",
                               json=_openai_body(COUNTING, LONG, stream=True)) as response:
            assert response.status == 200
            lines = [line.decode().strip() async for line in response.content]
        took = time.monotonic() - sent
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text
    generated = engine.stats.completion_tokens - tokens
    assert 0 < generated < LONG          # cut by time, not by max_tokens
    assert took >= MAX_GENERATION_TIME


async def test_max_generation_time_ends_a_chat_stream_normally_and_keeps_the_partial_reply(
        server: Server) -> None:
    engine, recorder = server.chat_stream.engine, server.recorder
    tokens, calls = engine.stats.completion_tokens, len(recorder.calls)
    async with server.client() as client:
        status, reply = await post_chat(client, user_input=COUNTING, max_new_tokens=LONG,
                                        **GREEDY)
    assert status == 200 and reply
    assert 0 < engine.stats.completion_tokens - tokens < LONG
    await recorder.wait_for(calls + 1)
    status_called, history = recorder.calls[calls]
    assert status_called == "success"
    assert history == [{"role": "user", "content": COUNTING},
                       {"role": "assistant", "content": reply}]


async def test_the_cli_takes_both_limits_from_flags_and_environment() -> None:
    # The mock engine keeps the same limits; a word every 50 ms, cut after 0.3 s.
    process, url = await start_cli("--mock", "--mock-delay", "0.05", "--max-queue-wait", "5",
                                   CHATSTREAM_MAX_GENERATION_TIME="0.3")
    try:
        async with aiohttp.ClientSession(url) as client:
            status, _, body = await _post(client, "/v1/chat/completions",
                                          _openai_body("Hi", 200))
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < 20
