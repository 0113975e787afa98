"""The chat page as a person uses it, in a real headless Chromium: the history after a reload,
Markdown replies (and HTML in them never running), the model-loading state, the keyboard alone,
and a phone-width screen.

Replies come from the real model (greedy, short), except where a test needs a reply whose
text it chooses (HTML that tries to run, a long Markdown reply at 200 words/s): those come
from the product's mock engine, through the same server, stream and page.
Screenshots go to test-artifacts/; with CHATSTREAM_SCREENSHOTS=docs the two the README shows
(docs/page.png, docs/page-phone.png: the real model, at a normal and a phone width) are
written too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from chatstream_lite import ChatStream

from .conftest import GREEDY, Server, build_full_app, serve, wait_until
from .test_model_loading import HeldLoad
from .test_ui_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DOCS = ROOT / "docs"
log = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install -y "
                       "chromium, as .ci/run does; or set CHATSTREAM_CHROMIUM)"),
]
expect.set_options(timeout=WAIT_MS)

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 900, "height": 700}
LIST_QUESTION = "List three fruits as a Markdown list."
CODE_QUESTION = "Now some code: a Python function that adds two numbers."

# What a hostile reply might carry; none of it may run. Each sets window.pwned if it runs.
HOSTILE = """Here you go <img src=x onerror="window.pwned='img'"> and more.

<script>window.pwned = 'script'</script>

<svg onload="window.pwned='svg'"></svg> <iframe srcdoc="<script>parent.pwned='iframe'</script>"></iframe>

[click me](javascript:window.pwned='link') and <a href="javascript:window.pwned='a'">this</a>
![tracker](http://198.51.100.1/pixel.png)
"""

# A long reply for the render-cost measurement and the phone layout: every kind of block.
LONG_MARKDOWN = "\n\n".join([
    "## Results {user}",
    "Some **bold** and *italic* text with `inline code` and a [link](https://example.org).",
    "1. first item\n2. second item\n3. third item",
    "```python\ndef a_function_with_a_long_line(argument_one, argument_two, argument_three):"
    "\n    return argument_one + argument_two + argument_three  # a comment that goes on\n```",
    "| column one | column two | column three | column four |\n|---|---|---|---|\n"
    "| 1 | 2 | 3 | 4 |\n| 5 | 6 | 7 | 8 |",
    "> a quote, and then a long paragraph: " + "word " * 60,
] * 8)


@pytest_asyncio.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=40, **GREEDY)
    async for running in serve(chat_stream, build_full_app):
        yield running


@pytest_asyncio.fixture(scope="module")
async def mock_server() -> AsyncIterator[Server]:
    # 5 ms a word: 200 words/s, faster than any model on this machine streams.
    chat_stream = ChatStream(mock=True, mock_delay=0.005, mock_text="{user}", n_ctx=16384,
                             max_new_tokens=4000)
    async for running in serve(chat_stream, build_full_app):
        yield running


@pytest.fixture(autouse=True)
def no_hook(server: Server) -> None:
    server.chat_stream.engine.faults.before_token = None


class Tab:
    """A page in its own browser context (its own cookie jar: one chat session), with every
    console error and uncaught exception collected (a CSP violation is a console error)."""

    def __init__(self, context: BrowserContext, page: Page) -> None:
        self.context = context
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    @classmethod
    async def open(cls, browser: Browser, url: str, viewport: dict[str, int] = DESKTOP) -> Tab:
        context = await browser.new_context(viewport=viewport)  # type: ignore[arg-type]
        context.set_default_timeout(WAIT_MS)
        tab = cls(context, await context.new_page())
        await tab.page.goto(url + "/")
        return tab

    async def close(self) -> None:
        await self.context.close()

    async def send(self, text: str) -> None:
        """Type and press Enter; return once the reply has ended (Stop disabled again)."""
        count = await self.page.locator(".message").count()
        await self.page.fill("#input", text)
        await self.page.press("#input", "Enter")
        await expect(self.page.locator(".message")).to_have_count(count + 2)
        await expect(self.page.locator("#stop")).to_be_disabled()

    async def raw_replies(self) -> list[str]:
        return list(await self.page.evaluate(
            "() => [...document.querySelectorAll('.message.assistant')].map(m => m.raw)"))


async def _history(server: Server, tab: Tab) -> list[dict[str, str]]:
    """GET /history with the tab's own session cookie."""
    response = await tab.context.request.get(server.url + "/history")
    assert response.status == 200
    return list((await response.json())["messages"])


async def _screenshot(page: Page, name: str, docs_name: str | None = None) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / name))
    if docs_name and os.environ.get("CHATSTREAM_SCREENSHOTS") == "docs":
        await page.screenshot(path=str(DOCS / docs_name))


