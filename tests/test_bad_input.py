"""Bad input gets a clear JSON 4xx, changes no history, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import GREEDY, Server, post_chat, serve, wait_until

pytestmark = pytest.mark.timeout(120)

N_CTX = 512
MAX_NEW_TOKENS = 64
SYSTEM = "You are a terse assistant."


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=N_CTX, max_new_tokens=MAX_NEW_TOKENS,
                             system_prompt=SYSTEM, max_body_size=64 * 1024)
    async for running in serve(chat_stream):
        yield running


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


BAD_BODIES = [
    ("malformed JSON", b'{"user_input": "hi"', "application/json", 400),
    ("JSON that is not an object", _json(["hi"]), "application/json", 400),
    ("user_input missing", _json({"regenerate": False}), "application/json", 400),
    ("user_input null", _json({"user_input": None}), "application/json", 400),
    ("user_input a number", _json({"user_input": 5}), "application/json", 400),
    ("user_input a list", _json({"user_input": ["hi"]}), "application/json", 400),
    ("user_input empty", _json({"user_input": "   "}), "application/json", 400),
    ("regenerate as a string", _json({"user_input": "hi", "regenerate": "true"}), "application/json", 400),
    ("regenerate as 1", _json({"user_input": "hi", "regenerate": 1}), "application/json", 400),
    ("max_new_tokens zero", _json({"user_input": "hi", "max_new_tokens": 0}), "application/json", 400),
    ("max_new_tokens over the cap", _json({"user_input": "hi", "max_new_tokens": MAX_NEW_TOKENS + 1}), "application/json", 400),
    ("max_new_tokens a float", _json({"user_input": "hi", "max_new_tokens": 2.5}), "application/json", 400),
    ("temperature negative", _json({"user_input": "hi", "temperature": -1}), "application/json", 400),
    ("temperature NaN", b'{"user_input": "hi", "temperature": NaN}', "application/json", 400),
    ("top_p Infinity", b'{"user_input": "hi", "top_p": Infinity}', "application/json", 400),
    ("top_p over one", _json({"user_input": "hi", "top_p": 1.5}), "application/json", 400),
    ("top_k negative", _json({"user_input": "hi", "top_k": -3}), "application/json", 400),
    ("repeat_penalty a string", _json({"user_input": "hi", "repeat_penalty": "1.1"}), "application/json", 400),
    ("seed negative", _json({"user_input": "hi", "seed": -1}), "application/json", 400),
    ("seed too large", _json({"user_input": "hi", "seed": 2**40}), "application/json", 400),
    ("invalid UTF-8", b'{"user_input": "\xff\xfe"}', "application/json", 400),
    ("body over the size limit", _json({"user_input": "x" * 70_000}), "application/json", 413),
    ("wrong content type", _json({"user_input": "hi"}), "text/html", 415),
]


@pytest.mark.parametrize("name, body, content_type, expected", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_bad_body_is_a_json_4xx_and_changes_nothing(
    server: Server, name: str, body: bytes, content_type: str, expected: int
) -> None:
    async with server.client() as client:
        status, _ = await post_chat(client, user_input="First", max_new_tokens=4, **GREEDY)
        assert status == 200
        calls_before = len(server.recorder.calls)
        async with client.post("/chat_stream", data=body, headers={"Content-Type": content_type}) as response:
            assert response.status == expected, name
            assert response.headers["Content-Type"].startswith("application/json")
            error = await response.json()
            assert error["error"] and error["message"]
        assert len(server.recorder.calls) == calls_before, "a rejected request gets no callback"
        status, _ = await post_chat(client, user_input="Second", max_new_tokens=4, **GREEDY)
        assert status == 200
        await server.recorder.wait_for(calls_before + 1)
    users = [m["content"] for m in server.recorder.calls[-1][1] if m["role"] == "user"]
    assert users == ["First", "Second"], "the bad request must not touch the history"


async def test_wrong_method_is_405(server: Server) -> None:
    async with server.client() as client:
        async with client.get("/chat_stream") as response:
            assert response.status == 405


async def test_a_message_that_cannot_fit_the_context_is_400(server: Server) -> None:
    async with server.client() as client:
        await post_chat(client, user_input="First", max_new_tokens=4, **GREEDY)
        calls_before = len(server.recorder.calls)
        async with client.post("/chat_stream", json={"user_input": "word " * 600}) as response:
            assert response.status == 400
            error = await response.json()
        assert error["error"] == "prompt_too_long" and "context" in error["message"]
        assert len(server.recorder.calls) == calls_before
        status, _ = await post_chat(client, user_input="Still here?", max_new_tokens=4, **GREEDY)
        assert status == 200
        await server.recorder.wait_for(calls_before + 1)
    users = [m["content"] for m in server.recorder.calls[-1][1] if m["role"] == "user"]
    assert users == ["First", "Still here?"]


async def test_long_history_drops_the_oldest_turns_but_keeps_the_system_prompt(server: Server) -> None:
    # Each message is ~100 tokens; with n_ctx=512 and 64 tokens kept for the reply, only
    # about three messages fit, so the oldest turns must go.
    messages = [f"Message number {i}: " + "apple banana cherry " * 30 for i in range(5)]
    async with server.client() as client:
        for text in messages:
            calls_before = len(server.recorder.calls)
            status, _ = await post_chat(client, user_input=text, max_new_tokens=16, **GREEDY)
            assert status == 200
            await server.recorder.wait_for(calls_before + 1)
            assert server.recorder.calls[-1][0] == "success"
    history = server.recorder.calls[-1][1]
    assert history[0] == {"role": "system", "content": SYSTEM}
    users = [m["content"] for m in history if m["role"] == "user"]
    assert users[-1] == messages[-1]
    assert messages[0] not in users and len(users) < len(messages)
    assert users == messages[-len(users):], "only the oldest turns are dropped, in order"
    assert [m["role"] for m in history[1:]] == ["user", "assistant"] * len(users)


async def test_server_still_answers_after_all_that(server: Server) -> None:
    async with aiohttp.ClientSession(server.url) as client:
        status, body = await post_chat(client, user_input="Hello?", max_new_tokens=8, **GREEDY)
    assert status == 200 and body


async def test_a_client_leaving_in_the_middle_of_its_body_is_not_a_server_error(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """Half a body, then the socket closes: no traceback in the log, no callback, no harm."""
    calls = len(server.recorder.calls)
    registry = server.chat_stream.metrics.registry
    labels = {"endpoint": "chat_stream", "code": "client_closed_request"}

    def closed_requests() -> float:
        return registry.get_sample_value("chatstream_rejected_requests_total", labels) or 0.0

    closed_before = closed_requests()
    body = _json({"user_input": "Hello there, this body never arrives whole."})
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /chat_stream HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
    await writer.drain()
    # aiohttp answers "100 Continue" once the request is routed, right before the handler
    # runs: from here on the handler is waiting for the body.
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body[: len(body) // 2])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await wait_until(lambda: closed_requests() == closed_before + 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert len(server.recorder.calls) == calls
    async with server.client() as client:
        status, text = await post_chat(client, user_input="Hi", max_new_tokens=4, **GREEDY)
    assert status == 200 and text
