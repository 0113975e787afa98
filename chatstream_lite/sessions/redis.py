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

A turn that streamed to its end while Redis was away is not lost: it waits in the store's
`Outbox` (outbox.py) with the lock its request held, and both are paid back when Redis
answers: the turn written unless another replica wrote the session meanwhile (one atomic
script), then the lock released with its token. A session this replica owes anything to is
settled before it serves that session again.
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
from .memory import DEFAULT_COOKIE_NAME, DEFAULT_IDLE_TTL, ensure_identity, new_session_id
from .outbox import DEFAULT_MAX_PENDING_TURNS, Outbox, OutboxCounts, session_tag
from .responses import DEFAULT_RESPONSE_TTL, StoredResponse

__all__ = ["CLOSE_TIMEOUT", "DEFAULT_LOCK_TTL", "DEFAULT_SOCKET_TIMEOUT", "LOADED_KEY",
           "LOCK_KEY_PREFIX", "RESPONSE_KEY_PREFIX", "WRITE_LATE_SCRIPT", "connect",
           "RedisResponseStore", "RedisSessionLocks", "RedisSessionStorage", "RedisSessionStore"]

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
# Stored responses (/v1/responses, `store: true`): a prefix no cookie value or lock can name.
RESPONSE_KEY_PREFIX = "CHATSTREAM_RESPONSE_"
# Seconds a stopping server gives the outbox's last try (a frozen Redis costs one socket
# timeout of them), before it logs what it still owes as lost.
CLOSE_TIMEOUT = 5.0
# A turn kept during an outage is written only where the stored history is still the one
# it was built on (ARGV[1], "" for a new session: no stored value is empty), or is gone (a
# Redis restarted without persistence: the kept turn holds the whole history), or is the
# turn itself (its first write reached Redis after all). Anything else is another
# replica's newer turn, written after this replica's lock lapsed: it is kept, ours is not.
WRITE_LATE_SCRIPT = """
local stored = redis.call('GET', KEYS[1])
if stored == false or stored == ARGV[1] or stored == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
# Request key: the session's value as loaded, what a kept turn's late write compares with.
LOADED_KEY = "chatstream_lite.session_loaded"


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


@dataclass(frozen=True)
class _LateWrite:
    """A turn's whole session value, kept until Redis takes it."""

    key: str
    value: str
    loaded: bytes | None     # the stored value the turn was built on (None: a new session)
    max_age: int


@dataclass(frozen=True)
class _LateRelease:
    lock: Lock
    token: bytes   # ours, kept here: a failed release must not depend on the Lock's state


