"""`QueueWait`: the clock of the jobs waiting for a slot, on the event loop.

    queue_wait = QueueWait(max_queue_wait, expire=refuse)   # refuse(job): take it out, say why
    queue_wait.start(job)    # it joined the queue
    queue_wait.stop(job)     # it left: started, or cancelled by its client

A job still waiting `seconds` after it joined is handed to `expire` (one timer per waiting
job, so nothing polls). With `seconds=None` there is no limit and no timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["J", "QueueWait"]

J = TypeVar("J", bound=Hashable)


class QueueWait(Generic[J]):
    """Calls `expire(job)` for every job that waits longer than `seconds`."""

    def __init__(self, seconds: float | None, expire: Callable[[J], None]) -> None:
        if seconds is not None and not seconds > 0:
            raise ValueError("max_queue_wait must be > 0 seconds "
                             "(no limit: None, or 0 on the command line)")
        self.seconds = seconds
        self._expire = expire
        self._timers: dict[J, asyncio.TimerHandle] = {}

    def start(self, job: J) -> None:
        if self.seconds is not None:
            loop = asyncio.get_running_loop()
            self._timers[job] = loop.call_later(self.seconds, self._fire, job)

    def stop(self, job: J) -> None:
        timer = self._timers.pop(job, None)
        if timer is not None:
            timer.cancel()

    def _fire(self, job: J) -> None:
        del self._timers[job]
        self._expire(job)
