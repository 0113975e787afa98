"""When Redis goes away and comes back (issue 28), against a real `redis-server` with its AOF
on (`appendfsync always`: what Redis acknowledged survives a SIGKILL), real llama.cpp and
real HTTP.

- A turn whose reply streamed to the end while Redis was being killed is kept and written
  when Redis returns, before the session's next turn; meanwhile that session gets 503.
- The lock of that turn, which could not be released, is released when Redis returns: the
  session is served on the other replica within seconds, not after the lock's TTL.
- A kept turn never overwrites what another replica wrote after the lock lapsed (an outage
  longer than the lock's TTL): the loss is logged with the session and counted.
- `/health` stays 200 (degraded) while Redis is away, `/ready` is 503.
- A Redis that never returns: the kept turns are bounded, each loss is logged with its
  session, nothing hangs, and shutdown gives up on it instead of waiting.
- A replica SIGKILLed mid-stream: the other serves the session once the lock lapses.

The in-process replicas take a 60 s lock TTL, so that a session served within seconds of
Redis returning proves its lock was released, not that it expired.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from chatstream_lite import ChatStream

from .conftest import (
    GREEDY,
    ROOT,
    RedisServer,
    Server,
    build_full_app,
    free_port,
    sample,
    scrape,
    start_server,
    subprocess_env,
)

pytestmark = pytest.mark.timeout(240)

COOKIE = "CHATSTREAM_SESSION"
LOCK_PREFIX = "CHATSTREAM_LOCK_"
LOCK_TTL = 60.0
# A reply long enough to be still streaming when a test acts in the middle of it.
COUNTING = "Count from 1 to 50, separated by commas."
LONG = {"user_input": COUNTING, "max_new_tokens": 60, **GREEDY}
TIMEOUT = aiohttp.ClientTimeout(total=60)   # a stuck request fails the test, never hangs it
PENDING = "chatstream_session_store_pending_turns"
LATE = "chatstream_session_store_late_writes_total"
LOST = "chatstream_session_store_lost_turns_total"


class Pause:
    """Holds the engine thread before its next token once armed, until opened: a test acts
    while replies are mid-stream (their headers and first pieces sent, their ends not)."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.reached = threading.Event()
        self._open = threading.Event()

    def __call__(self, index: int) -> None:
        if self.armed.is_set() and not self._open.is_set():
            self.reached.set()
            self._open.wait(timeout=60)

    async def hold(self) -> None:
        self.armed.set()
        await asyncio.get_running_loop().run_in_executor(None, self.reached.wait, 30)
        assert self.reached.is_set(), "the engine never reached the pause"

    def open(self) -> None:
        self._open.set()


def replica(model_path: str, redis_url: str, **store: Any) -> ChatStream:
    from chatstream_lite import RedisSessionStore

    return ChatStream(model_path, n_ctx=1024, n_threads=1, max_new_tokens=64,
                      num_of_concurrent_executions=store.pop("parallel", 1),
                      session_store=RedisSessionStore(redis_url, lock_ttl=LOCK_TTL, **store))


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def redis_runs_after_each_test(redis_aof: RedisServer) -> Iterator[None]:
    yield
    if not redis_aof.running:
        redis_aof.start()


@pytest_asyncio.fixture(scope="module")
async def a_and_b(model_path: str, redis_aof: RedisServer) -> AsyncIterator[tuple[Server, Server]]:
    """Two replicas in this process on the one Redis, each with its own engine."""
    servers: list[Server] = []
    try:
        for _ in range(2):
            servers.append(await start_server(replica(model_path, redis_aof.url), build_full_app))
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.chat_stream.engine.faults.before_token = None
            await server.runner.cleanup()


def user() -> aiohttp.ClientSession:
    """One browser: one cookie jar, whichever replica it talks to."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=TIMEOUT)


def session_of(client: aiohttp.ClientSession, url: str) -> str:
    return client.cookie_jar.filter_cookies(URL(url))[COOKIE].value


async def chat(client: aiohttp.ClientSession, url: str, text: str) -> tuple[int, str]:
    async with client.post(url + "/chat_stream", json={
            "user_input": text, "max_new_tokens": 8, **GREEDY}) as response:
        return response.status, await response.text()


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as response:
        return response.status, await response.json()


def stored_turns(redis_server: RedisServer, session: str) -> list[dict[str, str]]:
    """The session's history as the replicas wrote it, straight from Redis."""
    with redis_server.client() as client:
        raw = client.get(f"{COOKIE}_{session}")
    assert raw is not None, "no history stored for this session"
    return json.loads(raw)["session"]["chat"]["turns"]  # type: ignore[no-any-return]


