"""One accepted request on its way to the client: the job's events relayed through a framing.

    exchange = Exchange(request, job, framing, disconnects, received=time.monotonic(),
                        end_turn=store)
    await exchange.run()        # returns when the job has ended; the socket is watched meanwhile
    exchange.status             # the callback's StreamStatus; None when the request was refused

`end_turn(exchange)` runs once, as soon as the outcome is known; for a complete reply that is
before the client sees its end, so that its next request (on any replica) finds the turn
stored and the session free.

The rules every endpoint shares live here: a client that leaves (its socket closes) cancels
the job, so a waiting job never reaches the model and a running one stops within one token;
the status follows from what actually reached the client. The engine thread itself reads the
socket's state between steps (`Job.abandoned`: the event loop marks a transport closing in the
iteration that reads the peer's EOF), and the shared `DisconnectWatcher` or a failed write tells
this side. A `Framing` (framing.py) knows one endpoint's wire format.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from ..engine import Failed, Finished, Job, Piece, Started
from ..errors import ChatStreamError, GenerationFailed, ServiceUnavailable
from ..status import StreamStatus
from .disconnects import DisconnectWatcher
from .framing import Framing

__all__ = ["EndTurn", "Exchange", "Usage"]

log = logging.getLogger(__name__)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0


EndTurn = Callable[["Exchange"], Awaitable[None]]


class Exchange:
    """Relays one job's events to one client, watching the socket. See the module docstring."""

    def __init__(self, request: web.Request, job: Job, framing: Framing,
                 disconnects: DisconnectWatcher, received: float,
                 end_turn: EndTurn | None = None) -> None:
        self.request = request
        self.job = job
        self.framing = framing
        self._disconnects = disconnects
        self._transport = request.transport
        self.received = received
        self._end_turn = end_turn
        self.status: StreamStatus | None = None
        # What to answer instead of a stream: a refusal (status None, no callback), or a
        # failure once accepted (status unknown_error_occurred, one callback): opening the
        # stream failed, or the job failed before any header went out.
        self.error: ChatStreamError | None = None
        self.reply = ""                 # exactly the text handed to the framing (choice 0)
        self.dropped_messages = 0
        self.finish_reason = ""
        self.usage = Usage()
        self.first_piece_at: float | None = None
        self.piece_gaps: list[float] = []   # seconds between consecutive pieces
        self._last_piece_at = 0.0
        self._pieces: list[str] = []
        self._opened = False
        self._gone = False

    def _client_gone(self) -> None:
        self._gone = True
        self.job.cancel()

    def _left(self) -> bool:
        """Whether the client's connection is closed (any thread: one attribute read)."""
        transport = self._transport
        return transport is None or transport.is_closing()

    async def run(self) -> None:
        watch = self._disconnects.watch(self._transport, self._client_gone)
        self.job.abandoned = self._left
        failure: BaseException | None = None
        try:
            async for event in self.job.events():
                if isinstance(event, Finished) and event.reason == "cancelled" \
                        and not self._gone and self._left():
                    self._client_gone()   # the engine saw it first (Job.abandoned)
                if isinstance(event, Piece):
                    if self._opened and not self._gone:
                        await self._send(event)
                elif isinstance(event, Started):
                    self.dropped_messages = event.dropped_messages
                    self.usage.prompt_tokens = event.prompt_tokens
                    if not self._gone and self.error is None:
                        await self._open(event)
                elif isinstance(event, Finished):
                    self.finish_reason = event.reason
                    self.usage = Usage(event.prompt_tokens, event.completion_tokens,
                                       event.generation_seconds)
                    if self._opened and not self._gone and event.reason != "cancelled":
                        self.status = StreamStatus.SUCCESS
                        self.reply = "".join(self._pieces)
                        await self._turn_ended()
                        await self._close(event)
                elif isinstance(event, Failed):
                    failure = event.error
        except asyncio.CancelledError:
            # The handler itself was cancelled (aiohttp's shutdown timeout, or an app with
            # handler_cancellation=True): nobody will read the rest, so the job stops and the
            # request still ends with its one status before the cancellation goes on.
            self._client_gone()
            self.reply = "".join(self._pieces)
            await self._settle(None)
            await self._turn_ended()
            raise
        except ChatStreamError as error:  # ours, e.g. the session store failing
            self.job.cancel()
            failure = error
        except Exception as error:
            log.exception("streaming failed")
            self.job.cancel()
            failure = error
        finally:
            watch.cancel()
        self.reply = "".join(self._pieces)
        await self._settle(failure)
        await self._turn_ended()

    async def _turn_ended(self) -> None:
        end_turn, self._end_turn = self._end_turn, None
        if end_turn is not None:
            await end_turn(self)

    async def _open(self, started: Started) -> None:
        try:
            await self.framing.open(started)
        except ChatStreamError as failure:  # e.g. the session store, saving the cookie
            # The engine had taken the job: an accepted request that failed, not a refusal.
            self.error = failure
            self.status = StreamStatus.UNKNOWN_ERROR_OCCURRED
            self.finish_reason = "error"
            self.job.cancel()
            return
        except ConnectionError:
            self._client_gone()
            return
        self._opened = True

    async def _send(self, piece: Piece) -> None:
        try:
            await self.framing.send(piece)
        except ConnectionError:
            self._client_gone()
            return
        now = time.monotonic()
        if self.first_piece_at is None:
            self.first_piece_at = now
        else:
            self.piece_gaps.append(now - self._last_piece_at)
        self._last_piece_at = now
        if piece.choice == 0:
            self._pieces.append(piece.text)

    async def _close(self, finished: Finished) -> None:
        try:
            await self.framing.close(finished)
        except ConnectionError:
            self._client_gone()

    async def _settle(self, failure: BaseException | None) -> None:
        if self.error is not None:
            return  # failed to open when the job started (the status says so already)
        if isinstance(failure, ChatStreamError) and not self._opened:
            # Refused by the engine before it started (e.g. the prompt cannot fit): a
            # rejection like any other 4xx, so no callback and no change to the history.
            self.error = failure
            return
        if self.finish_reason == "cancelled" and not self._gone:
            # Cancelled by the server itself (shutting down), not by the client.
            failure = ServiceUnavailable("The server is shutting down.")
        if failure is not None:
            self.status = StreamStatus.UNKNOWN_ERROR_OCCURRED
            self.finish_reason = "error"
            if self.framing.headers_sent:
                # Mid-stream there is no status code left to change.
                await self.framing.abort(failure)
            elif isinstance(failure, ChatStreamError):
                self.error = failure
            else:
                self.error = GenerationFailed("The model failed to generate a reply.")
            return
        if self._gone or not self._opened:
            self.status = (StreamStatus.CLIENT_DISCONNECTED_WHILE_STREAMING
                           if self.framing.headers_sent and self._pieces
                           else StreamStatus.CLIENT_DISCONNECTED_BEFORE_STREAMING)
            return
        self.status = StreamStatus.SUCCESS

    @property
    def time_to_first_piece(self) -> float | None:
        return None if self.first_piece_at is None else self.first_piece_at - self.received

    def log_line(self, endpoint: str) -> None:
        ttft = self.time_to_first_piece
        seconds = self.usage.generation_seconds
        rate = self.usage.completion_tokens / seconds if seconds > 0 else float("nan")
        log.info(
            "%s status=%s finish=%s prompt_tokens=%d tokens=%d ttft_ms=%.1f "
            "tokens_per_s=%.1f total_ms=%.1f",
            endpoint, self.status or "rejected", self.finish_reason or "-",
            self.usage.prompt_tokens, self.usage.completion_tokens,
            ttft * 1000 if ttft is not None else float("nan"), rate,
            (time.monotonic() - self.received) * 1000,
        )