async def test_a_reload_shows_the_history_and_clear_empties_server_and_page(
        server: Server, browser: Browser) -> None:
    tab = await Tab.open(browser, server.url)
    page = tab.page
    try:
        await expect(page.locator("#send")).to_be_enabled()
        await tab.send(LIST_QUESTION)
        before = await tab.raw_replies()
        await page.reload()
        await expect(page.locator(".message")).to_have_count(2)
        await expect(page.locator(".message.user")).to_have_text(LIST_QUESTION)
        assert await tab.raw_replies() == before and before[0]
        # The model's Markdown list, rendered from the history as it was while streaming.
        assert before[0].count("\n") >= 2, before
        await expect(page.locator(".message.assistant").locator("ol li, ul li")).to_have_count(3)
        assert await _history(server, tab) == [
            {"role": "user", "content": LIST_QUESTION},
            {"role": "assistant", "content": before[0]}]
        await expect(page.locator("#regenerate")).to_be_enabled()   # a reply to regenerate

        await page.click("#clear")
        await expect(page.locator(".message")).to_have_count(0)
        assert await _history(server, tab) == []
        await page.reload()
        await expect(page.locator("#empty")).to_be_visible()
        await expect(page.locator(".message")).to_have_count(0)
        assert tab.errors == []
    finally:
        await tab.close()


async def test_real_replies_in_markdown_render_a_list_and_code_with_a_copy_button(
        server: Server, browser: Browser) -> None:
    tab = await Tab.open(browser, server.url)
    page = tab.page
    try:
        await tab.context.grant_permissions(["clipboard-read", "clipboard-write"])
        await expect(page.locator("#send")).to_be_enabled()
        await tab.send(LIST_QUESTION)
        await tab.send(CODE_QUESTION)
        listed, coded = (page.locator(".message.assistant").nth(i) for i in (0, 1))
        raw = await tab.raw_replies()
        assert raw[0].count("\n") >= 2 and "```" in raw[1], raw   # what the model wrote
        await expect(listed.locator("ol li, ul li")).to_have_count(3)
        code = coded.locator(".code pre code")
        await expect(code).to_contain_text("def ")
        assert "```" not in (await coded.locator(".text").text_content() or "")
        font = await code.evaluate("e => getComputedStyle(e).fontFamily")
        assert "mono" in font.lower()
        await _screenshot(page, "page.png", "page.png")
        await page.set_viewport_size(PHONE)
        await _screenshot(page, "page-phone.png", "page-phone.png")
        await page.set_viewport_size(DESKTOP)

        await coded.locator("button.copy").click()
        await expect(coded.locator("button.copy")).to_have_text("Copied")
        copied = await page.evaluate("() => navigator.clipboard.readText()")
        assert copied == await code.text_content() and "def " in copied
        assert tab.errors == []
    finally:
        await tab.close()


