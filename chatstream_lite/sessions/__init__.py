"""Session stores: where each browser session's history and its one-request lock live.

    SessionStore              the protocol: an aiohttp-session storage + per-session locks
    MemorySessionStore        this process (memory.py): bounded, active sessions never evicted
    RedisSessionStore         Redis (redis.py): shared by every replica, cross-replica locks
    ResponseStore             stored responses of /v1/responses beside them (responses.py)

A new store implements `SessionStore` (see `redis.py` for a complete one). `RedisSessionStore`
is imported on first use, so that the memory store runs where redis is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .memory import (
    DEFAULT_COOKIE_NAME,
    DEFAULT_IDLE_TTL,
    DEFAULT_MAX_SESSIONS,
    Locks,
    MemorySessionStore,
    MemoryStorage,
    NewSessionLimit,
    SessionLocks,
    SessionStore,
    TooManySessions,
    ensure_identity,
    new_session_id,
)
from .responses import MemoryResponseStore, ResponseStore, StoredResponse

if TYPE_CHECKING:
    from .redis import RedisSessionStore

__all__ = [
    "DEFAULT_COOKIE_NAME",
    "DEFAULT_IDLE_TTL",
    "DEFAULT_MAX_SESSIONS",
    "Locks",
    "MemoryResponseStore",
    "MemorySessionStore",
    "MemoryStorage",
    "NewSessionLimit",
    "RedisSessionStore",
    "ResponseStore",
    "SessionLocks",
    "SessionStore",
    "StoredResponse",
    "TooManySessions",
    "ensure_identity",
    "new_session_id",
]


def __getattr__(name: str) -> Any:
    if name == "RedisSessionStore":
        return importlib.import_module(".redis", __name__).RedisSessionStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