def conversation(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [message for text, reply in turns
            for message in ({"role": "user", "content": text},
                            {"role": "assistant", "content": reply})]


def logged(caplog: pytest.LogCaptureFixture, session: str, *words: str) -> list[str]:
    """Log lines that name the session (by its id's first 8 characters) and say `words`."""
    return [record.getMessage() for record in caplog.records
            if session[:8] in record.getMessage()
            and all(word in record.getMessage() for word in words)]


@dataclass
class CutTurn:
    reply: str
    lock_left: float      # seconds the turn's lock had left in Redis when Redis was killed
    killed_at: float


async def turn_across_a_redis_kill(client: aiohttp.ClientSession, server: Server,
                                   redis_server: RedisServer) -> CutTurn:
    """Streams `LONG`, SIGKILLs Redis in the middle of the reply, and reads the reply to
    its end: the client sees a whole reply with status 200."""
    pause = Pause()
    server.chat_stream.engine.faults.before_token = pause
    try:
        async with client.post(server.url + "/chat_stream", json=LONG) as response:
            assert response.status == 200
            first = await response.content.readany()
            await pause.hold()
            session = session_of(client, server.url)
            with redis_server.client() as look:
                lock_left = look.pttl(LOCK_PREFIX + session) / 1000
            redis_server.kill()
            killed_at = time.monotonic()
            pause.open()
            rest = await response.read()
    finally:
        pause.open()
        server.chat_stream.engine.faults.before_token = None
    assert first and rest
    return CutTurn((first + rest).decode(), lock_left, killed_at)


async def test_a_turn_streamed_while_redis_was_killed_is_written_when_it_returns(
        a_and_b: tuple[Server, Server], redis_aof: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    a, _ = a_and_b
    before = await scrape(a)
    async with user() as client:
        status, first = await chat(client, a.url, "Turn 1: name a fruit.")
        assert status == 200
        session = session_of(client, a.url)
        cut = await turn_across_a_redis_kill(client, a, redis_aof)
        try:
            during = await scrape(a)
            # Meanwhile no reply of this session is built on a history without turn 2:
            # its requests get the store's 503, /history too.
            async with client.post(a.url + "/chat_stream", json={"user_input": "Hi"}) as response:
                assert response.status == 503
                assert (await response.json())["error"] == "session_store_unavailable"
            assert (await get(client, a.url + "/history"))[0] == 503
        finally:
            redis_aof.start()
        status, body = await get(client, a.url + "/history")
        assert status == 200
        assert body["messages"] == conversation(("Turn 1: name a fruit.", first),
                                                (COUNTING, cut.reply))
        status, third = await chat(client, a.url, "Turn 3: and a colour?")
        assert status == 200
    assert stored_turns(redis_aof, session) == conversation(
        ("Turn 1: name a fruit.", first), (COUNTING, cut.reply), ("Turn 3: and a colour?", third))
    after = await scrape(a)
    assert sample(during, PENDING) == 1 and sample(after, PENDING) == 0
    assert sample(after, LATE) - sample(before, LATE) == 1
    assert logged(caplog, session, "kept in memory"), "no log line says the turn is kept, naming its session"
    assert logged(caplog, session, "stored now")


async def test_the_lock_of_a_turn_ended_during_the_outage_is_released_when_redis_returns(
        a_and_b: tuple[Server, Server], redis_aof: RedisServer) -> None:
    a, b = a_and_b
    async with user() as client:
        status, first = await chat(client, a.url, "Turn 1: name a river.")
        assert status == 200
        session = session_of(client, a.url)
        cut = await turn_across_a_redis_kill(client, a, redis_aof)
        redis_aof.start()
        returned_at = time.monotonic()
        # The lock A took for turn 2 is in the AOF with its expiry; only A can free it
        # early. B answers 409 until then.
        busy = 0
        while True:
            async with client.post(b.url + "/chat_stream", json={
                    "user_input": "Turn 3: and a lake?", "max_new_tokens": 8, **GREEDY}) as response:
                if response.status == 200:
                    served_after = time.monotonic() - returned_at
                    third = await response.text()
                    break
                assert response.status == 409, await response.text()
                busy += 1
            assert time.monotonic() - returned_at < 20, "the session stayed locked"
            await asyncio.sleep(0.05)
    print(f"served on the other replica {served_after:.2f} s after Redis returned "
          f"({busy} x 409 before), its lock had {cut.lock_left:.1f} s left at the kill")
    # The lock had tens of seconds left, so this is its release, not its expiry. The bound is
    # generous for a loaded 2-core machine: A retries the store every quarter second.
    assert cut.lock_left - (returned_at - cut.killed_at) > 20
    assert served_after < 5.0
    assert stored_turns(redis_aof, session) == conversation(
        ("Turn 1: name a river.", first), (COUNTING, cut.reply), ("Turn 3: and a lake?", third))


async def test_a_kept_turn_never_overwrites_what_another_replica_wrote_after_the_lock_lapsed(
        a_and_b: tuple[Server, Server], redis_aof: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    a, b = a_and_b
    outbox = a.chat_stream.session_store.outbox   # type: ignore[attr-defined]
    before = await scrape(a)
    # A waits for the test, not for its retry: B must serve the session before A pays back.
    outbox.retry_interval = 3600.0
    try:
        async with user() as client:
            status, first = await chat(client, a.url, "Turn 1: name a tree.")
            assert status == 200
            session = session_of(client, a.url)
            cut = await turn_across_a_redis_kill(client, a, redis_aof)
            redis_aof.start()
            with redis_aof.client() as look:   # as if Redis had been away past the lock's TTL
                assert look.delete(LOCK_PREFIX + session) == 1
            status, third = await chat(client, b.url, "Turn 2 again: a flower?")
            assert status == 200   # the documented limit: B could not know of A's kept turn
            status, body = await get(client, a.url + "/history")   # A pays back first
        assert status == 200
    finally:
        outbox.retry_interval = 0.25
    newer = conversation(("Turn 1: name a tree.", first), ("Turn 2 again: a flower?", third))
    assert body["messages"] == newer
    assert stored_turns(redis_aof, session) == newer
    assert cut.reply not in json.dumps(body)
    after = await scrape(a)
    assert sample(after, LOST, reason="conflict") - sample(before, LOST, reason="conflict") == 1
    assert sample(after, PENDING) == 0
    assert logged(caplog, session, "lost", "conflict"), caplog.text


async def test_while_redis_is_away_health_is_200_degraded_and_ready_is_503(
        a_and_b: tuple[Server, Server], redis_aof: RedisServer) -> None:
    a, _ = a_and_b
    redis_aof.kill()
    try:
        async with user() as client:
            status, body = await get(client, a.url + "/health")
            assert status == 200, body
            assert body["status"] == "degraded" and body["engine"] == "ready"
            assert body["session_store"] == "redis"
            assert body["checks"] == {"engine": True, "session_store": False}
            status, body = await get(client, a.url + "/ready")
            assert status == 503 and body["status"] == "unavailable"
            assert body["checks"] == {"engine": True, "session_store": False}
            # What the replica can still serve: the stateless API.
            async with client.post(a.url + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}) as response:
                assert response.status == 200
    finally:
        redis_aof.start()
    async with user() as client:
        status, body = await get(client, a.url + "/ready")
        assert status == 200 and body["status"] == "ok"
        status, body = await get(client, a.url + "/health")
        assert status == 200 and body["status"] == "ok"


@pytest.fixture
def lone_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, stopped however the test ends (frozen ones included)."""
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_redis_that_never_returns_bounds_the_kept_turns_and_does_not_hold_up_shutdown(
        model_path: str, lone_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    redis_server = lone_redis
    server = await start_server(
        replica(model_path, redis_server.url, max_pending_turns=1, parallel=2), build_full_app)
    try:
        async with user() as alice, user() as bob:
            for client in (alice, bob):
                assert (await chat(client, server.url, "Hello."))[0] == 200
            sessions = [session_of(client, server.url) for client in (alice, bob)]
            pause = Pause()
            server.chat_stream.engine.faults.before_token = pause
            streams = [await client.post(server.url + "/chat_stream", json=LONG)
                       for client in (alice, bob)]
            try:
                for stream in streams:
                    assert stream.status == 200 and await stream.content.readany()
                await pause.hold()           # both replies are mid-stream
                redis_server.freeze()        # connections open, no answers: the worst case
                pause.open()
                replies = [await stream.text() for stream in streams]
            finally:
                pause.open()
                server.chat_stream.engine.faults.before_token = None
                for stream in streams:
                    stream.close()
            assert all(replies)
            kept = [s for s in sessions if logged(caplog, s, "kept in memory")]
            lost = [s for s in sessions if logged(caplog, s, "lost", "full")]
            assert len(kept) == 1 and len(lost) == 1 and kept != lost, caplog.text
            metrics = await scrape(server)
            assert sample(metrics, PENDING) == 1
            assert sample(metrics, LOST, reason="full") == 1

            started = time.monotonic()   # the session's next request: a 503, not a hang
            async with alice.post(server.url + "/chat_stream",
                                  json={"user_input": "Still there?"}) as response:
                assert response.status == 503
            assert time.monotonic() - started < 10
            status, body = await get(alice, server.url + "/health")
            assert status == 200 and body["status"] == "degraded"
    finally:
        started = time.monotonic()
        await asyncio.wait_for(server.runner.cleanup(), timeout=30)
        shutdown = time.monotonic() - started
    print(f"shutdown with a frozen Redis took {shutdown:.1f} s")
    # One socket timeout (2 s) for the last try, then it gives up; 15 s is the bound with
    # room for a loaded machine, and far below "waiting forever".
    assert shutdown < 15
    assert logged(caplog, kept[0], "lost", "stopping"), caplog.text


def start_cli_replica(name: str, model_path: str, redis_url: str, directory: Path
                      ) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = directory / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "chatstream_lite", "--port", str(port), "--model", model_path,
             "--session-store", redis_url, "--n-threads", "1", "--n-ctx", "1024",
             "--max-new-tokens", "400"],
            cwd=ROOT, env=subprocess_env(), stdout=sink, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log


async def wait_healthy(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
        for _ in range(600):
            assert process.poll() is None, log.read_text(errors="replace")
            try:
                async with client.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"never ready:\n{log.read_text(errors='replace')}")


async def test_a_replica_killed_mid_stream_leaves_the_session_to_the_other_once_its_lock_lapses(
        model_path: str, redis_aof: RedisServer, tmp_path: Path) -> None:
    from chatstream_lite.sessions.redis import DEFAULT_LOCK_TTL

    replicas = [start_cli_replica(name, model_path, redis_aof.url, tmp_path) for name in "ab"]
    try:
        for process, url, log in replicas:
            await wait_healthy(process, url, log)
        (a, a_url, _), (_, b_url, _) = replicas
        async with user() as client:
            status, first = await chat(client, a_url, "Turn 1: name a bird.")
            assert status == 200
            session = session_of(client, a_url)
            async with client.post(a_url + "/chat_stream", json={
                    "user_input": "Count from 1 to 300.", "max_new_tokens": 400,
                    **GREEDY}) as response:
                assert response.status == 200 and await response.content.readany()
                a.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()       # the reply is visibly cut, not short
            a.wait(timeout=10)
            busy = 0
            while True:
                status, third = await chat(client, b_url, "Turn 2: and a fish?")
                if status == 200:
                    lapsed_after = time.monotonic() - killed_at
                    break
                assert status == 409
                busy += 1
                assert time.monotonic() - killed_at < DEFAULT_LOCK_TTL + 15, "never served"
                await asyncio.sleep(0.2)
        print(f"the other replica served the session {lapsed_after:.1f} s after the SIGKILL "
              f"({busy} x 409 before)")
        # The dead replica's lock lapses by itself: at least 2/3 of its TTL after the last
        # extension (every TTL/3), at most its TTL; the upper bound has room for a loaded
        # machine. Nothing was released early: nobody was left to release it.
        assert busy > 0
        assert DEFAULT_LOCK_TTL * 2 / 3 - 1 < lapsed_after < DEFAULT_LOCK_TTL + 10
        # The cut turn was never acknowledged: the history has turn 1 and B's turn.
        assert stored_turns(redis_aof, session) == conversation(
            ("Turn 1: name a bird.", first), ("Turn 2: and a fish?", third))
    finally:
        for process, _, _ in replicas:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