async def test_html_in_a_reply_never_runs(mock_server: Server, browser: Browser) -> None:
    tab = await Tab.open(browser, mock_server.url)
    page = tab.page
    try:
        # The page's own render function, fed the text directly...
        await page.evaluate("""text => {
            const bubble = document.createElement('div');
            bubble.id = 'direct';
            bubble.append(window.chatstreamLite.renderMarkdown(text));
            document.querySelector('#messages').append(bubble);
        }""", HOSTILE)
        # ...and a whole reply streamed from the server with it (the mock echoes the message).
        await tab.send(HOSTILE)
        reply = page.locator(".message.assistant .text")
        for where in (page.locator("#direct"), reply):
            for tag in ("img", "script", "svg", "iframe"):
                assert await where.locator(tag).count() == 0, tag
            assert await where.locator("[onerror], [onload]").count() == 0
            hrefs = await where.locator("a").evaluate_all("as => as.map(a => a.href)")
            assert not [h for h in hrefs if h.lower().startswith("javascript:")], hrefs
            # The HTML is shown as the text it is.
            await expect(where).to_contain_text("<script>window.pwned = 'script'</script>")
        for link in await reply.locator('a:not([href^="http"])').all():
            await link.click()                         # the javascript: ones lost their href
        await page.wait_for_timeout(300)               # an onerror would have fired by now
        assert await page.evaluate("() => window.pwned") is None
        # Nothing even tried: CSP would have blocked an inline script, and said so here.
        assert tab.errors == []
    finally:
        await tab.close()


async def test_a_fast_stream_is_rendered_at_most_once_a_frame(
        mock_server: Server, browser: Browser) -> None:
    tab = await Tab.open(browser, mock_server.url)
    page = tab.page
    try:
        await page.evaluate("() => Object.assign(window.chatstreamLite.renderStats, "
                            "{renders: 0, ms: 0, maxMs: 0, chunks: 0})")
        started = time.monotonic()
        await tab.send(LONG_MARKDOWN.replace("{user}", ""))
        elapsed = time.monotonic() - started
        stats = await page.evaluate("() => window.chatstreamLite.renderStats")
        words = len(LONG_MARKDOWN.split())
        log.info("render cost: %s", json.dumps({
            "reply_chars": len(LONG_MARKDOWN), "words": words, "seconds": round(elapsed, 2),
            "words_per_s": round(words / elapsed),
            "chunks": stats["chunks"], "renders": stats["renders"],
            "mean_ms": round(stats["ms"] / stats["renders"], 2),
            "max_ms": round(stats["maxMs"], 2), "busy_share": round(stats["ms"] / 1000 / elapsed, 3)}))
        assert stats["chunks"] > 200
        # Once per animation frame (60 a second) at most, plus the final render.
        assert stats["renders"] <= elapsed * 60 * 1.1 + 2
        assert stats["renders"] < stats["chunks"]
        await expect(page.locator(".message.assistant .code")).to_have_count(8)
        # Rendered block by block as it streamed, it reads exactly as rendered whole.
        assert await page.evaluate("""() => {
            const reply = document.querySelector('.message.assistant');
            const whole = document.createElement('div');
            whole.append(window.chatstreamLite.renderMarkdown(reply.raw));
            return reply.querySelector('.text').innerHTML === whole.innerHTML;
        }""")
        assert tab.errors == []
    finally:
        await tab.close()


