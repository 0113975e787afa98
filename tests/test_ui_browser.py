"""The chat UI at GET /, driven in a real headless Chromium (Debian's `chromium` through
Playwright) against the real model: type, watch the reply grow, Stop, Regenerate, Clear."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect

from chatstream_lite import ChatStream

from .conftest import Server, build_full_app, serve

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def _chromium() -> str | None:
    found = os.environ.get("CHATSTREAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return found if os.path.exists(found) else None


CHROMIUM = _chromium()
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install -y "
                       "chromium, as .ci/run does; or set CHATSTREAM_CHROMIUM)"),
]
# Playwright's own browser download does not work here; Debian's build needs these flags
# to run headless as root in a container without a GPU or network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
# Playwright waits 5-30 s by default; a busy 2-core CI machine evaluating a prompt may need
# longer. pytest-timeout still bounds every test.
WAIT_MS = 90_000
expect.set_options(timeout=WAIT_MS)


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    # Greedy (temperature 0, no repeat penalty): the UI sends only the message.
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=48, temperature=0.0,
                             repeat_penalty=1.0, max_queue_size=2)
    async for running in serve(chat_stream, build_full_app):
        yield running


@pytest.fixture(autouse=True)
def no_hook(server: Server) -> None:
    server.chat_stream.engine.faults.before_token = None


@pytest_asyncio.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


def _slow_tokens(index: int) -> None:
    """Engine test hook: 0.1 s per token, so a human-speed click lands mid-stream."""
    time.sleep(0.1)


async def _reply_length(page: Page) -> int:
    return int(await page.evaluate(
        "() => document.querySelector('.message.assistant:last-child .text').textContent.length"))


async def _raw_reply(page: Page) -> str:
    """The reply's text as it arrived (the page shows it rendered from Markdown)."""
    return str(await page.evaluate("() => document.querySelector('.message.assistant').raw"))


async def _history(server: Server) -> list[dict[str, str]]:
    return [m for m in server.recorder.calls[-1][1] if m["role"] != "system"]


async def test_send_stop_regenerate_clear_in_chromium(server: Server, browser: Browser) -> None:
    context = await browser.new_context(viewport={"width": 900, "height": 640})
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    recorder = server.recorder
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        await page.goto(server.url + "/")
        await expect(page.locator("#model")).to_have_text("SmolLM2-135M-Instruct.Q4_1")

        # Send: the reply appears piece by piece.
        server.chat_stream.engine.faults.before_token = _slow_tokens
        calls = len(recorder.calls)
        await page.fill("#input", "Write a long story about a brave cat.")
        await page.press("#input", "Enter")
        await expect(page.locator(".message.user")).to_have_text(
            "Write a long story about a brave cat.")
        await page.wait_for_function("() => document.querySelector("
                                     "'.message.assistant.streaming .text')?.textContent.length > 0")
        first = await _reply_length(page)
        await page.wait_for_function(
            f"() => document.querySelector('.message.assistant.streaming .text')"
            f"?.textContent.length > {first}")
        assert await page.locator(".message.assistant.streaming").count() == 1, "still streaming"

        # Stop mid-stream: the server sees the client leave and keeps the partial reply.
        await page.click("#stop")
        await expect(page.locator(".message.assistant .tag")).to_contain_text("stopped")
        await recorder.wait_for(calls + 1)
        assert recorder.statuses[-1] == "client_disconnected_while_streaming"
        shown = await _raw_reply(page)
        stored = (await _history(server))[-1]
        assert shown and stored["role"] == "assistant" and stored["content"].startswith(shown)
        await page.screenshot(path=str(ARTIFACTS / "ui-stopped.png"))

        # Regenerate: a new whole reply replaces the partial one, on screen and on the server.
        server.chat_stream.engine.faults.before_token = None
        await page.click("#regenerate")
        await recorder.wait_for(calls + 2)
        assert recorder.statuses[-1] == "success"
        await expect(page.locator("#stop")).to_be_disabled()
        regenerated = await _raw_reply(page)
        assert await page.locator(".message.assistant").count() == 1
        assert await page.locator(".message.assistant .tag").count() == 0
        assert await _history(server) == [
            {"role": "user", "content": "Write a long story about a brave cat."},
            {"role": "assistant", "content": regenerated}]
        assert regenerated and len(regenerated) > len(shown)

        # A second turn, then Clear.
        await page.fill("#input", "Give the cat a name, please.")
        await page.click("#send")
        await recorder.wait_for(calls + 3)
        await expect(page.locator("#stop")).to_be_disabled()
        assert await page.locator(".message").count() == 4
        await page.screenshot(path=str(ARTIFACTS / "ui-conversation.png"))

        # Clear: the page and the server both forget the conversation.
        await page.click("#clear")
        await expect(page.locator(".message")).to_have_count(0)
        await expect(page.locator("#empty")).to_be_visible()
        await page.fill("#input", "Hello again.")
        await page.press("#input", "Enter")
        await recorder.wait_for(calls + 4)
        assert [m["content"] for m in await _history(server) if m["role"] == "user"] == [
            "Hello again."]
    finally:
        await context.close()


async def test_busy_session_is_explained_in_words(server: Server, browser: Browser) -> None:
    context = await browser.new_context()   # two tabs, one cookie jar: one chat session
    context.set_default_timeout(WAIT_MS)
    first, second = await context.new_page(), await context.new_page()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        for page in (first, second):
            await page.goto(server.url + "/")
        server.chat_stream.engine.faults.before_token = _slow_tokens
        await first.fill("#input", "Count from one to twenty.")
        await first.press("#input", "Enter")
        await first.wait_for_function("() => document.querySelector("
                                      "'.message.assistant.streaming .text')?.textContent.length > 0")

        await second.fill("#input", "Me too!")
        await second.press("#input", "Enter")
        notice = second.locator("#notice")
        await expect(notice).to_be_visible()
        await expect(notice).to_contain_text("still answering a previous message")
        await expect(second.locator("#input")).to_have_value("Me too!")   # given back to retry
        assert await second.locator(".message").count() == 0
        await second.screenshot(path=str(ARTIFACTS / "ui-busy.png"))
        await first.click("#stop")
        await expect(first.locator("#stop")).to_be_disabled()
    finally:
        await context.close()
