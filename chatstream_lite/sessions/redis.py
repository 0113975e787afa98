"""Sessions in Redis, so that N replicas behind a load balancer serve one conversation.

    chat_stream = ChatStream(session_store="redis://127.0.0.1:6379/0")
    # or: python -m chatstream_lite --session-store redis://127.0.0.1:6379/0

The history is aiohttp-session's `RedisStorage`: one key per session holding its JSON,
rewritten after every turn with the idle TTL as its expiry, so Redis itself forgets idle
sessions. The one-request-per-session rule holds across replicas through a lock key per
session (redis-py's `Lock`: SET NX PX with a random token, released by compare-and-delete);
the replica streaming the reply keeps extending it, and if that replica dies the lock expires
by itself within `DEFAULT_LOCK_TTL`.

Redis out of reach never hangs a request and never makes a 500: every command has a socket
timeout (one immediate retry when a connection breaks: a pooled one is stale after a Redis
restart), and its failure becomes `SessionStoreUnavailable`, a JSON 503. The client
reconnects on its own, so the server recovers by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

from aiohttp import web
from aiohttp_session import Session
from aiohttp_session.redis_storage import RedisStorage
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockNotOwnedError, RedisError

from ..errors import SessionStoreUnavailable
from .memory import DEFAULT_COOKIE_NAME, DEFAULT_IDLE_TTL, new_session_id

log = logging.getLogger(__name__)

# Redis answers in well under a millisecond; a command that has not answered in this time
# will not, and the request gets its 503 instead of waiting.
DEFAULT_SOCKET_TIMEOUT = 2.0
# How long a session lock outlives a replica that died while holding it. The holder extends
# it every third of this, so a stream of any length keeps it.
DEFAULT_LOCK_TTL = 15.0
# Session data lives at "<cookie name>_<id>" (RedisStorage's layout); locks under another
# prefix so that no cookie value can name a lock key.
LOCK_KEY_PREFIX = "CHATSTREAM_LOCK_"


def connect(url: str, *, socket_timeout: float = DEFAULT_SOCKET_TIMEOUT) -> Redis:
    """A `redis.asyncio` client for `url` (redis://, rediss:// or unix://) with timeouts.

    Options in the URL's query string (e.g. `?socket_timeout=5`) win over ours.
    """
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        # One immediate retry on a broken connection (a pooled one goes stale when Redis
        # restarts); none after a timeout, which would only double the wait.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


class RedisSessionStorage(RedisStorage):
    """aiohttp-session's `RedisStorage` with our cookie, ids, expiry and error.

    Keys come from `new_session_id` (256 random bits); the key expires `idle_ttl` seconds
    after the last write. A Redis failure raises `SessionStoreUnavailable`.
    """

    def __init__(
        self,
        client: Redis,
        *,
        cookie_name: str = DEFAULT_COOKIE_NAME,
        idle_ttl: int = DEFAULT_IDLE_TTL,
        secure: bool | None = None,
    ) -> None:
        if idle_ttl < 1:
            raise ValueError("idle_ttl must be positive")
        super().__init__(
            client,
            cookie_name=cookie_name,
            max_age=idle_ttl,
            httponly=True,
            samesite="Lax",
            secure=secure,
            key_factory=new_session_id,
        )

    async def load_session(self, request: web.Request) -> Session:
        try:
            return await super().load_session(request)
        except RedisError as error:
            raise _unavailable("read", error) from error

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        try:
            await super().save_session(request, response, session)
        except RedisError as error:
            raise _unavailable("write", error) from error


def _unavailable(action: str, error: RedisError) -> SessionStoreUnavailable:
    log.warning("session store: cannot %s: %s: %s", action, type(error).__name__, error)
    return SessionStoreUnavailable(
        f"The session store (Redis) cannot be reached ({type(error).__name__}); "
        "try again shortly.")


@dataclass
class _Held:
    lock: Lock
    keeper: asyncio.Task[None]


class RedisSessionLocks:
    """`Locks` shared by every replica: one Redis key per session, held while a request runs."""

    def __init__(self, client: Redis, *, ttl: float = DEFAULT_LOCK_TTL) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._client = client
        self.ttl = ttl
        self._held: dict[str, _Held] = {}

    async def acquire(self, session_id: str) -> bool:
        if session_id in self._held:  # still running here, even if its Redis key lapsed
            return False
        lock = self._client.lock(LOCK_KEY_PREFIX + session_id, timeout=self.ttl,
                                 blocking=False, thread_local=False)
        try:
            if not await lock.acquire(token=secrets.token_hex(16)):
                return False
        except RedisError as error:
            raise _unavailable("lock a session", error) from error
        self._held[session_id] = _Held(lock, asyncio.create_task(self._keep(lock)))
        return True

    async def release(self, session_id: str) -> None:
        held = self._held.pop(session_id, None)
        if held is None:
            return
        held.keeper.cancel()
        try:
            await held.lock.release()
        except LockNotOwnedError:
            log.warning("session lock %s had expired before its request ended", held.lock.name)
        except RedisError as error:
            log.warning("session lock %s not released (%s); it expires within %.0f s",
                        held.lock.name, type(error).__name__, self.ttl)

    async def _keep(self, lock: Lock) -> None:
        """Extend the lock while its request runs; a dead replica stops extending it."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await lock.reacquire()
            except LockNotOwnedError:
                log.warning("session lock %s expired while its request ran", lock.name)
                return
            except RedisError as error:  # Redis away: try again; the lock may lapse meanwhile
                log.warning("session lock %s not extended: %s", lock.name, type(error).__name__)

    async def close(self) -> None:
        for session_id in list(self._held):
            await self.release(session_id)


class RedisSessionStore:
    """The `SessionStore` for several replicas: history and locks in one Redis.

        store = RedisSessionStore("redis://127.0.0.1:6379/0", idle_ttl=3600)
        chat_stream = ChatStream(session_store=store)   # or session_store="redis://..."

    `redis` is a URL or your own `redis.asyncio.Redis` client (TLS, auth, sentinel: yours to
    configure; keep `decode_responses` off, give it socket timeouts).
    """

    kind = "redis"

    def __init__(
        self,
        redis: str | Redis,
        *,
        idle_ttl: int = DEFAULT_IDLE_TTL,
        secure: bool | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        cookie_name: str = DEFAULT_COOKIE_NAME,
    ) -> None:
        self.client = connect(redis) if isinstance(redis, str) else redis
        if self.client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the Redis client must have decode_responses off "
                             "(aiohttp-session decodes the stored bytes itself)")
        self.storage = RedisSessionStorage(self.client, cookie_name=cookie_name,
                                           idle_ttl=idle_ttl, secure=secure)
        self.locks = RedisSessionLocks(self.client, ttl=lock_ttl)

    def __str__(self) -> str:
        options = self.client.connection_pool.connection_kwargs
        if "path" in options:
            return f"unix://{options['path']}?db={options.get('db', 0)}"
        # Host, port and db only: a password in the URL must never reach a log.
        return f"redis://{options.get('host')}:{options.get('port')}/{options.get('db', 0)}"

    async def healthy(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.locks.close()
        await self.client.aclose()
