"""Server-side sessions: the cookie carries only a random id, the history stays on the server.

Built on aiohttp-session. A `SessionStore` is where sessions live: an aiohttp-session
storage (the history), `Locks` (one request per session, else 409), and a health check.
`MemorySessionStore` is the default: `MemoryStorage` in this process, bounded by an idle
expiry and a maximum count (least recently used sessions go first) so that a server running
for weeks does not grow without end, and in-process `SessionLocks`. `RedisSessionStore`
(redis_sessions.py) is the same three things in Redis, shared by every replica.

    >>> store = MemorySessionStore(MemoryStorage(max_sessions=10_000, idle_ttl=24 * 3600))
    >>> aiohttp_session.setup(app, store.storage)
    >>> if await store.locks.acquire(session_id): ...     # and release() in a finally
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Protocol

from aiohttp import web
from aiohttp_session import AbstractStorage, Session

DEFAULT_COOKIE_NAME = "CHATSTREAM_SESSION"
DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_IDLE_TTL = 24 * 3600

# 32 random bytes (256 bits) from the OS CSPRNG, URL-safe text.
SESSION_ID_BYTES = 32


def new_session_id() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def ensure_identity(session: Session) -> str:
    """The session's id, giving a new session a fresh random one now.

    The id is needed before the stream starts (for the per-session lock and the cookie
    that must go out with the response headers).
    """
    if session.identity is None:
        session.set_new_identity(new_session_id())
    return str(session.identity)


class MemoryStorage(AbstractStorage):
    """aiohttp-session storage that keeps session data in this process's memory.

    A cookie id the store does not know (expired, evicted, or made up by a client) is never
    adopted: the request gets a new session with a fresh id.
    """

    def __init__(
        self,
        *,
        cookie_name: str = DEFAULT_COOKIE_NAME,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_ttl: int = DEFAULT_IDLE_TTL,
        secure: bool | None = None,
    ) -> None:
        super().__init__(
            cookie_name=cookie_name,
            max_age=idle_ttl,
            httponly=True,
            samesite="Lax",
            secure=secure,
        )
        if max_sessions < 1 or idle_ttl < 1:
            raise ValueError("max_sessions and idle_ttl must be positive")
        self.max_sessions = max_sessions
        self.idle_ttl = idle_ttl
        # id -> (last access, JSON text); kept in least-recently-used-first order.
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def load_session(self, request: web.Request) -> Session:
        key = self.load_cookie(request)
        entry = self._data.get(key) if key else None
        if key is None or entry is None or time.monotonic() - entry[0] > self.idle_ttl:
            return Session(None, data=None, new=True, max_age=self.max_age)
        self._data.move_to_end(key)
        return Session(key, data=self._decoder(entry[1]), new=False, max_age=self.max_age)

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        key = ensure_identity(session)
        if session.empty:
            self._data.pop(key, None)
            self.save_cookie(response, "", max_age=session.max_age)
            return
        self.save_cookie(response, key, max_age=session.max_age)
        # Stored as JSON text: a copy the caller cannot mutate, and the same shape every
        # other aiohttp-session store (Redis, memcached) keeps.
        self._data[key] = (time.monotonic(), self._encoder(self._get_session_data(session)))
        self._data.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        now = time.monotonic()
        while self._data:
            key, (last_access, _) = next(iter(self._data.items()))
            if now - last_access <= self.idle_ttl and len(self._data) <= self.max_sessions:
                break
            del self._data[key]


class Locks(Protocol):
    """At most one request in flight per session id: `acquire` is False while another holds it.

    `acquire` raises `SessionStoreUnavailable` when it cannot tell (the store is away);
    `release` never raises: a lock that cannot be released must expire by itself.
    """

    async def acquire(self, session_id: str) -> bool: ...

    async def release(self, session_id: str) -> None: ...


class SessionStore(Protocol):
    """Where sessions live: the history (`storage`), the per-session `locks`, and health."""

    @property
    def kind(self) -> str:
        """"memory", "redis": what /health reports."""
        ...

    @property
    def storage(self) -> AbstractStorage: ...

    @property
    def locks(self) -> Locks: ...

    async def healthy(self) -> bool:
        """True when requests that need a session can be served now."""
        ...

    async def close(self) -> None: ...


class SessionLocks:
    """In-process `Locks`: at most one request in flight per session id (a second gets 409)."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    async def acquire(self, session_id: str) -> bool:
        if session_id in self._held:
            return False
        self._held.add(session_id)
        return True

    async def release(self, session_id: str) -> None:
        self._held.discard(session_id)


class MemorySessionStore:
    """The default `SessionStore`: any aiohttp-session storage, locks in this process.

    Right for one replica; with several, each would keep its own sessions (RedisSessionStore).
    """

    kind = "memory"

    def __init__(self, storage: AbstractStorage) -> None:
        self.storage = storage
        self.locks = SessionLocks()

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None
