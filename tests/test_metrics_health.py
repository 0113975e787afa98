"""/health and /metrics on the real model: scraped with prometheus-client's parser after real
requests of every outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from chatstream_lite import ChatStream
from chatstream_lite.engine import ModelInfo
from chatstream_lite.engine.protocol import Died
from chatstream_lite.server import health
from chatstream_lite.server.health import CheckResult

from .conftest import (
    GREEDY,
    Gate,
    RawStream,
    Server,
    build_full_app,
    post_chat,
    sample,
    scrape,
    serve,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

MAX_QUEUE_SIZE = 1
ENDPOINT = "chat_stream"


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=32,
                             max_queue_size=MAX_QUEUE_SIZE)
    async for running in serve(chat_stream, build_full_app):
        yield running


@pytest.fixture(autouse=True)
def no_hook(server: Server) -> None:
    server.chat_stream.engine.faults.before_token = None


async def _get(server: Server, path: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as client:
        async with client.get(server.url + path) as response:
            return response.status, await response.json()


async def test_health_reports_the_loaded_model_and_the_queue(server: Server) -> None:
    status, body = await _get(server, "/health")
    assert status == 200
    assert body == {"status": "ok", "model": "SmolLM2-135M-Instruct.Q4_1", "gpu_offload": False,
                    "running": 0, "queued": 0, "max_queue_size": MAX_QUEUE_SIZE,
                    "engine": "ready", "load_progress": 1.0, "session_store": "memory",
                    "checks": {"engine": True, "session_store": True}}


async def test_metrics_count_every_outcome_tokens_and_latency(server: Server) -> None:
    engine = server.chat_stream.engine
    admission = server.chat_stream.runtime.admission
    before = await scrape(server)
    calls_before = len(server.recorder.calls)
    stats_before = (engine.stats.prompt_tokens, engine.stats.completion_tokens)
    gate = Gate()
    engine.faults.before_token = gate
    async with server.client() as alice, server.client() as bob, server.client() as carol:
        running = asyncio.create_task(post_chat(alice, user_input="Hello", max_new_tokens=8, **GREEDY))
        await gate.wait_reached()
        queued = asyncio.create_task(post_chat(bob, user_input="Hi", max_new_tokens=8, **GREEDY))
        await wait_until(lambda: admission.queued == 1)
        held = await scrape(server)                       # gauges, read while the gate holds
        full, _ = await post_chat(carol, user_input="Hey", max_new_tokens=8)
        bad, _ = await post_chat(carol, user_input=5)
        gate.open()
        assert [(await running)[0], (await queued)[0], full, bad] == [200, 200, 429, 400]
    engine.faults.before_token = None
    stream = await RawStream.post(server, {"user_input": "Write a long story.", "max_new_tokens": 32})
    await stream.read_headers()
    assert await stream.read_chunk()
    stream.close()
    await server.recorder.wait_for(calls_before + 3)
    await wait_until(lambda: admission.running == 0)
    after = await scrape(server)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert sample(held, "chatstream_running_generations") == 1
    assert sample(held, "chatstream_queue_depth") == 1
    assert sample(after, "chatstream_running_generations") == 0
    assert delta("chatstream_requests_total", endpoint=ENDPOINT, status="success") == 2
    assert delta("chatstream_requests_total", endpoint=ENDPOINT,
                 status="client_disconnected_while_streaming") == 1
    assert delta("chatstream_requests_total", endpoint=ENDPOINT, status="rejected") == 2
    assert delta("chatstream_rejected_requests_total", endpoint=ENDPOINT,
                 code="too_many_requests") == 1
    assert delta("chatstream_rejected_requests_total", endpoint=ENDPOINT, code="bad_request") == 1
    assert delta("chatstream_prompt_tokens_total") == engine.stats.prompt_tokens - stats_before[0]
    assert delta("chatstream_generated_tokens_total") == (
        engine.stats.completion_tokens - stats_before[1])
    assert delta("chatstream_generated_tokens_total") > 8
    assert delta("chatstream_time_to_first_token_seconds_count", endpoint=ENDPOINT) == 3
    assert delta("chatstream_time_to_first_token_seconds_sum", endpoint=ENDPOINT) > 0
    assert delta("chatstream_token_latency_seconds_count", endpoint=ENDPOINT) >= 2
    assert delta("chatstream_token_latency_seconds_bucket", endpoint=ENDPOINT, le="+Inf") == (
        delta("chatstream_token_latency_seconds_count", endpoint=ENDPOINT))


async def test_a_plugged_in_check_adds_its_field_and_can_fail_the_probe(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"ok": True}

    async def store() -> CheckResult:
        return CheckResult(state["ok"], {"store": "ok" if state["ok"] else "unreachable"})

    async def hangs() -> CheckResult:
        await asyncio.sleep(60)
        raise AssertionError("never reached")

    checks = server.chat_stream.health
    saved = dict(checks._checks)
    monkeypatch.setattr(health, "CHECK_TIMEOUT", 0.2)
    try:
        checks.add_check("store", store)
        status, body = await _get(server, "/health")
        assert status == 200 and body["status"] == "ok" and body["store"] == "ok"
        state["ok"] = False
        status, body = await _get(server, "/health")
        assert status == 503 and body["status"] == "unavailable"
        assert body["store"] == "unreachable" and body["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert body["checks"] == {"engine": True, "session_store": True, "store": False}
        checks.add_check("slow", hangs)
        state["ok"] = True
        status, body = await _get(server, "/health")
        assert status == 503 and body["slow"] == {"status": "error", "error": "timed out"}
    finally:
        checks._checks = saved


async def test_a_check_that_is_not_critical_degrades_health_and_fails_only_ready(
        server: Server) -> None:
    state = {"ok": True}

    async def cache() -> CheckResult:
        return CheckResult(state["ok"], {"cache": "ok" if state["ok"] else "unreachable"})

    checks = server.chat_stream.health
    saved, optional = dict(checks._checks), set(checks._optional)
    try:
        checks.add_check("cache", cache, critical=False)
        for path in ("/health", "/ready"):
            status, body = await _get(server, path)
            assert status == 200 and body["status"] == "ok" and body["cache"] == "ok"
        state["ok"] = False
        status, body = await _get(server, "/health")
        assert status == 200 and body["status"] == "degraded"
        assert body["cache"] == "unreachable" and body["engine"] == "ready"
        assert body["checks"] == {"engine": True, "session_store": True, "cache": False}
        status, body = await _get(server, "/ready")
        assert status == 503 and body["status"] == "unavailable"
        assert body["checks"] == {"engine": True, "session_store": True, "cache": False}
    finally:
        checks._checks, checks._optional = saved, optional


async def test_the_session_store_series_are_there_at_zero_with_the_memory_store(
        server: Server) -> None:
    metrics = await scrape(server)
    assert ("chatstream_session_store_pending_turns", frozenset()) in metrics
    assert sample(metrics, "chatstream_session_store_pending_turns") == 0
    assert sample(metrics, "chatstream_session_store_pending_lock_releases") == 0
    assert sample(metrics, "chatstream_session_store_late_writes_total") == 0
    for reason in ("full", "conflict", "stopping", "unavailable"):
        assert ("chatstream_session_store_lost_turns_total",
                frozenset({("reason", reason)})) in metrics


async def test_health_is_503_until_the_model_is_loaded(model_path: str) -> None:
    chat_stream = ChatStream(model_path, n_ctx=512, max_new_tokens=8, load_in_background=True)
    engine = chat_stream.engine
    real_start, loading_may_finish = engine.start, asyncio.Event()

    async def slow_start(died: Died) -> ModelInfo:    # a model that takes a while to load
        await loading_may_finish.wait()
        return await real_start(died)

    engine.start = slow_start  # type: ignore[method-assign]
    server = await start_server(chat_stream, build_full_app)
    try:
        status, body = await _get(server, "/health")
        assert status == 503
        assert body["status"] == "unavailable" and body["engine"] == "loading"
        assert body["checks"] == {"engine": False, "session_store": True}
        assert body["model"] is None
        async with server.client() as client:
            async with client.post("/chat_stream", json={"user_input": "Hi"}) as response:
                assert response.status == 503 and response.headers["Retry-After"] == "1"
            async with client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}]}) as response:
                assert response.status == 503
                assert (await response.json())["error"]["type"] == "unavailable_error"
        loading_may_finish.set()
        await chat_stream.wait_loaded()
        status, body = await _get(server, "/health")
        assert status == 200 and body["engine"] == "ready"
    finally:
        loading_may_finish.set()
        await server.runner.cleanup()
