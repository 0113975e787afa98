"""Scale-out: two `python -m chatstream_lite` processes share one real Redis and serve one
conversation, whichever replica each turn lands on; behind nginx with the example config
(examples/scale_out/nginx.conf), a conversation's turns stay on one replica while it is up.

The proof that each turn saw the whole conversation is the history the replica wrote back,
read from Redis directly: a replica that had not loaded the turns before would store only
its own.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from benchmarks.scale_out import Nginx, access_log, nginx_config

from .conftest import GREEDY, ROOT, RedisServer, free_port, subprocess_env

pytestmark = pytest.mark.timeout(180)

IDLE_TTL = 600
COOKIE = "CHATSTREAM_SESSION"
# A prompt SmolLM2 answers at length, so that a stream is still running while the test acts.
LONG_ANSWER = {"user_input": "Count from 1 to 300, separated by commas.",
               "max_new_tokens": 400, **GREEDY}
# A stuck request fails the test instead of hanging it.
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_replica(name: str, redis_url: str, directory: Path) -> Replica:
    port = free_port()
    log = directory / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "chatstream_lite", "--port", str(port),
             "--session-store", redis_url, "--session-idle-ttl", str(IDLE_TTL),
             "--n-threads", "1", "--n-ctx", "1024", "--max-new-tokens", "400"],
            cwd=ROOT, env=subprocess_env(), stdout=sink, stderr=subprocess.STDOUT)
    return Replica(name, process, port, log)


async def wait_healthy(replica: Replica, timeout: float = 60.0) -> None:
    """Until `/ready`: the model loaded and Redis reachable."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
        while True:
            assert replica.process.poll() is None, f"{replica.name} exited:\n{replica.output()}"
            try:
                async with client.get(replica.url + "/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, f"{replica.name} never became healthy"
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Replica, Replica]]:
    directory = tmp_path_factory.mktemp("replicas")
    pair = (start_replica("a", redis_server.url, directory),
            start_replica("b", redis_server.url, directory))
    try:
        yield pair
    finally:
        for replica in pair:
            replica.process.send_signal(signal.SIGINT)
        for replica in pair:
            try:
                replica.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()


@pytest_asyncio.fixture(scope="module")
async def a_and_b(replicas: tuple[Replica, Replica]) -> tuple[Replica, Replica]:
    for replica in replicas:
        await wait_healthy(replica)
    return replicas


