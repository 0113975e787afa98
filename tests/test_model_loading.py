"""While the model loads: progress in the log, "loading" with a fraction on /health, the page
and /health served, the chat refused with 503. Real llama.cpp loads of the real model; a test
that needs the load held at a point holds it inside llama.cpp's own progress callback
(`engine.faults.during_load`)."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from chatstream_lite import ChatStream

from .conftest import Server, build_full_app, post_chat, serve, start_cli, wait_until

pytestmark = pytest.mark.timeout(90)

PROGRESS_LINE = re.compile(r"loading the model: (\d+) %")


class HeldLoad:
    """A `faults.during_load` hook: holds the engine thread inside llama.cpp's load, at the
    first reported fraction of at least `at`, until released."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.fraction: float | None = None
        self.reached = threading.Event()
        self._released = threading.Event()

    def __call__(self, fraction: float) -> None:
        if fraction >= self.at and not self.reached.is_set():
            self.fraction = fraction
            self.reached.set()
            self._released.wait(timeout=60)

    def release(self) -> None:
        self._released.set()


@asynccontextmanager
async def loading(model_path: str, hook: Callable[[float], None]) -> AsyncIterator[Server]:
    """The full app listening while its model loads (as the CLI serves), `hook` in the load."""
    chat_stream = ChatStream(model_path, n_ctx=512, max_new_tokens=4, load_in_background=True)
    chat_stream.engine.faults.during_load = hook  # type: ignore[attr-defined]
    async for server in serve(chat_stream, build_full_app):
        yield server


async def health(client: aiohttp.ClientSession) -> tuple[int, dict[str, object]]:
    async with client.get("/health") as response:
        return response.status, await response.json()


async def test_health_reports_loading_with_the_fraction_while_the_model_loads(
        model_path: str) -> None:
    held = HeldLoad(at=0.5)
    async with loading(model_path, held) as server:
        try:
            await wait_until(held.reached.is_set, timeout=30)
            async with server.client() as client:
                status, body = await health(client)
                assert status == 503
                assert body["engine"] == "loading"
                assert held.fraction is not None and body["load_progress"] == round(
                    held.fraction, 3)
                assert 0.5 <= held.fraction < 1.0
                # The page and its history are served; the chat says the model is not ready.
                async with client.get("/") as page:
                    assert page.status == 200
                async with client.get("/history") as history:
                    assert history.status == 200
                status, refusal = await post_chat(client, user_input="Hi")
                assert status == 503
                assert re.search(r"The model is loading \((5|6|7|8|9)\d%\)", refusal), refusal
        finally:
            held.release()
        await server.chat_stream.wait_loaded()
        async with server.client() as client:
            status, body = await health(client)
            assert status == 200 and body["engine"] == "ready" and body["load_progress"] == 1.0
            status, reply = await post_chat(client, user_input="Hi")
            assert status == 200 and reply


async def test_health_says_99_not_100_percent_until_the_context_is_made_too(
        model_path: str) -> None:
    # llama.cpp reports 1.0 once the weights are read; the context (KV cells, buffers) comes
    # after. Held right there, the chat still gets 503: /health must not say 100 % yet.
    held = HeldLoad(at=1.0)
    async with loading(model_path, held) as server:
        try:
            await wait_until(held.reached.is_set, timeout=30)
            async with server.client() as client:
                status, body = await health(client)
                assert status == 503 and body["engine"] == "loading"
                assert body["load_progress"] == 0.99
                status, refusal = await post_chat(client, user_input="Hi")
                assert status == 503 and "(99%)" in refusal, refusal
        finally:
            held.release()
        await server.chat_stream.wait_loaded()
        async with server.client() as client:
            status, body = await health(client)
            assert status == 200 and body["load_progress"] == 1.0


async def test_a_failing_progress_report_never_aborts_the_load(
        model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def broken(fraction: float) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in a progress report")

    async with loading(model_path, broken) as server:
        await server.chat_stream.wait_loaded()
        async with server.client() as client:
            status, reply = await post_chat(client, user_input="Hi")
    assert status == 200 and reply
    assert calls > 10      # called all along the load, raising every time
    reported = [r for r in caplog.records if "a bug in a progress report" in str(r.exc_info)]
    assert len(reported) == 1, "logged once per load, not once per report"


async def test_the_process_keeps_its_stderr_while_the_model_loads(
        model_path: str, capfd: pytest.CaptureFixture[str]) -> None:
    # llama-cpp-python's quiet load points the process's fds 1 and 2 at /dev/null for the
    # whole load: every other thread's log lines (the server answering meanwhile) would be lost.
    held = HeldLoad(at=0.5)
    async with loading(model_path, held):
        try:
            await wait_until(held.reached.is_set, timeout=30)
            os.write(2, b"written while the model loads\n")
        finally:
            held.release()
    assert "written while the model loads" in capfd.readouterr().err


@pytest.mark.model
async def test_the_cli_logs_the_load_progress_every_tenth(tmp_path: Path) -> None:
    process, url = await start_cli()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    percents = [int(p) for p in PROGRESS_LINE.findall(output)]
    assert percents and percents[-1] == 100, output
    assert percents == sorted(set(percents)) and len(percents) <= 10
    assert [p // 10 for p in percents] == sorted(set(p // 10 for p in percents))  # one a tenth
    assert "serving on http://" in output
