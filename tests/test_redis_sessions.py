"""The Redis session store's parts against a real redis-server: locks, expiry, health.

The whole thing (two server processes sharing one Redis) is proven in test_scale_out.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from chatstream_lite import ChatStream, RedisSessionStore
from chatstream_lite.sessions.redis import LOCK_KEY_PREFIX, RedisSessionLocks, connect

from .conftest import ROOT, RedisServer, free_port, subprocess_env

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = connect(redis_server.url)
    yield client
    await client.aclose()


async def test_a_held_lock_is_kept_past_its_ttl_and_released_at_once(client: Redis) -> None:
    # A 2 s lock, extended every 2/3 s: an extension may come 1.3 s late before the lock
    # lapses, a margin a loaded 2-core machine keeps (0.6 s locks lost theirs there).
    replica_a = RedisSessionLocks(client, ttl=2.0)
    replica_b = RedisSessionLocks(client, ttl=2.0)
    assert await replica_a.acquire("s1")
    key = LOCK_KEY_PREFIX + "s1"
    began, renewals, last = time.monotonic(), 0, await client.pttl(key)

    async def outlived_its_ttl() -> None:
        nonlocal renewals, last
        while renewals < 3 or time.monotonic() - began < 2.5:
            now = await client.pttl(key)
            assert now > 0, "the held lock lapsed"
            renewals += now > last        # the holder extended it since the last look
            last = now
            await asyncio.sleep(0.05)
    await asyncio.wait_for(outlived_its_ttl(), timeout=30)
    assert not await replica_b.acquire("s1")
    assert 0 < await client.pttl(key) <= 2000
    await replica_a.release("s1")
    assert await client.exists(LOCK_KEY_PREFIX + "s1") == 0
    assert await replica_b.acquire("s1")
    await replica_b.release("s1")


async def test_a_lock_whose_replica_died_expires_by_itself(redis_server: RedisServer,
                                                           client: Redis) -> None:
    # A real process takes the lock and is killed (SIGKILL: no cleanup of any kind).
    script = (
        "import asyncio, os, signal\n"
        "from chatstream_lite.sessions.redis import RedisSessionLocks, connect\n"
        "async def main():\n"
        f"    locks = RedisSessionLocks(connect({redis_server.url!r}), ttl=1.0)\n"
        "    assert await locks.acquire('s2')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    died = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=30)
    assert died.returncode == -9, died.stderr
    survivor = RedisSessionLocks(client)
    assert not await survivor.acquire("s2")

    async def acquire() -> None:
        while not await survivor.acquire("s2"):
            await asyncio.sleep(0.05)
    # Its TTL is 1 s; the bound only keeps a broken expiry from hanging the test.
    await asyncio.wait_for(acquire(), timeout=15.0)
    await survivor.release("s2")


async def test_releasing_an_expired_lock_never_frees_the_new_holders_lock(client: Redis) -> None:
    replica_a = RedisSessionLocks(client)
    replica_b = RedisSessionLocks(client)
    assert await replica_a.acquire("s3")
    await client.delete(LOCK_KEY_PREFIX + "s3")    # as if it had expired while Redis was away
    assert not await replica_a.acquire("s3")       # A knows its own request still runs
    assert await replica_b.acquire("s3")
    await replica_a.release("s3")                  # compare-and-delete: B's token differs
    assert await client.exists(LOCK_KEY_PREFIX + "s3") == 1
    assert not await replica_a.acquire("s3")
    await replica_b.release("s3")


async def test_health_is_false_without_a_redis_and_answers_quickly() -> None:
    store = RedisSessionStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert await asyncio.wait_for(store.healthy(), timeout=5) is False
    finally:
        await store.close()


async def test_health_is_true_with_a_redis(redis_server: RedisServer) -> None:
    store = RedisSessionStore(redis_server.url)
    try:
        assert await store.healthy() is True
        assert str(store) == redis_server.url
    finally:
        await store.close()


def test_a_password_in_the_url_never_reaches_the_description() -> None:
    store = RedisSessionStore("redis://:s3cret@127.0.0.1:6379/2")
    assert "s3cret" not in str(store) and str(store) == "redis://127.0.0.1:6379/2"


def test_unknown_session_store_urls_and_ambiguous_settings_are_refused(model_path: str) -> None:
    with pytest.raises(ValueError, match="redis://"):
        ChatStream(model_path, session_store="memcached://127.0.0.1:11211")
    with pytest.raises(ValueError, match="not both"):
        ChatStream(model_path, session_store="redis://127.0.0.1:6379/0",
                   session_storage=RedisSessionStore("redis://127.0.0.1:6379/0").storage)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisSessionStore(Redis(decode_responses=True))