class RedisSessionStorage(RedisStorage):
    """aiohttp-session's `RedisStorage` with our cookie, ids, expiry and error.

    Keys come from `new_session_id` (256 random bits); the key expires `idle_ttl` seconds
    after the last write. A Redis failure raises `SessionStoreUnavailable`. A session this
    replica still owes a turn (`outbox`) is settled before it is loaded.
    """

    def __init__(
        self,
        client: Redis,
        *,
        cookie_name: str = DEFAULT_COOKIE_NAME,
        idle_ttl: int = DEFAULT_IDLE_TTL,
        secure: bool | None = None,
        outbox: Outbox[_LateWrite, _LateRelease] | None = None,
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
        self.idle_ttl = idle_ttl
        self.outbox = outbox if outbox is not None else _outbox(client, 0)

    async def load_session(self, request: web.Request) -> Session:
        cookie = self.load_cookie(request)
        if cookie is None:
            return Session(None, data=None, new=True, max_age=self.max_age)
        await self.outbox.settle(cookie)   # a turn kept here goes in before anything is read
        try:
            stored = await self._redis.get(self._key(cookie))
        except RedisError as error:
            raise _unavailable("read", error) from error
        if isinstance(stored, str):   # not with decode_responses off, as we require
            stored = stored.encode()
        request[LOADED_KEY] = stored
        if stored is None:
            return Session(None, data=None, new=True, max_age=self.max_age)
        try:
            data = self._decoder(stored.decode("utf-8"))
        except ValueError:
            data = None
        return Session(cookie, data=data, new=False, max_age=self.max_age)

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        try:
            await super().save_session(request, response, session)
        except RedisError as error:
            raise _unavailable("write", error) from error
        # What Redis holds now: a turn kept later is built on this, not on what was loaded.
        request[LOADED_KEY] = self._encoder(self._get_session_data(session)).encode()

    async def store_turn(self, request: web.Request, response: web.StreamResponse,
                         session: Session) -> None:
        """Write a turn the client has received; kept in the outbox if Redis cannot take
        it now (and at once if the outbox holds anything: Redis is away, and the turn
        queues behind the older ones). The cookie went out with the reply's headers."""
        session_id = ensure_identity(session)
        turn = _LateWrite(self._key(session_id),
                          self._encoder(self._get_session_data(session)),
                          request.get(LOADED_KEY), session.max_age or self.idle_ttl)
        if not len(self.outbox):
            try:
                await self._redis.set(turn.key, turn.value, ex=turn.max_age)
                return
            except RedisError as error:
                log.warning("session store: cannot write: %s: %s", type(error).__name__, error)
        self.outbox.keep_turn(session_id, turn)

    def _key(self, session_id: str) -> str:
        return self.cookie_name + "_" + session_id


def _unavailable(action: str, error: RedisError) -> SessionStoreUnavailable:
    log.warning("session store: cannot %s: %s: %s", action, type(error).__name__, error)
    return _still_away(error)


def _still_away(error: BaseException) -> SessionStoreUnavailable:
    return SessionStoreUnavailable(
        f"The session store (Redis) cannot be reached ({type(error).__name__}); "
        "try again shortly.")


def _outbox(client: Redis, max_turns: int) -> Outbox[_LateWrite, _LateRelease]:
    """The outbox of one Redis: late writes through `WRITE_LATE_SCRIPT`, late releases by
    compare-and-delete with the token (Redis errors become `SessionStoreUnavailable`,
    quietly: the outbox retries four times a second)."""
    write_late = client.register_script(WRITE_LATE_SCRIPT)

    async def write(turn: _LateWrite) -> bool:
        try:
            return bool(await write_late(keys=[turn.key],
                                         args=[turn.loaded or b"", turn.value, turn.max_age]))
        except RedisError as error:
            raise _still_away(error) from error

    async def release(late: _LateRelease) -> None:
        try:
            await late.lock.do_release(late.token)
        except LockNotOwnedError:
            pass   # it lapsed while Redis was away; nobody's lock to free
        except RedisError as error:
            raise _still_away(error) from error

    return Outbox(write=write, release=release, max_turns=max_turns)


@dataclass
class _Held:
    lock: Lock
    token: bytes
    keeper: asyncio.Task[None]


class RedisSessionLocks:
    """`Locks` shared by every replica: one Redis key per session, held while a request runs.

    A lock whose release fails (Redis away), or whose session's turn waits in the `outbox`,
    is released from the outbox once Redis answers (and that turn is written), not left to
    its TTL.
    """

    def __init__(self, client: Redis, *, ttl: float = DEFAULT_LOCK_TTL,
                 outbox: Outbox[_LateWrite, _LateRelease] | None = None) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._client = client
        self.ttl = ttl
        self.outbox = outbox if outbox is not None else _outbox(client, 0)
        self._held: dict[str, _Held] = {}

    async def acquire(self, session_id: str) -> bool:
        if session_id in self._held:  # still running here, even if its Redis key lapsed
            return False
        await self.outbox.settle(session_id)   # our own lock from before an outage, say
        lock = self._client.lock(LOCK_KEY_PREFIX + session_id, timeout=self.ttl,
                                 blocking=False, thread_local=False)
        token = secrets.token_hex(16).encode()
        try:
            if not await lock.acquire(token=token):
                return False
        except RedisError as error:
            raise _unavailable("lock a session", error) from error
        self._held[session_id] = _Held(lock, token,
                                       asyncio.create_task(self._keep(session_id, lock)))
        return True

    async def release(self, session_id: str) -> None:
        held = self._held.pop(session_id, None)
        if held is None:
            return
        held.keeper.cancel()
        late = _LateRelease(held.lock, held.token)
        if len(self.outbox):
            # Its session's turn may wait there: the lock must outlive it, or another
            # replica could serve the session without it. And Redis is away anyway.
            self.outbox.keep_lock(session_id, late)
            return
        try:
            await held.lock.do_release(held.token)
        except LockNotOwnedError:
            log.warning("session %s: its lock had expired before its request ended",
                        session_tag(session_id))
        except RedisError as error:
            log.warning("session %s: its lock is not released yet (%s): it will be as soon "
                        "as the session store answers", session_tag(session_id),
                        type(error).__name__)
            self.outbox.keep_lock(session_id, late)

    async def _keep(self, session_id: str, lock: Lock) -> None:
        """Extend the lock while its request runs; a dead replica stops extending it."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await lock.reacquire()
            except LockNotOwnedError:
                log.warning("session %s: its lock expired while its request ran",
                            session_tag(session_id))
                return
            except RedisError as error:  # Redis away: try again; the lock may lapse meanwhile
                log.warning("session %s: its lock was not extended: %s",
                            session_tag(session_id), type(error).__name__)

    async def close(self) -> None:
        for session_id in list(self._held):
            await self.release(session_id)


class RedisResponseStore:
    """`ResponseStore` in Redis: one key per response, written once with the retention as its
    expiry, so every replica continues any stored conversation and Redis forgets old ones."""

    def __init__(self, client: Redis, *, ttl: int = DEFAULT_RESPONSE_TTL) -> None:
        if ttl < 1:
            raise ValueError("ttl must be positive")
        self._client = client
        self.ttl = ttl

    async def put(self, stored: StoredResponse) -> None:
        try:
            await self._client.set(RESPONSE_KEY_PREFIX + stored.response_id, stored.encode(),
                                   ex=self.ttl)
        except RedisError as error:
            raise _unavailable("store a response", error) from error

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        try:
            text = await self._client.get(RESPONSE_KEY_PREFIX + response_id)
        except RedisError as error:
            raise _unavailable("read a response", error) from error
        stored = StoredResponse.decode(response_id, text) if text is not None else None
        return stored if stored is not None and stored.owned_by(owner) else None

    async def delete(self, response_id: str, owner: str) -> bool:
        if await self.get(response_id, owner) is None:
            return False
        try:
            return bool(await self._client.delete(RESPONSE_KEY_PREFIX + response_id))
        except RedisError as error:
            raise _unavailable("delete a response", error) from error


class RedisSessionStore:
    """The `SessionStore` for several replicas: history and locks in one Redis.

        store = RedisSessionStore("redis://127.0.0.1:6379/0", idle_ttl=3600)
        chat_stream = ChatStream(session_store=store)   # or session_store="redis://..."

    `redis` is a URL or your own `redis.asyncio.Redis` client (TLS, auth, sentinel: yours to
    configure; keep `decode_responses` off, give it socket timeouts). `max_pending_turns`:
    how many finished turns this replica keeps in memory while Redis is away (outbox.py);
    `response_ttl`: seconds a stored response (`/v1/responses`) is kept.
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
        max_pending_turns: int = DEFAULT_MAX_PENDING_TURNS,
        response_ttl: int = DEFAULT_RESPONSE_TTL,
    ) -> None:
        self.client = connect(redis) if isinstance(redis, str) else redis
        if self.client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the Redis client must have decode_responses off "
                             "(aiohttp-session decodes the stored bytes itself)")
        self.outbox = _outbox(self.client, max_pending_turns)
        self.storage = RedisSessionStorage(self.client, cookie_name=cookie_name,
                                           idle_ttl=idle_ttl, secure=secure,
                                           outbox=self.outbox)
        self.locks = RedisSessionLocks(self.client, ttl=lock_ttl, outbox=self.outbox)
        self.responses = RedisResponseStore(self.client, ttl=response_ttl)

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

    async def store_turn(self, request: web.Request, response: web.StreamResponse,
                         session: Session) -> None:
        await self.storage.store_turn(request, response, session)

    def outbox_counts(self) -> OutboxCounts:
        return self.outbox.counts()

    async def close(self) -> None:
        await self.locks.close()
        await self.outbox.close(CLOSE_TIMEOUT)
        await self.client.aclose()
