"""/v1/chat/completions and /v1/models, driven by the official `openai` client on the real model."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from functools import partial

import aiohttp
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from chatstream_lite import ChatStream
from chatstream_lite.server.auth import ApiKey

from .conftest import (
    Gate,
    RawStream,
    Server,
    build_full_app,
    llama_cpp_reference,
    sample,
    scrape,
    serve,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

N_CTX = 1024
MAX_NEW_TOKENS = 64
MAX_QUEUE_SIZE = 1
GREEDY_EXTRA = {"repeat_penalty": 1.0}   # a llama.cpp extension, sent as OpenAI's extra_body
ENDPOINT = "chat_completions"


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=N_CTX, max_new_tokens=MAX_NEW_TOKENS,
                             max_queue_size=MAX_QUEUE_SIZE)
    async for running in serve(chat_stream, build_full_app):
        yield running


@pytest.fixture(autouse=True)
def no_hook(server: Server) -> None:
    server.chat_stream.engine.faults.before_token = None



def _more(after: dict, before: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    """How much a metric grew between two scrapes."""
    return sample(after, name, **labels) - sample(before, name, **labels)


def _model_id(server: Server) -> str:
    info = server.chat_stream.engine.model_info
    assert info is not None
    return info.path.stem


# First in the module on purpose: the model's KV cache is still cold, so the prompt is
# evaluated in the same batches as in llama-cpp-python's own run below and greedy text matches.
async def test_japanese_streams_intact_and_equals_llama_cpp_python(
        server: Server, client: AsyncOpenAI, model_path: str) -> None:
    question = "日本の首都はどこですか？日本語で答えてください。"
    stream = await client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": question}], max_tokens=48,
        temperature=0, stream=True, extra_body=GREEDY_EXTRA)
    deltas = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    ours = "".join(deltas)
    assert all("\ufffd" not in d for d in deltas), "a chunk split a character"

    expected = await asyncio.get_running_loop().run_in_executor(None, partial(
        llama_cpp_reference, model_path, question, n_ctx=N_CTX,
        n_threads=server.chat_stream.engine.threads, max_tokens=48))
    assert any(ord(c) > 0x3000 for c in expected), "the reference reply should contain Japanese"
    assert ours == expected


async def test_non_streaming_reply_is_a_chat_completion_with_usage(
        server: Server, client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="anything", max_tokens=16, temperature=0, extra_body=GREEDY_EXTRA,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Say hello."}])
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == _model_id(server)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 5
    assert 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_max_tokens_ends_with_finish_reason_length(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="anything", max_tokens=3, temperature=0, extra_body=GREEDY_EXTRA,
        messages=[{"role": "user", "content": "Write a long poem about the sea."}])
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_streaming_chunks_role_first_finish_last_then_usage(
        server: Server, client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="anything", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=GREEDY_EXTRA,
        messages=[{"role": "user", "content": "Name three fruits."}])
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == _model_id(server)
    first, *middle, last_choice, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in middle]
    assert texts and all(texts), "every middle chunk carries text"
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in [first, *middle])
    assert last_choice.choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens >= len(texts)
    assert usage_chunk.usage.prompt_tokens > 0


async def test_stream_is_framed_exactly_as_server_sent_events(server: Server) -> None:
    body = {"model": "x", "max_tokens": 4, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = (await response.read()).decode("utf-8")
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], "ends with [DONE] and a blank line"
    for event in events[:-2]:
        assert event.startswith("data: {") and "\n" not in event
        json.loads(event[len("data: "):])


async def test_unsupported_parameters_are_openai_shaped_400s(client: AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]},
         "tools[0].function.name"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ]
    for extra, param in cases:
        kwargs = {"model": "anything", "messages": messages, **extra}
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        error = caught.value.response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["param"] == param, extra
        assert error["message"]


async def test_messages_that_do_not_fit_are_400_context_length_exceeded(
        server: Server, client: AsyncOpenAI) -> None:
    long_turn = "Tell me everything about the history of tea. " * 40
    messages = []
    for _ in range(4):
        messages += [{"role": "user", "content": long_turn},
                     {"role": "assistant", "content": long_turn}]
    messages.append({"role": "user", "content": "Summarise."})
    before = await scrape(server)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="anything", messages=messages, max_tokens=8)
    error = caught.value.response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    after = await scrape(server)
    assert _more(after, before, "chatstream_rejected_requests_total", endpoint=ENDPOINT,
                 code="context_length_exceeded") == 1
    await wait_until(lambda: server.chat_stream.runtime.admission.running == 0)  # the job was cancelled


async def test_queue_full_is_an_openai_shaped_429(server: Server, client: AsyncOpenAI) -> None:
    engine = server.chat_stream.engine
    admission = server.chat_stream.runtime.admission
    gate = Gate()
    engine.faults.before_token = gate
    request = {"model": "anything", "max_tokens": 4, "temperature": 0,
               "messages": [{"role": "user", "content": "Hi"}]}
    running = asyncio.create_task(client.chat.completions.create(**request))
    try:
        await gate.wait_reached()
        waiting = asyncio.create_task(client.chat.completions.create(**request))
        await wait_until(lambda: admission.queued == MAX_QUEUE_SIZE)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(**request)
    finally:
        gate.open()
    error = caught.value.response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "too_many_requests"
    assert caught.value.response.headers["Retry-After"].isdigit()
    assert (await running).choices[0].message.content is not None
    assert (await waiting).choices[0].message.content is not None


async def test_closing_a_stream_stops_generation_within_one_token(
        server: Server, client: AsyncOpenAI) -> None:
    engine = server.chat_stream.engine
    admission = server.chat_stream.runtime.admission
    reached, release = threading.Event(), threading.Event()

    def hold_at_second_token(index: int) -> None:
        if index == 1:
            reached.set()
            release.wait(timeout=30)

    engine.faults.before_token = hold_at_second_token
    before = await scrape(server)
    tokens_before = engine.stats.completion_tokens
    stream = await client.chat.completions.create(
        model="anything", max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True,
        extra_body=GREEDY_EXTRA,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    async for chunk in stream:
        if chunk.choices[0].delta.content:
            break                    # the first piece of text has arrived
    await asyncio.get_running_loop().run_in_executor(None, reached.wait, 30)
    await stream.close()             # closes the connection, as a client that goes away
    # Noticed by the server's disconnect watcher (so the job is cancelled) while held.
    await wait_until(lambda: server.chat_stream.runtime.disconnects.watching == 0)
    release.set()
    await wait_until(lambda: admission.running == 0)
    after = await scrape(server)
    assert _more(after, before, "chatstream_requests_total", endpoint=ENDPOINT,
                 status="client_disconnected_while_streaming") == 1
    # The first token, then the one in flight when the client left; no more.
    assert engine.stats.completion_tokens - tokens_before == 2


async def test_client_leaving_a_non_streaming_request_stops_it(server: Server) -> None:
    engine = server.chat_stream.engine
    admission = server.chat_stream.runtime.admission
    gate = Gate()
    engine.faults.before_token = gate
    before = await scrape(server)
    tokens_before = engine.stats.completion_tokens
    raw = await RawStream.post(server, {"model": "x", "max_tokens": MAX_NEW_TOKENS,
                                        "messages": [{"role": "user", "content": "Tell a story."}]},
                               path="/v1/chat/completions")
    await gate.wait_reached()
    raw.close()
    # Noticed by the server's disconnect watcher (so the job is cancelled) while held.
    await wait_until(lambda: server.chat_stream.runtime.disconnects.watching == 0)
    gate.open()
    await wait_until(lambda: admission.running == 0)
    after = await scrape(server)
    assert _more(after, before, "chatstream_requests_total", endpoint=ENDPOINT,
                 status="client_disconnected_before_streaming") == 1
    assert engine.stats.completion_tokens - tokens_before == 1, "only the token in flight"


async def test_models_lists_the_loaded_model(server: Server, client: AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [_model_id(server)]
    assert models[0].owned_by == "chatstream_lite"


async def test_an_api_key_guards_v1_and_metrics_but_not_health(server: Server) -> None:
    chat_stream = server.chat_stream
    chat_stream.api_key = ApiKey("test-key-1234")
    request = {"model": "anything", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    try:
        for key in ("wrong-key", "test-key-123", "test-key-12345"):
            async with AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as bad:
                with pytest.raises(openai.AuthenticationError) as caught:
                    await bad.chat.completions.create(**request)
                assert caught.value.response.json()["error"]["code"] == "invalid_api_key"
                with pytest.raises(openai.AuthenticationError):
                    await bad.models.list()
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/chat/completions", json=request) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == "Bearer"
            async with session.get(server.url + "/health") as response:
                assert response.status == 200
            async with session.get(server.url + "/metrics") as response:
                assert response.status == 401
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="test-key-1234",
                               max_retries=0) as good:
            completion = await good.chat.completions.create(**request)
        assert completion.choices[0].message.content is not None
    finally:
        chat_stream.api_key = ApiKey(None)
