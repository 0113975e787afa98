"""One generation request (`Job`), from admission to its last event.

    >>> job = admission.submit(messages, SamplingParams(max_new_tokens=32), cache_key=session_id)
    >>> async for event in job.events():   # Started, Piece..., then Finished or Failed
    ...     ...
    >>> job.cancel()                        # from the loop, at any time
    >>> job.abandoned = lambda: transport.is_closing()   # the client gone: the engine sees it

A job is created by `Admission` (the one bounded queue), prepared off the engine thread (its
`prompt` is set: token ids, fitted to the context), and only then handed to an engine, which
reports on it with `deliver`. Every engine uses this class.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass

from .events import Event, is_last
from .sampling import SamplingParams
from .template import Message

__all__ = ["Job", "PlainPrompt", "Prompt", "PromptInput"]


@dataclass(frozen=True)
class PlainPrompt:
    """A prompt read as it is, with no chat template (`/v1/completions`). It is tokenized
    as plain text: control-token text in it stays text, as in message contents."""

    text: str


# What a job asks the model to continue: a conversation (rendered with the chat template),
# or plain text.
PromptInput = list[Message] | PlainPrompt


@dataclass(frozen=True)
class Prompt:
    """A conversation ready for the model: its token ids and what fitting it dropped."""

    tokens: list[int]
    dropped_messages: int = 0
    stops: tuple[str, ...] = ()     # text that ends the reply (the template's end of turn, ...)


class Job:
    """See the module docstring. `cancel()` and `events()` are for the loop; the cancel flag
    is a `threading.Event` so that the engine thread and the preparation worker can read it."""

    def __init__(self, messages: PromptInput, params: SamplingParams, *,
                 cache_key: Hashable | None = None, drop_oldest: bool = True) -> None:
        self.messages = messages
        self.params = params
        self.cache_key = cache_key      # whose KV cells to reuse, e.g. the session id
        self.drop_oldest = drop_oldest  # may preparation drop old turns to fit? (else refuse)
        self.prompt: Prompt | None = None
        self.done = False
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancel = threading.Event()
        # Set by the admission layer: take a cancelled job out of the queue; learn of its end.
        self.on_cancel: Callable[[Job], None] | None = None
        self.on_end: Callable[[Job], None] | None = None
        # Set by whoever serves the job (the HTTP exchange): whether the one waiting for it
        # has gone, e.g. its connection closed. The engine thread reads `cancelled` between
        # steps, so a job whose client left stops at the next step without waiting for the
        # loop to notice and call `cancel()`. Called on any thread: a cheap, read-only check.
        self.abandoned: Callable[[], bool] = _never

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or self.abandoned()

    def cancel(self) -> None:
        """Stop this job: dropped from the queue if waiting, stopped within a step if running."""
        if self.done or self._cancel.is_set():
            return
        self._cancel.set()
        if self.on_cancel is not None:
            self.on_cancel(self)

    async def events(self) -> AsyncIterator[Event]:
        """Every event of this job, ending with `Finished` or `Failed`."""
        while True:
            event = await self._events.get()
            yield event
            if is_last(event):
                return

    def deliver(self, event: Event) -> None:
        """On the loop: the engine (or the admission layer) reports `event`."""
        if self.done:
            return      # one last event only
        if is_last(event):
            self.done = True
        self._events.put_nowait(event)
        if self.done and self.on_end is not None:
            self.on_end(self)


def _never() -> bool:
    return False
