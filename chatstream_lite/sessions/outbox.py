"""The outbox: what a replica owes its session store while the store is away.

    outbox = Outbox(write=write_late, release=release_late, max_turns=1000)
    outbox.keep_turn(session_id, turn)     # a turn the client saw succeed; False if lost
    outbox.keep_lock(session_id, lock)     # a lock held here that could not be released
    await outbox.settle(session_id)        # before that session's next request is served
    await outbox.close(timeout=5.0)        # last try at shutdown; the rest is logged as lost

A reply that streamed to its end was acknowledged to the client: if the store cannot take
that turn (Redis restarting, failing over, cut off), the turn waits here, in memory, and is
written as soon as the store answers again, in the order it was kept, each session's turn
before its lock is released. A session this replica owes anything to is settled before any
request of that session is served here (`settle`, which fails with the store's 503 while it
is still away), and the lock it holds keeps every other replica out until then (409), so no
reply is ever built on a history without the turn. Held locks whose release failed are
released the same way, as soon as the store answers, not when their TTL runs out.

Once anything waits here, everything queues behind it rather than trying the store first:
an away store is then paid for once (the retry every `RETRY_INTERVAL`), not by every turn.

What cannot be kept is logged with its session and counted by reason: `full` (already
`max_turns` turns wait), `conflict` (the stored history changed meanwhile: another replica
served the session after this one's lock lapsed, and its turn wins), `stopping` (the process
ends while the store is still away). Sessions are named in logs by `session_tag`, never by
the whole id: the id is the session's only credential.

The outbox knows nothing of Redis: the store gives it `write` (True: written, False: refused
as a conflict) and `release`, which raise `SessionStoreUnavailable` while the store is away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..config import DEFAULTS
from ..errors import SessionStoreUnavailable

__all__ = ["DEFAULT_MAX_PENDING_TURNS", "LOST_REASONS", "RETRY_INTERVAL", "Outbox",
           "OutboxCounts", "session_tag"]

log = logging.getLogger(__name__)

# Turns kept at most. One is a session's whole history (up to ~20 KB at n_ctx 4096, README
# "Scale-out"), so the default bounds the outbox near 20 MB however long the store is away.
DEFAULT_MAX_PENDING_TURNS = DEFAULTS.sessions.max_pending_turns
# Seconds between tries while anything is owed: a store that is back is noticed within this,
# and a session another replica waits for is freed within it (issue 28: "a second or two").
RETRY_INTERVAL = 0.25
LOST_REASONS = ("full", "conflict", "stopping", "unavailable")
# Characters of a session id that name it in logs: enough to find it among live sessions
# (48 bits), far too few to use as its cookie.
SESSION_TAG_LENGTH = 8

TurnT = TypeVar("TurnT")
LockT = TypeVar("LockT")


def session_tag(session_id: str) -> str:
    """How logs name a session: the start of its id, not the id (a bearer credential).

        >>> session_tag("g7j8Y8ob19aMCXYs2GuyTzsm0QRWVnQ31oREAGuF98Q")
        'g7j8Y8ob…'
    """
    return session_id[:SESSION_TAG_LENGTH] + "…"


@dataclass(frozen=True)
class OutboxCounts:
    """What a store owes and has lost, read by /metrics at scrape time.

        >>> store.outbox_counts()
        OutboxCounts(turns=1, locks=1, written_late=3, lost={'full': 0, ...})
    """

    turns: int = 0            # turns waiting for the store
    locks: int = 0            # lock releases waiting for the store
    written_late: int = 0     # turns written after an outage, since start
    lost: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(LOST_REASONS, 0))


@dataclass
class _Owed(Generic[TurnT, LockT]):
    turn: TurnT | None = None
    kept_at: float = 0.0
    lock: LockT | None = None


class Outbox(Generic[TurnT, LockT]):
    """See the module docstring."""

    def __init__(self, *, write: Callable[[TurnT], Awaitable[bool]],
                 release: Callable[[LockT], Awaitable[None]],
                 max_turns: int = DEFAULT_MAX_PENDING_TURNS,
                 retry_interval: float = RETRY_INTERVAL) -> None:
        if max_turns < 0 or retry_interval <= 0:
            raise ValueError("max_turns must be 0 or more, retry_interval positive")
        self._write = write
        self._release = release
        self.max_turns = max_turns
        self.retry_interval = retry_interval
        # Session id -> what is owed to it, oldest first: the order it is paid back in.
        self._owed: OrderedDict[str, _Owed[TurnT, LockT]] = OrderedDict()
        self._turns = 0
        self._written_late = 0
        self._lost: Counter[str] = Counter()
        self._paying = asyncio.Lock()          # one payer at a time: each write happens once
        self._retry: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._owed)

    def owes(self, session_id: str) -> bool:
        return session_id in self._owed

    def counts(self) -> OutboxCounts:
        return OutboxCounts(
            turns=self._turns,
            locks=sum(owed.lock is not None for owed in self._owed.values()),
            written_late=self._written_late,
            lost={reason: self._lost[reason] for reason in LOST_REASONS})

    # -- keeping ----------------------------------------------------------------------------
    def keep_turn(self, session_id: str, turn: TurnT) -> bool:
        """Keep a turn the store could not take; False (logged, counted) when it cannot be."""
        owed = self._owed.get(session_id)
        if owed is not None and owed.turn is not None:
            owed.turn = turn   # a later state of the same session replaces the earlier one
            return True
        if self._closed or self._turns >= self.max_turns:
            reason = "stopping" if self._closed else "full"
            self.lost(session_id, reason, f"the bound of {self.max_turns} kept turns is "
                      "reached" if reason == "full" else "the server is stopping")
            return False
        owed = self._owed.setdefault(session_id, _Owed())
        owed.turn, owed.kept_at = turn, time.monotonic()
        self._turns += 1
        log.warning("session %s: the session store is away; the turn just streamed is kept "
                    "in memory (%d waiting) and stored when it answers",
                    session_tag(session_id), self._turns)
        self._retry_soon()
        return True

    def keep_lock(self, session_id: str, lock: LockT) -> None:
        """Release `lock` once the store answers, after the session's kept turn if any."""
        self._owed.setdefault(session_id, _Owed()).lock = lock
        self._retry_soon()

    def lost(self, session_id: str, reason: str, why: str) -> None:
        """A turn the client received is not in the store and never will be: say so."""
        self._lost[reason] += 1
        log.error("session %s: a turn the client received is lost (%s): %s",
                  session_tag(session_id), reason, why)

    # -- paying back ------------------------------------------------------------------------
    async def settle(self, session_id: str) -> None:
        """Pay what is owed to this session now; `SessionStoreUnavailable` if the store is
        still away (the request waiting on it gets the store's 503)."""
        if session_id not in self._owed:
            return
        async with self._paying:
            if session_id in self._owed:
                await self._pay(session_id)
        if not self._owed and self._retry is not None:
            self._retry.cancel()   # paid up: the next keep starts a fresh retry

    async def flush(self) -> None:
        """Pay everything, oldest first; `SessionStoreUnavailable` at the first failure
        (the rest waits for the next try)."""
        async with self._paying:
            while self._owed:
                await self._pay(next(iter(self._owed)))

    async def _pay(self, session_id: str) -> None:
        owed = self._owed[session_id]
        if owed.turn is not None:
            written = await self._write(owed.turn)
            late = time.monotonic() - owed.kept_at
            owed.turn = None
            self._turns -= 1
            if written:
                self._written_late += 1
                log.warning("session %s: the turn kept while the session store was away is "
                            "stored now, %.1f s late", session_tag(session_id), late)
            else:
                self.lost(session_id, "conflict", "another replica wrote the session while "
                          "this one waited for the store (its lock had lapsed)")
        # Read again after the write's await: the request may have handed its lock over
        # meanwhile.
        if owed.lock is not None:
            await self._release(owed.lock)
            owed.lock = None
        del self._owed[session_id]

    def _retry_soon(self) -> None:
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._retry_until_paid())

    async def _retry_until_paid(self) -> None:
        while self._owed and not self._closed:
            await asyncio.sleep(self.retry_interval)
            try:
                await self.flush()
            except SessionStoreUnavailable:
                pass                      # still away: the next try is in retry_interval
            except Exception:  # a bug must not stop the paying back
                log.exception("paying the session store back failed")

    # -- the end ----------------------------------------------------------------------------
    async def close(self, timeout: float) -> None:
        """One last try, bounded by `timeout`; what is still owed then is logged as lost
        (turns) or left to expire (locks). Never waits for a store that does not answer."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            with suppress(asyncio.CancelledError):
                await self._retry
        if self._owed:
            with suppress(SessionStoreUnavailable, asyncio.TimeoutError):
                await asyncio.wait_for(self.flush(), timeout)
        for session_id, owed in self._owed.items():
            if owed.turn is not None:
                self.lost(session_id, "stopping", "the server is stopping and the session "
                          "store is still away")
            if owed.lock is not None:
                log.warning("session %s: its lock was not released; it expires by itself",
                            session_tag(session_id))
        self._owed.clear()
        self._turns = 0
