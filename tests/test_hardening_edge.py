"""Issue 11, the server's edge: an API key guards everything that reaches the model or shows
state, state-changing POSTs must be JSON, a session flood cannot evict the people chatting,
and every response carries security headers (with `Vary: Origin` whenever CORS is on).

The model is not what these tests are about: the servers run `ChatStream(mock=True)` (canned
text through the same queue, sessions and callbacks) or `python -m chatstream_lite --mock`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import async_playwright, expect
from yarl import URL

from chatstream_lite import ChatStream, MemoryStorage
from chatstream_lite.server.cors import setup_cors
from chatstream_lite.sessions import NewSessionLimit

from .conftest import Recorder, Server, build_full_app, serve, start_cli, start_server
from .test_ui_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

pytestmark = pytest.mark.timeout(90)

KEY = "edge-test-key-5Zq8"
COOKIE = "CHATSTREAM_SESSION"
ALLOWED_ORIGIN = "https://chat.example.com"
STATIC = "chatstream_lite/static"


def _mock(**options: Any) -> ChatStream:
    return ChatStream(mock=True, mock_delay=0, **options)


@pytest_asyncio.fixture(scope="module")
async def keyed() -> AsyncIterator[Server]:
    async for running in serve(_mock(api_key=KEY), build_full_app):
        yield running


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[Server]:
    async for running in serve(_mock(), build_full_app):
        yield running


async def _raw(server: Server, method: str, path: str, body: bytes = b"",
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (an HTTP client adds a Content-Type of its own
    to a body), answered and closed: (status, headers, body)."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {server.host}:{server.port}",
             "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    try:
        status_line = await asyncio.wait_for(reader.readline(), 10)
        head: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            head[name.strip().lower()] = value.strip()
        rest = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(status_line.split()[1]), head, rest


# -- the API key (finding 5) ----------------------------------------------------------------
GUARDED = [
    ("POST", "/chat_stream", {"user_input": "Hi"}),
    ("POST", "/clear_context", {}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("GET", "/v1/models", None),
    ("GET", "/metrics", None),
]


async def test_a_key_guards_every_route_that_reaches_the_model_or_shows_state(
        keyed: Server) -> None:
    async with keyed.client() as client:
        for method, path, body in GUARDED:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with client.request(method, path, json=body, headers=headers) as r:
                    assert r.status == 401, (method, path, headers)
        authorized = {"Authorization": f"Bearer {KEY}"}
        for method, path, body in GUARDED:
            async with client.request(method, path, json=body, headers=authorized) as r:
                assert r.status == 200, (method, path)
                assert await r.read()


async def test_with_a_key_the_health_check_and_the_page_stay_open(keyed: Server) -> None:
    async with keyed.client() as client:
        for path in ("/health", "/", "/static/app.js", "/static/style.css"):
            async with client.get(path) as r:
                assert r.status == 200, path


async def test_api_key_open_chat_opens_the_chat_routes_and_nothing_else() -> None:
    process, url = await start_cli("--mock", CHATSTREAM_API_KEY=KEY,
                                   CHATSTREAM_API_KEY_OPEN_CHAT="1")
    try:
        async with aiohttp.ClientSession(url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as c:
            async with c.post("/chat_stream", json={"user_input": "Hi"}) as r:
                assert r.status == 200 and await r.text()
            async with c.post("/clear_context", json={}) as r:
                assert r.status == 200
            for method, path, body in GUARDED[2:]:
                async with c.request(method, path, json=body) as r:
                    assert r.status == 401, path
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


# -- JSON only on state-changing POSTs (finding 6) --------------------------------------------
async def test_posts_that_are_not_json_get_415_and_write_nothing(server: Server) -> None:
    async with server.client() as alice:
        async with alice.post("/chat_stream", json={"user_input": "My own words."}) as r:
            assert r.status == 200
            await r.read()
        cookie = alice.cookie_jar.filter_cookies(URL(server.url))[COOKIE].value
    calls = len(server.recorder.calls)
    storage = server.chat_stream.session_store.storage
    stored = storage._data[cookie][1]  # type: ignore[attr-defined]
    forged = json.dumps({"user_input": "Forged words."}).encode()
    completion = json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode()
    # What a page on another origin (or another port of localhost) can send without a
    # preflight: no Content-Type, text/plain, a form.
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        headers = {"Cookie": f"{COOKIE}={cookie}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        for path, body in (("/chat_stream", forged), ("/clear_context", b""),
                           ("/v1/chat/completions", completion)):
            status, _, answer = await _raw(server, "POST", path, body, headers)
            assert status == 415, (path, content_type, answer)
    assert len(server.recorder.calls) == calls
    assert storage._data[cookie][1] == stored  # type: ignore[attr-defined]


# -- a session flood (finding 7) --------------------------------------------------------------
async def _fresh_chat(server: Server) -> aiohttp.ClientResponse:
    async with server.client() as client:
        async with client.post("/chat_stream", json={"user_input": "flood"}) as r:
            await r.read()
            return r


async def test_a_session_flood_never_evicts_an_active_conversation() -> None:
    async for server in serve(_mock(max_sessions=5), build_full_app):
        async with server.client() as alice:
            async with alice.post("/chat_stream", json={"user_input": "Remember 42."}) as r:
                assert r.status == 200
                await r.read()
            flood = [await _fresh_chat(server) for _ in range(10)]
            async with alice.post("/chat_stream", json={"user_input": "What number?"}) as r:
                assert r.status == 200
                await r.read()
        history = server.recorder.calls[-1][1]
        assert [m["content"] for m in history if m["role"] == "user"] == [
            "Remember 42.", "What number?"]
        assert [r.status for r in flood] == [200] * 4 + [429] * 6
        refused = flood[-1]
        assert int(refused.headers["Retry-After"]) >= 1
        assert len(server.chat_stream.session_store.storage) == 5  # type: ignore[arg-type]


async def test_sessions_idle_past_the_active_window_make_room_for_new_ones() -> None:
    # 2 s, not less: the four requests must all fall inside it, on a loaded 2-core machine too.
    storage = MemoryStorage(max_sessions=3, active_window=2.0)
    async for server in serve(_mock(session_storage=storage), build_full_app):
        assert [(await _fresh_chat(server)).status for _ in range(4)] == [200, 200, 200, 429]
        # The rule is about time: wait until the last of the three was used a window ago.
        inactive_at = max(used for used, _ in storage._data.values()) + storage.active_window
        while time.monotonic() <= inactive_at:
            await asyncio.sleep(0.05)
        assert (await _fresh_chat(server)).status == 200
        assert len(storage) == 3


async def test_new_sessions_are_limited_per_client_address() -> None:
    limit = NewSessionLimit(burst=3, per_minute=60, include_loopback=True)
    async for server in serve(_mock(session_storage=MemoryStorage(new_session_limit=limit)),
                              build_full_app):
        async with server.client() as known:
            async with known.post("/chat_stream", json={"user_input": "Hi"}) as r:
                assert r.status == 200
                await r.read()
            fresh = [await _fresh_chat(server) for _ in range(3)]
            assert [r.status for r in fresh] == [200, 200, 429]
            assert fresh[-1].headers["Retry-After"] == "1"
            async with known.post("/chat_stream", json={"user_input": "Still me"}) as r:
                assert r.status == 200   # an existing session is not a new one
                await r.read()


# -- security headers (finding 10) ------------------------------------------------------------
def _policy(header: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in header.split(";") if d.strip()}


async def test_the_page_gets_a_strict_content_security_policy(server: Server) -> None:
    async with aiohttp.ClientSession(server.url) as client:
        async with client.get("/") as r:
            assert r.status == 200
            policy = _policy(r.headers["Content-Security-Policy"])
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["X-Frame-Options"] == "DENY"
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"] and policy["default-src"] == ["'none'"]
    assert not any("unsafe" in source for sources in policy.values() for source in sources)


async def test_every_response_says_nosniff_and_cannot_be_framed(server: Server) -> None:
    async with server.client() as client:
        for method, path, body in [("GET", "/static/app.js", None), ("GET", "/health", None),
                                   ("GET", "/metrics", None), ("GET", "/nowhere", None),
                                   ("POST", "/chat_stream", {"user_input": "Hi"}),
                                   ("POST", "/chat_stream", {"nonsense": 1})]:
            async with client.request(method, path, json=body) as r:
                await r.read()
                assert r.headers.get("X-Content-Type-Options") == "nosniff", path
                assert "frame-ancestors 'none'" in r.headers.get("Content-Security-Policy", "")


class _InlineCode(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "style" or "style" in names or any(n.startswith("on") for n in names):
            self.found.append(f"<{tag} {sorted(names)}>")
        if tag == "script" and "src" not in names:
            self.found.append("<script> without src")
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.found.append("script text")


async def test_the_page_has_no_inline_script_or_style(server: Server) -> None:
    async with aiohttp.ClientSession(server.url) as client:
        async with client.get("/") as r:
            page = await r.text()
    parser = _InlineCode()
    parser.feed(page)
    assert parser.found == []


async def test_vary_origin_on_every_response_when_cors_is_on() -> None:
    chat_stream = _mock()
    app = build_full_app(chat_stream, Recorder())
    setup_cors(app, [ALLOWED_ORIGIN])
    server = await start_server(chat_stream, lambda _c, _r: app)
    try:
        async with aiohttp.ClientSession(server.url) as client:
            for origin in (ALLOWED_ORIGIN, "https://evil.example", None):
                headers = {"Origin": origin} if origin else {}
                for method, path, body in [("GET", "/health", None),
                                           ("POST", "/chat_stream", {"user_input": "Hi"})]:
                    async with client.request(method, path, json=body, headers=headers) as r:
                        await r.read()
                        assert r.headers.getall("Vary", []) == ["Origin"], (origin, path)
            async with client.options("/chat_stream", headers={
                    "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"}) as r:
                assert r.status == 204 and r.headers.getall("Vary", []) == ["Origin"]
    finally:
        await server.runner.cleanup()


async def test_without_cors_nothing_varies_by_origin(server: Server) -> None:
    async with aiohttp.ClientSession(server.url) as client:
        async with client.get("/health", headers={"Origin": ALLOWED_ORIGIN}) as r:
            assert "Vary" not in r.headers



# -- the page with a key: it asks for it, and keeps to its own policy -------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install -y chromium)")
async def test_the_page_asks_for_the_api_key_and_sends_it(keyed: Server) -> None:
    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.set_default_timeout(WAIT_MS)
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            await page.goto(keyed.url + "/")
            await expect(page.locator("#model")).to_have_text("mock")

            # Without a key: refused, the message is given back, and the key is asked for.
            await page.fill("#input", "Hello with a key")
            await page.press("#input", "Enter")
            await expect(page.locator("#notice")).to_contain_text("needs an API key")
            await expect(page.locator("#key-form")).to_be_visible()
            await expect(page.locator("#input")).to_have_value("Hello with a key")

            await page.fill("#key", "not-the-key")
            await page.press("#key", "Enter")
            await expect(page.locator("#notice")).to_contain_text("not accepted")

            # The right key: the message goes out again on its own, with the key.
            calls = len(keyed.recorder.calls)
            await page.fill("#key", KEY)
            await page.press("#key", "Enter")
            await expect(page.locator("#key-form")).to_be_hidden()
            await keyed.recorder.wait_for(calls + 1)
            assert keyed.recorder.statuses[-1] == "success"
            await expect(page.locator(".message.assistant .text")).not_to_have_text("")

            await page.click("#clear")                 # a JSON POST with the key: 200
            await expect(page.locator(".message")).to_have_count(0)
            await expect(page.locator("#notice")).to_be_hidden()
        finally:
            await browser.close()
    assert not [text for text in console if "Content Security Policy" in text], console


# -- a body that never arrives -------------------------------------------------------------
@pytest.mark.parametrize("path", ["/chat_stream", "/v1/chat/completions"])
async def test_a_body_that_stalls_after_the_head_gets_408_and_frees_the_handler(
        path: str) -> None:
    async for server in serve(_mock(body_timeout=1.0), build_full_app):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 100\r\n\r\n")
        writer.write(head.encode() + b'{"user_inp')      # 10 of the 100 bytes, then nothing
        started = asyncio.get_running_loop().time()
        try:
            status_line = await asyncio.wait_for(reader.readline(), 10)
            waited = asyncio.get_running_loop().time() - started
            while await reader.readline() not in (b"\r\n", b""):
                pass
            body = await asyncio.wait_for(reader.read(200), 10)
        finally:
            writer.close()
        assert status_line.split()[1] == b"408", status_line
        assert 0.9 <= waited < 5, waited
        assert b"request_timeout" in body
        async with aiohttp.ClientSession() as client:     # the server goes on serving
            async with client.post(server.url + "/chat_stream",
                                   json={"user_input": "Hi"}) as response:
                assert response.status == 200 and await response.text()
