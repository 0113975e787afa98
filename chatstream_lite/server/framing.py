"""Framings: how each endpoint puts a reply on the wire, behind one protocol.

    framing = PlainText(request, before_headers=save_cookie)      # /chat_stream
    framing = EventStream(request, completion) / JSONBody(...)    # /v1 (openai/framing.py)
    exchange = Exchange(request, job, framing, ...)               # drives any of them

`Exchange` calls `open` when the engine takes the job, `send` for each piece, `close` at the
end, or `abort` when the job fails after the headers went out; then `response_for` gives the
handler what to return. Methods raise `ConnectionError` when the client is gone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from ..engine import Finished, Piece, Started
from ..errors import ChatStreamError
from ..status import StreamStatus
from .responses import error_response

__all__ = ["Framing", "Outcome", "PlainText", "TokenCounts"]


class TokenCounts(Protocol):
    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...


class Outcome(Protocol):
    """What a framing reads of an ended exchange (server/exchange.py's `Exchange` is one)."""

    @property
    def status(self) -> StreamStatus | None: ...

    @property
    def error(self) -> ChatStreamError | None: ...

    @property
    def usage(self) -> TokenCounts: ...


class Framing(Protocol):
    """How one endpoint puts a reply on the wire (see the module docstring)."""

    @property
    def headers_sent(self) -> bool: ...

    async def open(self, started: Started) -> None: ...

    async def send(self, piece: Piece) -> None: ...

    async def close(self, finished: Finished) -> None: ...

    async def abort(self, error: BaseException) -> None:
        """The job failed after the headers went out: end so that the client can tell."""

    def response_for(self, outcome: Outcome) -> web.StreamResponse:
        """What the handler returns once the exchange has ended."""


class PlainText:
    """`/chat_stream`'s wire format: the reply as text/plain chunks, written as they come;
    the session cookie goes out with the headers."""

    def __init__(self, request: web.Request,
                 before_headers: Callable[[web.StreamResponse], Awaitable[None]],
                 prefix: str = "") -> None:
        """`prefix`: text the reply starts with that the model did not write (a thinking
        section's `<think>` its template wrote into the prompt)."""
        self.request = request
        self.before_headers = before_headers
        self.prefix = prefix
        self.response: web.StreamResponse | None = None

    @property
    def headers_sent(self) -> bool:
        return self.response is not None and self.response.prepared

    async def open(self, started: Started) -> None:
        response = web.StreamResponse(
            status=200, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.content_type = "text/plain"
        response.charset = "utf-8"
        response.enable_chunked_encoding()
        await self.before_headers(response)  # the session cookie must go out with the headers
        self.response = response
        await response.prepare(self.request)
        if self.prefix:
            await response.write(self.prefix.encode("utf-8"))

    async def send(self, piece: Piece) -> None:
        assert self.response is not None
        await self.response.write(piece.text.encode("utf-8"))

    async def close(self, finished: Finished) -> None:
        assert self.response is not None
        await self.response.write_eof()

    async def abort(self, error: BaseException) -> None:
        # Drop the connection: the client sees an incomplete body instead of a reply that
        # merely looks short.
        if self.request.transport is not None:
            self.request.transport.close()

    def response_for(self, exchange: Outcome) -> web.StreamResponse:
        if exchange.error is not None:
            return error_response(exchange.error)
        if self.response is not None and self.headers_sent:
            return self.response
        return web.Response(status=499)  # the client left before the headers: nobody reads this
