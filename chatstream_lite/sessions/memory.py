"""Server-side sessions: the cookie carries only a random id, the history stays on the server.

Built on aiohttp-session. A `SessionStore` is where sessions live: an aiohttp-session
storage (the history), `Locks` (one request per session, else 409), and a health check.
`MemorySessionStore` is the default: `MemoryStorage` in this process, bounded by an idle
expiry and a maximum count so that a server running for weeks does not grow without end, and
in-process `SessionLocks`. A full store makes room by forgetting the least recently used
session, but never an active one (used within `active_window`, 30 minutes): new sessions are
refused with 429 instead, and each client address may start only so many (`NewSessionLimit`),
so a flood of cookie-less requests cannot wipe the histories of the people chatting.
`RedisSessionStore` (sessions/redis.py) is the same three things in Redis, shared by every replica.

    >>> store = MemorySessionStore(MemoryStorage(max_sessions=10_000, idle_ttl=24 * 3600))
    >>> aiohttp_session.setup(app, store.storage)
    >>> if await store.locks.acquire(session_id): ...     # and release() in a finally
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from typing import Protocol

from aiohttp import web
from aiohttp_session import AbstractStorage, Session

from ..config import DEFAULTS
from ..errors import ChatStreamError, SessionStoreUnavailable
from .outbox import LOST_REASONS, OutboxCounts, session_tag
from .responses import MemoryResponseStore, ResponseStore

__all__ = ["DEFAULT_ACTIVE_WINDOW", "DEFAULT_COOKIE_NAME", "DEFAULT_IDLE_TTL",
           "DEFAULT_MAX_SESSIONS", "DEFAULT_NEW_SESSION_BURST",
           "DEFAULT_NEW_SESSIONS_PER_MINUTE", "SESSION_ID_BYTES", "ensure_identity",
           "Locks", "MemorySessionStore", "MemoryStorage", "new_session_id",
           "NewSessionLimit", "SessionLocks", "SessionStore", "TooManySessions"]

log = logging.getLogger(__name__)

DEFAULT_COOKIE_NAME = "CHATSTREAM_SESSION"
DEFAULT_MAX_SESSIONS = DEFAULTS.sessions.max_sessions
DEFAULT_IDLE_TTL = DEFAULTS.sessions.session_idle_ttl
# A session used this recently belongs to someone still chatting (reading a reply, typing the
# next message): a full store refuses new sessions rather than forget it.
DEFAULT_ACTIVE_WINDOW = 30 * 60
# New sessions per client address: a class or an office behind one address starting together
# fits in the burst; one address then holds at most 30 + 20 * 30 = 630 active sessions, so
# filling the default 10,000 takes 16 addresses, not one (a flood ran at 23/s from one).
DEFAULT_NEW_SESSION_BURST = 30
DEFAULT_NEW_SESSIONS_PER_MINUTE = 20.0

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


class TooManySessions(ChatStreamError):
    """No new session now: the store is full of active ones, or this address started too
    many lately. Nothing was started; the client may retry after `Retry-After` seconds."""

    status = 429
    code = "too_many_sessions"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class NewSessionLimit:
    """A token bucket per client address for starting sessions: `burst` at once, then
    `per_minute` (0: no limit).

        >>> limit = NewSessionLimit(burst=30, per_minute=20)
        >>> limit.wait(request.remote)        # 0.0: go ahead; else seconds to wait

    IPv6 clients count per /64 (what one host gets). Loopback peers are not limited unless
    `include_loopback`: they are this host, or a reverse proxy on it, which then speaks for
    every client and must limit them itself (README, "Security").
    """

    def __init__(self, burst: int = DEFAULT_NEW_SESSION_BURST,
                 per_minute: float = DEFAULT_NEW_SESSIONS_PER_MINUTE, *,
                 include_loopback: bool = False, max_addresses: int = DEFAULT_MAX_SESSIONS) -> None:
        if burst < 1 or per_minute < 0:
            raise ValueError("burst must be at least 1 and per_minute 0 (no limit) or more")
        self.burst = burst
        self.per_minute = per_minute
        self.include_loopback = include_loopback
        self.max_addresses = max_addresses
        # address -> (tokens, when counted); least recently seen first. Forgetting an address
        # only gives it a fresh burst.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def wait(self, address: str | None) -> float:
        """Take a token for `address`: 0.0 if there was one, else the seconds until there is."""
        key = self._key(address)
        if key is None or self.per_minute == 0:
            return 0.0
        now = time.monotonic()
        tokens, counted = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted) * self.per_minute / 60)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) * 60 / self.per_minute
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)
        return wait

    def _key(self, address: str | None) -> str | None:
        if address is None:  # a Unix socket: this host
            return None if not self.include_loopback else ""
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback and not self.include_loopback:
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)


class MemoryStorage(AbstractStorage):
    """aiohttp-session storage that keeps session data in this process's memory.

    A cookie id the store does not know (expired, evicted, or made up by a client) is never
    adopted: the request gets a new session with a fresh id. A request that needs a new
    session gets `TooManySessions` (429) when every one of the `max_sessions` was used within
    `active_window` seconds, or when `new_session_limit` says its address started too many.
    """

    def __init__(
        self,
        *,
        cookie_name: str = DEFAULT_COOKIE_NAME,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_ttl: int = DEFAULT_IDLE_TTL,
        secure: bool | None = None,
        active_window: float = DEFAULT_ACTIVE_WINDOW,
        new_session_limit: NewSessionLimit | None = None,
    ) -> None:
        super().__init__(
            cookie_name=cookie_name,
            max_age=idle_ttl,
            httponly=True,
            samesite="Lax",
            secure=secure,
        )
        if max_sessions < 1 or idle_ttl < 1 or active_window < 0:
            raise ValueError("max_sessions and idle_ttl must be positive, active_window not "
                             "negative")
        self.max_sessions = max_sessions
        self.idle_ttl = idle_ttl
        self.active_window = active_window
        self.new_session_limit = new_session_limit or NewSessionLimit(
            max_addresses=max_sessions)
        # id -> (last use, JSON text); kept in least-recently-used-first order.
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        # An empty store is still a store: `storage or MemoryStorage()` must not replace it.
        return True

    async def load_session(self, request: web.Request) -> Session:
        key = self.load_cookie(request)
        now = time.monotonic()
        entry = self._data.get(key) if key else None
        if key is not None and entry is not None and now - entry[0] <= self.idle_ttl:
            self._data[key] = (now, entry[1])   # a request of this session: it is in use
            self._data.move_to_end(key)
            return Session(key, data=self._decoder(entry[1]), new=False, max_age=self.max_age)
        self._admit_new_session(request, now)
        return Session(None, data=None, new=True, max_age=self.max_age)

    def _admit_new_session(self, request: web.Request, now: float) -> None:
        self._evict(now)
        if len(self._data) >= self.max_sessions:
            least_recent = next(iter(self._data.values()))[0]
            if now - least_recent < self.active_window:  # else the save makes room for it
                raise TooManySessions(
                    "The server is holding as many active conversations as it can; "
                    "try again in a few minutes.", self.active_window - (now - least_recent))
        wait = self.new_session_limit.wait(request.remote)
        if wait > 0:
            raise TooManySessions(
                "Too many new conversations from your address; try again shortly.", wait)

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
        now = time.monotonic()
        self._data[key] = (now, self._encoder(self._get_session_data(session)))
        self._data.move_to_end(key)
        self._evict(now)

    def _evict(self, now: float) -> None:
        """Forget expired sessions, then least recently used ones while over `max_sessions`,
        but never an active one: admission already refused new sessions once the store was
        full of those, so it overflows only by the new sessions admitted just before."""
        while self._data:
            key, (last_use, _) = next(iter(self._data.items()))
            idle = now - last_use
            if idle <= self.idle_ttl and (
                    len(self._data) <= self.max_sessions or idle < self.active_window):
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

    @property
    def responses(self) -> ResponseStore:
        """Stored responses (`/v1/responses`), on the same backend as the histories."""
        ...

    async def healthy(self) -> bool:
        """True when requests that need a session can be served now."""
        ...

    async def store_turn(self, request: web.Request, response: web.StreamResponse,
                         session: Session) -> None:
        """Write a turn whose reply the client has received (its headers are sent). Never
        raises: a store that cannot write it now keeps it and writes it before the
        session's next request, or logs, naming the session, that it could not."""
        ...

    def outbox_counts(self) -> OutboxCounts:
        """What the store owes (turns and lock releases waiting for it) and has lost."""
        ...

    async def close(self) -> None:
        """Release what is held; a store that owes turns tries once more, briefly."""
        ...


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

    def __init__(self, storage: AbstractStorage,
                 responses: ResponseStore | None = None) -> None:
        self.storage = storage
        self.locks = SessionLocks()
        self.responses = responses if responses is not None else MemoryResponseStore()
        self._lost = 0

    def __str__(self) -> str:
        if isinstance(self.storage, MemoryStorage):
            return (f"memory (this process: up to {self.storage.max_sessions} sessions, kept "
                    f"{self.storage.idle_ttl} s after their last turn)")
        return f"memory locks, {type(self.storage).__name__} storage"

    async def healthy(self) -> bool:
        return True

    async def store_turn(self, request: web.Request, response: web.StreamResponse,
                         session: Session) -> None:
        # MemoryStorage never fails; another aiohttp-session storage given to us may.
        try:
            await self.storage.save_session(request, response, session)
        except SessionStoreUnavailable:
            self._lost += 1
            log.error("session %s: a turn the client received is lost (unavailable): the "
                      "session store is unreachable", session_tag(ensure_identity(session)))

    def outbox_counts(self) -> OutboxCounts:
        lost = dict.fromkeys(LOST_REASONS, 0)
        lost["unavailable"] = self._lost
        return OutboxCounts(lost=lost)

    async def close(self) -> None:
        return None
