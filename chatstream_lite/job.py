"""One generation request (`Job`) and the events the engine reports about it.

    >>> job = engine.submit(messages, SamplingParams(max_new_tokens=32), cache_key=session_id)
    >>> async for event in job.events():   # Started, Piece..., then Finished or Failed
    ...     ...
    >>> job.cancel()                        # from the loop, at any time
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Hashable, Literal, Union

from .prompt import Message
from .sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Started:
    """The prompt fits and is about to be evaluated; the oldest messages were dropped."""

    prompt_tokens: int
    dropped_messages: int


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    reached_model: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Union[Started, Piece, Finished, Failed]


class Job:
    """Created by `Engine.submit`, consumed with `events()`, stopped with `cancel()`."""

    def __init__(self, messages: list[Message], params: SamplingParams,
                 cache_key: Hashable | None, withdraw: Callable[[Job], None]) -> None:
        self.messages = messages
        self.params = params
        self.cache_key = cache_key      # whose KV cells to reuse, e.g. the session id
        self._withdraw = withdraw
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancel = threading.Event()
        self.done = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop this job: dropped from the queue if waiting, stopped within a step if running."""
        if self.done or self._cancel.is_set():
            return
        self._cancel.set()
        self._withdraw(self)

    async def events(self) -> AsyncIterator[Event]:
        """Every event of this job, ending with `Finished` or `Failed`."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    def _deliver(self, event: Event) -> None:  # on the loop
        if isinstance(event, (Finished, Failed)):
            self.done = True
        self._events.put_nowait(event)
