"""Sessions can't be guessed, adopted, read or cleared by another client; CORS is opt-in."""

from __future__ import annotations

import base64
import signal
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from yarl import URL

from chatstream_lite import ChatStream
from chatstream_lite.server.cors import setup_cors

from .conftest import (
    GREEDY,
    Recorder,
    Server,
    build_app,
    post_chat,
    serve,
    start_cli,
)

pytestmark = pytest.mark.timeout(120)

COOKIE = "CHATSTREAM_SESSION"
ALLOWED_ORIGIN = "https://chat.example.com"
SECRET = "marmalade-7Q2Z-kestrel"



@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    async for running in serve(ChatStream(model_path, n_ctx=1024, max_new_tokens=16)):
        yield running


def _cookie(client: aiohttp.ClientSession, server: Server) -> str:
    return client.cookie_jar.filter_cookies(URL(server.url))[COOKIE].value


async def test_session_ids_carry_at_least_128_random_bits(server: Server) -> None:
    ids = set()
    for _ in range(5):
        async with server.client() as client:
            await post_chat(client, user_input="Hi", max_new_tokens=2)
            ids.add(_cookie(client, server))
    assert len(ids) == 5
    for session_id in ids:
        raw = base64.urlsafe_b64decode(session_id + "=" * (-len(session_id) % 4))
        assert len(raw) * 8 >= 128


async def test_an_unknown_session_id_from_the_client_is_never_adopted(server: Server) -> None:
    chosen = "attacker-chosen-session-id"
    async with aiohttp.ClientSession(server.url) as client:
        async with client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2},
                               headers={"Cookie": f"{COOKIE}={chosen}"}) as response:
            await response.read()
            issued = response.cookies[COOKIE].value
    assert issued != chosen and len(issued) >= 43
    storage = server.chat_stream.session_store.storage
    assert chosen not in storage._data and issued in storage._data  # type: ignore[attr-defined]


async def test_one_session_cannot_clear_or_read_anothers_history(server: Server) -> None:
    async with server.client() as alice, server.client() as mallory:
        await post_chat(alice, user_input=f"Alice's note: the vault code is {SECRET}.", max_new_tokens=4, **GREEDY)
        await post_chat(mallory, user_input="Hello", max_new_tokens=2)
        async with mallory.post("/clear_context", json={}) as response:
            assert response.status == 200
        before = len(server.recorder.calls)
        await post_chat(mallory, user_input="What was the vault code?", max_new_tokens=4, **GREEDY)
        await server.recorder.wait_for(before + 1)
        mallory_history = server.recorder.calls[-1][1]
        await post_chat(alice, user_input="Still there?", max_new_tokens=2, **GREEDY)
        await server.recorder.wait_for(before + 2)
        alice_history = server.recorder.calls[-1][1]
    assert [m["content"] for m in mallory_history if m["role"] == "user"] == ["What was the vault code?"]
    assert all(SECRET not in m["content"] for m in mallory_history)
    assert alice_history[0]["content"] == f"Alice's note: the vault code is {SECRET}.", \
        "mallory's clear must not touch alice's history"


async def test_cookie_is_marked_secure_when_asked(model_path: str) -> None:
    chat_stream = ChatStream(model_path, n_ctx=512, max_new_tokens=4, cookie_secure=True)
    async for server in serve(chat_stream):
        async with aiohttp.ClientSession(server.url) as client:
            async with client.post("/chat_stream", json={"user_input": "Hi"}) as response:
                await response.read()
                header = response.headers["Set-Cookie"]
    assert "Secure" in header and "HttpOnly" in header and "SameSite=Lax" in header


async def test_no_cors_headers_unless_an_origin_is_named(server: Server) -> None:
    async with aiohttp.ClientSession(server.url) as client:
        async with client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2},
                               headers={"Origin": ALLOWED_ORIGIN}) as response:
            await response.read()
            assert "Access-Control-Allow-Origin" not in response.headers


async def test_named_origin_gets_cors_headers_on_streams_and_preflight(model_path: str) -> None:
    chat_stream = ChatStream(model_path, n_ctx=512, max_new_tokens=4)
    recorder = Recorder()
    app = build_app(chat_stream, recorder)
    setup_cors(app, [ALLOWED_ORIGIN])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}") as client:
            async with client.options("/chat_stream", headers={
                    "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type"}) as preflight:
                assert preflight.status == 204
                assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
            async with client.post("/chat_stream", json={"user_input": "Hi"},
                                   headers={"Origin": ALLOWED_ORIGIN}) as response:
                assert response.status == 200 and await response.text()
                assert response.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
                assert response.headers["Access-Control-Allow-Credentials"] == "true"
            async with client.post("/chat_stream", json={"user_input": "Hi"},
                                   headers={"Origin": "https://evil.example"}) as response:
                await response.read()
                assert "Access-Control-Allow-Origin" not in response.headers
    finally:
        await runner.cleanup()


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=60)[0]


@pytest.mark.model
async def test_the_api_key_can_guard_the_chat_endpoints_too() -> None:
    process, url = await start_cli("--api-key-guards-chat", CHATSTREAM_API_KEY="k3y-for-tests")
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{url}/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2}) as r:
                assert r.status == 401 and (await r.json())["error"] == "invalid_api_key"
            async with client.post(f"{url}/clear_context") as r:
                assert r.status == 401
            async with client.post(f"{url}/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2},
                                   headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with client.post(f"{url}/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2},
                                   headers={"Authorization": "Bearer k3y-for-tests"}) as r:
                assert r.status == 200 and await r.text()
    finally:
        log = _stop(process)
    assert "k3y-for-tests" not in log


@pytest.mark.model
async def test_listening_beyond_loopback_without_a_key_logs_a_warning() -> None:
    process, _ = await start_cli("--host", "0.0.0.0")
    log = _stop(process)
    assert "without an API key" in log
    process, _ = await start_cli()
    assert "without an API key" not in _stop(process)


@pytest.mark.model
async def test_oversized_request_heads_are_refused_and_the_server_keeps_serving() -> None:
    # The CLI's limits (cli.HEADER_LIMITS: 8,190 bytes a line or header, 64 headers): aiohttp's
    # parser answers 400 in plain text before any handler runs, so there is no JSON body.
    process, url = await start_cli()
    try:
        async with aiohttp.ClientSession() as client:
            huge = {"X-Padding": "a" * 9000}
            async with client.post(f"{url}/chat_stream", json={"user_input": "Hi"}, headers=huge) as r:
                assert r.status == 400 and r.content_type == "text/plain"
                assert (await r.text()).startswith("Got more than 8190 bytes when reading")
            many = {f"X-H{i}": "1" for i in range(80)}
            async with client.post(f"{url}/chat_stream", json={"user_input": "Hi"}, headers=many) as r:
                assert r.status == 400 and r.content_type == "text/plain"
                assert await r.text() == "Too many headers received"
            # Just under both limits (with the client's own few headers): served.
            within = {"X-Padding": "a" * 8000, **{f"X-H{i}": "1" for i in range(50)}}
            async with client.post(f"{url}/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2},
                                   headers=within) as r:
                assert r.status == 200 and await r.text()
            async with client.post(f"{url}/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2}) as r:
                assert r.status == 200 and await r.text()
    finally:
        _stop(process)
