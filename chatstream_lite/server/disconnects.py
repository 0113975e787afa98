"""Noticing clients that leave: one watcher per `ChatStream` for every request in flight.

    watcher = DisconnectWatcher()
    watch = watcher.watch(request.transport, on_gone)   # on_gone() runs once if the client leaves
    ...
    watch.cancel()                                      # the request ended first: forget it

Every registered transport is looked at in one pass per tick by one task, which runs only
while something is registered. A thousand queued requests cost one wake-up per tick and a
thousand `is_closing()` calls (about 35 µs), not a thousand timers: with a poll task per
request they were 50,000 wake-ups a second, and the running stream lost 46 % of its speed
to them (benchmarks/NOTES.md, H7).

Why a poll and not an event. aiohttp 3.14 gives a handler no public notice that its client
left: it cancels the handler task only when the server runs with `handler_cancellation=True`
(an opt-in setting of whoever starts the server, not of a library, and a cancellation could
land in the middle of the completion callback); `Request.wait_for_disconnection()` existed
only in 3.10.0 and was removed again (aio-libs/aiohttp#8636); `RequestHandler.connection_lost`
is no hook (the class has `__slots__`), and slipping a protocol of our own in front of it with
`transport.set_protocol()` would put our code inside aiohttp's reading of every keep-alive
connection. What is public and dependable is the transport itself: when the peer closes, the
event loop reads EOF and the transport closes itself in that same iteration, so
`is_closing()` is true from then on. That is also what the engine thread reads between steps
(`Job.abandoned`), so a running job stops at the next step whatever the tick; the tick
(`DISCONNECT_POLL_INTERVAL`) only bounds how soon a queued request gives up its place and
its callback runs. While a reply streams, the next failed write sees it too
(`Exchange._send`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = ["DISCONNECT_POLL_INTERVAL", "WATCHER_TASK", "DisconnectWatcher", "Transport", "Watch"]

log = logging.getLogger(__name__)

# How soon a queued request whose client left frees its place (a running one is stopped by
# the engine itself, at the next step). It was 5 ms while the watcher was what stopped
# running jobs: 200 wake-ups a second of the event loop, each taking a core from llama.cpp's
# threads, cost 8 streams 3 % of their tokens/s (benchmarks/NOTES.md §9).
DISCONNECT_POLL_INTERVAL = 0.05

WATCHER_TASK = "chatstream-disconnect-watcher"

Transport = asyncio.BaseTransport | None


class Watch:
    """One registration: `on_gone` runs at most once, from the watcher's pass."""

    __slots__ = ("_watcher", "on_gone", "transport")

    def __init__(self, watcher: DisconnectWatcher, transport: Transport,
                 on_gone: Callable[[], None]) -> None:
        self._watcher = watcher
        self.transport = transport
        self.on_gone = on_gone

    def cancel(self) -> None:
        """Stop watching (the request ended); harmless after `on_gone` ran."""
        self._watcher._watched.pop(self, None)


class DisconnectWatcher:
    """Calls each registered request's `on_gone` once, when its connection closes."""

    def __init__(self, interval: float = DISCONNECT_POLL_INTERVAL) -> None:
        self._interval = interval
        self.passes = 0         # ticks run so far: what a benchmark or test can count
        self._watched: dict[Watch, None] = {}   # an insertion-ordered set
        self._task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float:
        return self._interval

    @interval.setter
    def interval(self, seconds: float) -> None:
        """A new interval takes effect at once: a pass now, then sleeps of the new length. A
        task asleep on the old one would tick once more up to that long after (with 60 s
        set, a close that came within the old 50 ms was still seen by the old tick)."""
        self._interval = seconds
        if self._task is not None and not self._task.done():
            self._task.cancel()
            self._task = None
            if self._watched:
                self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                    name=WATCHER_TASK)

    @property
    def watching(self) -> int:
        return len(self._watched)

    def watch(self, transport: Transport, on_gone: Callable[[], None]) -> Watch:
        """Register a request's transport (None counts as closed); `on_gone` runs on the
        loop, at the next pass that finds it closing, never inside this call."""
        watch = Watch(self, transport, on_gone)
        self._watched[watch] = None
        loop = asyncio.get_running_loop()
        # A task left pending by a loop that was closed under it would never tick again.
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name=WATCHER_TASK)
        return watch

    async def _run(self) -> None:
        # Ends once nothing is registered, so an idle server has no timer at all.
        while self._watched:
            self._pass()
            await asyncio.sleep(self._interval)

    def _pass(self) -> None:
        self.passes += 1
        gone = [w for w in self._watched if w.transport is None or w.transport.is_closing()]
        for watch in gone:
            if watch not in self._watched:   # cancelled by an earlier action of this pass
                continue
            del self._watched[watch]         # before the action: it runs once
            try:
                watch.on_gone()
            except Exception:
                log.exception("a disconnect action failed")