def user() -> aiohttp.ClientSession:
    """One browser: one cookie jar, whichever replica it talks to."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=TIMEOUT)


def session_id(client: aiohttp.ClientSession, replica: Replica) -> str:
    return client.cookie_jar.filter_cookies(URL(replica.url))[COOKIE].value


def stored_history(redis_server: RedisServer, session: str) -> list[dict[str, str]]:
    """The turns the replicas wrote back, straight from Redis (aiohttp-session's JSON)."""
    with redis_server.client() as client:
        raw = client.get(f"{COOKIE}_{session}")
    assert raw is not None, "no history stored for this session"
    return json.loads(raw)["session"]["chat"]["turns"]


def conversation(*turns: tuple[str, str]) -> list[dict[str, str]]:
    """The stored form of (user message, reply) turns."""
    return [message for text, reply in turns
            for message in ({"role": "user", "content": text},
                            {"role": "assistant", "content": reply})]


async def chat(client: aiohttp.ClientSession, replica: Replica, text: str,
               max_new_tokens: int = 8) -> tuple[int, str]:
    async with client.post(replica.url + "/chat_stream",
                           json={"user_input": text, "max_new_tokens": max_new_tokens,
                                 **GREEDY}) as response:
        return response.status, await response.text()


async def test_turns_alternating_between_replicas_each_see_the_whole_conversation(
        a_and_b: tuple[Replica, Replica], redis_server: RedisServer) -> None:
    turns: list[tuple[str, str]] = []
    async with user() as client:
        for turn, replica in enumerate([*a_and_b, *a_and_b]):
            text = f"Turn {turn + 1}: tell me a fruit."
            status, reply = await chat(client, replica, text)
            assert status == 200 and reply
            turns.append((text, reply))
            session = session_id(client, replica)
            assert stored_history(redis_server, session) == conversation(*turns), replica.name
        ids = {session_id(client, replica) for replica in a_and_b}
    assert len(ids) == 1 and len(ids.pop()) >= 43  # one session, a 256-bit id, on both
    with redis_server.client() as redis_client:
        assert IDLE_TTL - 60 < redis_client.ttl(f"{COOKIE}_{session}") <= IDLE_TTL


async def test_clearing_on_one_replica_clears_the_conversation_on_both(
        a_and_b: tuple[Replica, Replica], redis_server: RedisServer) -> None:
    replica_a, replica_b = a_and_b
    async with user() as client:
        assert (await chat(client, replica_a, "Remember: blue."))[0] == 200
        async with client.post(replica_b.url + "/clear_context", json={}) as response:
            assert response.status == 200
        session = session_id(client, replica_a)
        assert stored_history(redis_server, session) == []
        status, reply = await chat(client, replica_a, "Hello again.")
        assert status == 200
    assert stored_history(redis_server, session) == conversation(("Hello again.", reply))


async def test_a_second_request_of_a_streaming_session_gets_409_on_either_replica(
        a_and_b: tuple[Replica, Replica], redis_server: RedisServer) -> None:
    replica_a, replica_b = a_and_b
    async with user() as client:
        assert (await chat(client, replica_a, "Hi."))[0] == 200
        session = session_id(client, replica_a)
        before = stored_history(redis_server, session)
        stream = await client.post(replica_a.url + "/chat_stream", json=LONG_ANSWER)
        try:
            assert stream.status == 200
            assert await stream.content.readany()      # A is generating now
            for replica in (replica_b, replica_a):
                async with client.post(replica.url + "/chat_stream",
                                       json={"user_input": "Me too!"}) as response:
                    assert response.status == 409, replica.name
                    assert (await response.json())["error"] == "session_busy"
            with redis_server.client() as redis_client:
                assert redis_client.exists(f"CHATSTREAM_LOCK_{session}") == 1
        finally:
            stream.close()      # the user leaves: A stops generating and releases the lock
        # Released when the stream ends, not left to expire (that would take 15 s).
        deadline = time.monotonic() + 5
        while True:
            status, _ = await chat(client, replica_b, "Still there?")
            if status == 200 or time.monotonic() > deadline:
                break
            assert status == 409
            await asyncio.sleep(0.05)
        assert status == 200
    history = stored_history(redis_server, session)
    assert history[:len(before)] == before
    assert [m["content"] for m in history if m["role"] == "user"][-1] == "Still there?"


async def _expect_store_unavailable(client: aiohttp.ClientSession, replica: Replica) -> None:
    async with client.post(replica.url + "/chat_stream",
                           json={"user_input": "Are you there?"}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        body: dict[str, Any] = await response.json()
    assert body["error"] == "session_store_unavailable"
    assert "Redis" in body["message"]
    # The replica stays in rotation for what it can serve without Redis; /ready says it is
    # not whole.
    async with client.get(replica.url + "/health") as response:
        assert response.status == 200
        health = await response.json()
        assert health["status"] == "degraded"
        assert health["checks"] == {"engine": True, "session_store": False}
    async with client.get(replica.url + "/ready") as response:
        assert response.status == 503
        assert (await response.json())["checks"] == {"engine": True, "session_store": False}


async def test_a_frozen_redis_gives_503_not_a_hang_and_the_conversation_resumes(
        a_and_b: tuple[Replica, Replica], redis_server: RedisServer) -> None:
    replica_a, replica_b = a_and_b
    async with user() as client:
        status, first = await chat(client, replica_a, "My name is Aiko.")
        assert status == 200
        session = session_id(client, replica_a)
        redis_server.freeze()          # connections stay open; nothing answers
        try:
            await _expect_store_unavailable(client, replica_b)   # within TIMEOUT, not never
        finally:
            redis_server.thaw()
        await wait_healthy(replica_b, timeout=10)
        status, second = await chat(client, replica_b, "What is my name?")
        assert status == 200
    assert stored_history(redis_server, session) == conversation(
        ("My name is Aiko.", first), ("What is my name?", second))


async def pending_turns(replica: Replica) -> float:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
        async with client.get(replica.url + "/metrics") as response:
            text = await response.text()
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("chatstream_session_store_pending_turns "))


async def test_redis_stopping_mid_stream_then_restarting(
        a_and_b: tuple[Replica, Replica], redis_server: RedisServer) -> None:
    replica_a, replica_b = a_and_b
    async with user() as client:
        status, hello = await chat(client, replica_b, "Hi.")
        assert status == 200
        session = session_id(client, replica_b)
        async with client.post(replica_b.url + "/chat_stream",
                               json={**LONG_ANSWER, "max_new_tokens": 150}) as stream:
            assert stream.status == 200
            first = await stream.content.readany()
            redis_server.stop()
            rest = await stream.read()             # the reply is not cut by the store failing
        assert first and rest
        # The turn just streamed could not be stored; the replica keeps it, and says so
        # (naming the session by the start of its id) before ending the reply.
        assert f"session {session[:8]}" in replica_b.output()
        assert "kept in memory" in replica_b.output()
        assert await pending_turns(replica_b) == 1
        for replica in a_and_b:
            await _expect_store_unavailable(client, replica)

        redis_server.start()           # same port, empty: persistence is off in this test
        for replica in a_and_b:
            await wait_healthy(replica, timeout=10)   # recovered by itself
        deadline = time.monotonic() + 10
        while await pending_turns(replica_b) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # The kept turn held the whole conversation: an empty Redis has it back.
        assert stored_history(redis_server, session) == conversation(
            ("Hi.", hello), (LONG_ANSWER["user_input"], (first + rest).decode()))
        status, reply = await chat(client, replica_a, "Back again.")
        assert status == 200
        assert session_id(client, replica_a) == session
    assert stored_history(redis_server, session) == conversation(
        ("Hi.", hello), (LONG_ANSWER["user_input"], (first + rest).decode()),
        ("Back again.", reply))
    for replica in a_and_b:
        assert replica.process.poll() is None
        assert "Traceback" not in replica.output()


# -- nginx in front: the example config routes a session to where its KV cache is ----------
@pytest.fixture(scope="module")
def nginx_available() -> None:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (Debian: apt-get install -y nginx)")


@asynccontextmanager
async def nginx_in_front(ports: list[int], directory: Path) -> AsyncIterator[Nginx]:
    """examples/scale_out/nginx.conf itself, with only its ports and paths rewritten."""
    listen = free_port()
    nginx = Nginx(nginx_config(listen, ports, directory), directory, listen)
    nginx.start()
    try:
        await nginx.wait_ready()
        yield nginx
    finally:
        nginx.stop()


async def chat_via(client: aiohttp.ClientSession, nginx: Nginx, text: str) -> tuple[int, str]:
    async with client.post(nginx.url + "/chat_stream",
                           json={"user_input": text, "max_new_tokens": 8, **GREEDY}) as response:
        return response.status, await response.text()


def upstreams_of(nginx: Nginx, session: str) -> list[str]:
    """The replica (host:port) that answered each /chat_stream turn sent with this cookie."""
    return [line["upstream"] for line in access_log(nginx.directory / "access.log")
            if line["session"] == session and "/chat_stream" in line["request"]]


async def test_through_nginx_a_sessions_turns_land_on_the_same_replica(
        a_and_b: tuple[Replica, Replica], nginx_available: None, tmp_path: Path) -> None:
    async with nginx_in_front([r.port for r in a_and_b], tmp_path) as nginx:
        sessions = []
        for _ in range(3):   # three conversations: each stays put, wherever it hashes
            async with user() as client:
                for turn in range(5):
                    status, reply = await chat_via(client, nginx, f"Turn {turn}: a colour?")
                    assert status == 200 and reply
                sessions.append(session_id(client, a_and_b[0]))
        for session in sessions:
            served = upstreams_of(nginx, session)
            assert len(served) == 4, served   # turns 2-5 carry the cookie
            assert len(set(served)) == 1, f"a session moved between replicas: {served}"


async def test_when_a_sessions_replica_is_down_its_next_turn_goes_to_the_other_with_its_history(
        a_and_b: tuple[Replica, Replica], redis_server: RedisServer, nginx_available: None,
        tmp_path: Path) -> None:
    replica_a = a_and_b[0]
    replica_c = start_replica("c", redis_server.url, tmp_path)
    try:
        await wait_healthy(replica_c)
        async with nginx_in_front([replica_a.port, replica_c.port], tmp_path) as nginx:
            # New conversations until one is pinned to C (its hash decides; about one in two).
            for attempt in range(12):
                client = user()
                turns = []
                for turn in range(2):
                    text = f"Try {attempt}, turn {turn}: name a river."
                    status, reply = await chat_via(client, nginx, text)
                    assert status == 200
                    turns.append((text, reply))
                session = session_id(client, replica_a)
                if upstreams_of(nginx, session) == [f"127.0.0.1:{replica_c.port}"]:
                    break
                await client.close()
            else:
                raise AssertionError("no conversation hashed to replica C in 12 tries")
            try:
                replica_c.process.send_signal(signal.SIGINT)
                replica_c.process.wait(timeout=30)
                status, reply = await chat_via(client, nginx, "And a mountain?")
                assert status == 200 and reply
                turns.append(("And a mountain?", reply))
            finally:
                await client.close()
            assert upstreams_of(nginx, session)[-1] == f"127.0.0.1:{replica_a.port}"
            assert stored_history(redis_server, session) == conversation(*turns)
    finally:
        if replica_c.process.poll() is None:
            replica_c.process.kill()
            replica_c.process.wait()
