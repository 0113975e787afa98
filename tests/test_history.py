"""GET /history: the session's turns read back, with /chat_stream's session rules. Real model,
real HTTP (aiohttp client, one cookie jar per client = one chat session)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from chatstream_lite import ChatStream
from chatstream_lite.sessions import MemoryStorage, NewSessionLimit

from .conftest import GREEDY, Gate, RedisServer, Server, build_full_app, post_chat, serve

pytestmark = pytest.mark.timeout(90)

SYSTEM = "You are a terse assistant."
KEY = "history-test-key"


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=12, system_prompt=SYSTEM,
                             **GREEDY)
    async for running in serve(chat_stream, build_full_app):
        yield running


@pytest.fixture(autouse=True)
def no_hook(server: Server) -> None:
    server.chat_stream.engine.faults.before_token = None


async def get_history(client: aiohttp.ClientSession, **headers: str) -> tuple[int, Any]:
    async with client.get("/history", headers=headers) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return response.status, await response.json()


async def test_the_history_is_the_sessions_turns_in_order_without_the_system_prompt(
        server: Server) -> None:
    async with server.client() as client:
        _, first = await post_chat(client, user_input="Name a colour.")
        _, second = await post_chat(client, user_input="Name a fruit.")
        async with client.get("/history") as response:
            assert response.status == 200
            assert response.headers["Cache-Control"] == "no-store"
            body = await response.json()
    assert body == {"messages": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": second},
    ]}
    assert first and second


async def test_without_a_cookie_the_history_is_empty_and_no_session_is_made(
        model_path: str) -> None:
    # Loopback counted like any address, and an allowance of two new sessions: a page that
    # only looks uses none of it.
    storage = MemoryStorage(new_session_limit=NewSessionLimit(
        burst=2, per_minute=1, include_loopback=True))
    chat_stream = ChatStream(model_path, n_ctx=512, max_new_tokens=4, session_storage=storage)
    async for server in serve(chat_stream, build_full_app):
        async with server.client() as client:
            for _ in range(5):
                async with client.get("/history") as response:
                    assert response.status == 200
                    assert await response.json() == {"messages": []}
                    assert "Set-Cookie" not in response.headers
            assert len(storage) == 0
            status, _ = await post_chat(client, user_input="Hi")   # the allowance is intact
            assert status == 200 and len(storage) == 1


async def test_another_session_never_sees_this_history(server: Server) -> None:
    async with server.client() as alice, server.client() as bob:
        await post_chat(alice, user_input="My secret word is tangerine.")
        await post_chat(bob, user_input="Hello.")
        status, body = await get_history(bob)
        assert status == 200
        assert [m["content"] for m in body["messages"] if m["role"] == "user"] == ["Hello."]
        # A made-up cookie is a new, empty session, never somebody else's.
        async with aiohttp.ClientSession(server.url) as mallory:
            async with mallory.get("/history",
                                   headers={"Cookie": "CHATSTREAM_SESSION=made-up"}) as r:
                assert r.status == 200 and await r.json() == {"messages": []}


async def test_clear_context_empties_the_history(server: Server) -> None:
    async with server.client() as client:
        await post_chat(client, user_input="Remember the number 7.")
        assert len((await get_history(client))[1]["messages"]) == 2
        async with client.post("/clear_context", json={}) as response:
            assert response.status == 200
        assert await get_history(client) == (200, {"messages": []})


async def test_a_stopped_reply_is_kept_with_its_partial_text(server: Server) -> None:
    gate = Gate()
    async with server.client() as client:
        server.chat_stream.engine.faults.before_token = lambda index: (
            gate(0) if index == 3 else None)
        async with client.post("/chat_stream", json={"user_input": "Count to ten."}) as response:
            partial = b""
            while len(partial) == 0:
                partial += await response.content.readany()
            await gate.wait_reached()
            response.close()          # the reader leaves mid-reply, as Stop does
        gate.open()
        await server.recorder.wait_for(len(server.recorder.calls) + 1)
        _, body = await get_history(client)
    assert server.recorder.statuses[-1] == "client_disconnected_while_streaming"
    reply = body["messages"][-1]
    assert reply["role"] == "assistant" and reply["content"].startswith(partial.decode())


async def test_mid_reply_the_history_answers_at_once_with_the_turns_stored_so_far(
        server: Server) -> None:
    gate = Gate()
    async with server.client() as client:
        _, earlier = await post_chat(client, user_input="Say yes.")
        server.chat_stream.engine.faults.before_token = gate
        calls = len(server.recorder.calls)
        replying = asyncio.create_task(post_chat(client, user_input="Say no."))
        try:
            await gate.wait_reached()
            # The reply in flight holds the session's lock: a read neither waits for it nor
            # takes it (a GET must never make the session's own next request get 409).
            status, body = await asyncio.wait_for(get_history(client), 5)
            assert status == 200
            assert body["messages"] == [{"role": "user", "content": "Say yes."},
                                        {"role": "assistant", "content": earlier}]
        finally:
            gate.open()
        status, reply = await replying
        assert status == 200
        await server.recorder.wait_for(calls + 1)
        _, body = await get_history(client)
    assert body["messages"][-2:] == [{"role": "user", "content": "Say no."},
                                     {"role": "assistant", "content": reply}]


async def test_the_history_needs_the_api_key_when_one_is_set(model_path: str) -> None:
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=8, api_key=KEY, **GREEDY)
    async for server in serve(chat_stream, build_full_app):
        async with server.client() as client:
            async with client.get("/history") as response:
                assert response.status == 401
                assert (await response.json())["error"] == "invalid_api_key"
            auth = {"Authorization": f"Bearer {KEY}"}
            async with client.post("/chat_stream", json={"user_input": "Hi"},
                                   headers=auth) as response:
                reply = await response.text()
            assert await get_history(client, **auth) == (200, {"messages": [
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]})


async def test_every_replica_reads_the_same_history_from_redis(
        model_path: str, redis_server: RedisServer) -> None:
    # Two replicas on one Redis: the real model answers on one, the history is read on the
    # other (reading it needs no model, so the second one runs the mock engine).
    replica_a = ChatStream(model_path, n_ctx=1024, max_new_tokens=12,
                           session_store=redis_server.url, **GREEDY)
    replica_b = ChatStream(mock=True, session_store=redis_server.url)
    async for a in serve(replica_a, build_full_app):
        async for b in serve(replica_b, build_full_app):
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(a.url, cookie_jar=jar) as on_a:
                _, reply = await post_chat(on_a, user_input="Name a planet.")
            async with aiohttp.ClientSession(b.url, cookie_jar=jar) as on_b:
                assert await get_history(on_b) == (200, {"messages": [
                    {"role": "user", "content": "Name a planet."},
                    {"role": "assistant", "content": reply}]})
                async with on_b.post("/clear_context", json={}) as response:
                    assert response.status == 200
            async with aiohttp.ClientSession(a.url, cookie_jar=jar) as on_a:
                assert await get_history(on_a) == (200, {"messages": []})