async def test_the_page_shows_the_model_loading_then_enables_send(
        model_path: str, browser: Browser) -> None:
    held = HeldLoad(at=0.5)
    chat_stream = ChatStream(model_path, n_ctx=512, max_new_tokens=8, load_in_background=True,
                             **GREEDY)
    chat_stream.engine.faults.during_load = held  # type: ignore[attr-defined]
    async for server in serve(chat_stream, build_full_app):
        tab: Tab | None = None
        try:
            await wait_until(held.reached.is_set, timeout=30)
            tab = await Tab.open(browser, server.url)
            page = tab.page
            assert held.fraction is not None
            percent = int(round(held.fraction, 3) * 100 + 1e-9)   # /health gives 3 decimals
            await expect(page.locator("#loading")).to_be_visible()
            await expect(page.locator("#loading-text")).to_have_text(
                f"Loading the model… {percent} %")
            await expect(page.locator("#send")).to_be_disabled()
            await page.fill("#input", "Hello!")
            await page.press("#input", "Enter")           # nothing is sent while it loads
            await expect(page.locator(".message")).to_have_count(0)
            await _screenshot(page, "page-loading.png")
            held.release()
            await expect(page.locator("#loading")).to_be_hidden()
            await expect(page.locator("#send")).to_be_enabled()
            await expect(page.locator("#model")).to_have_text("SmolLM2-135M-Instruct.Q4_1")
            await page.press("#input", "Enter")           # the kept message goes now
            await expect(page.locator(".message")).to_have_count(2)
            await expect(page.locator("#stop")).to_be_disabled()
            assert (await tab.raw_replies())[0]
            # Chromium logs each 503 of /health as a failed resource: the only errors here.
            assert [e for e in tab.errors if "status of 503" not in e] == []
        finally:
            held.release()
            if tab is not None:
                await tab.close()


def _slow_tokens(index: int) -> None:
    time.sleep(0.1)


async def test_the_keyboard_alone_sends_breaks_lines_and_stops(
        server: Server, browser: Browser) -> None:
    tab = await Tab.open(browser, server.url)
    page = tab.page
    try:
        await expect(page.locator("#send")).to_be_enabled()
        await expect(page.locator("#input")).to_be_focused()      # ready to type at once
        await page.keyboard.type("Count from one to twenty,")
        await page.keyboard.press("Shift+Enter")
        await page.keyboard.type("one number a line.")
        await expect(page.locator("#input")).to_have_value(
            "Count from one to twenty,\none number a line.")
        await expect(page.locator(".message")).to_have_count(0)   # Shift+Enter did not send

        server.chat_stream.engine.faults.before_token = _slow_tokens
        calls = len(server.recorder.calls)
        await page.keyboard.press("Enter")
        await expect(page.locator(".message.user")).to_have_text(
            "Count from one to twenty,\none number a line.")
        await page.wait_for_function("() => document.querySelector("
                                     "'.message.assistant.streaming')?.raw.length > 0")
        await page.keyboard.press("Escape")
        await expect(page.locator(".message.assistant .tag")).to_contain_text("stopped")
        await server.recorder.wait_for(calls + 1)
        assert server.recorder.statuses[-1] == "client_disconnected_while_streaming"

        # Tab reaches the buttons, and the focused one shows a ring.
        await page.keyboard.press("Tab")
        await expect(page.locator("#send")).to_be_focused()
        ring = await page.locator("#send").evaluate(
            "e => { const s = getComputedStyle(e); return [s.outlineStyle, s.outlineWidth]; }")
        assert ring[0] != "none" and ring[1] != "0px", ring
        assert tab.errors == []
    finally:
        await tab.close()


async def test_a_phone_width_screen_has_no_sideways_scroll_and_a_usable_composer(
        mock_server: Server, browser: Browser) -> None:
    tab = await Tab.open(browser, mock_server.url, viewport=PHONE)
    page = tab.page
    try:
        await tab.send(LONG_MARKDOWN.split("\n\n> ")[0].replace("{user}", "on a phone"))
        await expect(page.locator(".message.assistant .code").first).to_be_visible()
        width = await page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
        assert width[0] <= width[1], width
        for control in ("#input", "#send", "#stop", "#regenerate", "#clear"):
            box = await page.locator(control).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
            assert box["y"] + box["height"] <= PHONE["height"], control   # on screen, no scroll
        # The code block scrolls inside itself, not the page.
        pre = page.locator(".message.assistant .code pre").first
        overflow = await pre.evaluate("e => [e.scrollWidth > e.clientWidth, "
                                      "getComputedStyle(e).overflowX]")
        assert overflow == [True, "auto"]
        await _screenshot(page, "page-phone-layout.png")
        assert tab.errors == []
    finally:
        await tab.close()
