"""The skeleton every streaming endpoint shares: admit, relay, call back, count — once.

    async def handle(request):
        return await serve_exchange(runtime, "chat_stream", request, admit, error_response,
                                    callback=callback)

`admit()` is the endpoint's own part: check the key, read and parse the body, load what it
needs, submit the job; it returns an `Accepted` or raises a `ChatStreamError` (a refusal: no
callback, counted as rejected, rendered by `render_error`). From then on the request is
accepted, and exactly one callback follows whatever happens, a cancelled handler included.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from ..engine import Job
from ..errors import ChatStreamError
from ..status import StreamStatus
from .exchange import EndTurn, Exchange
from .framing import Framing
from .runtime import Runtime

__all__ = ["Accepted", "Callback", "serve_exchange"]

log = logging.getLogger(__name__)

Callback = Callable[[web.Request, str], None | Awaitable[None]]


@dataclass
class Accepted:
    job: Job
    framing: Framing
    end_turn: EndTurn | None = None                         # see Exchange
    release: Callable[[], Awaitable[None]] | None = None    # always run at the end


async def serve_exchange(runtime: Runtime, endpoint: str, request: web.Request,
                         admit: Callable[[], Awaitable[Accepted]],
                         render_error: Callable[[ChatStreamError], web.Response],
                         callback: Callback | None = None) -> web.StreamResponse:
    received = time.monotonic()
    try:
        accepted = await admit()
    except ChatStreamError as error:
        runtime.request_rejected(endpoint, error)
        return render_error(error)
    exchange = Exchange(request, accepted.job, accepted.framing, runtime.disconnects,
                        received, accepted.end_turn)
    try:
        await exchange.run()
    finally:
        if accepted.release is not None:
            await accepted.release()
        if exchange.status is not None:
            await _call_back(callback, request, exchange.status)
        runtime.request_finished(endpoint, exchange)
    return accepted.framing.response_for(exchange)


async def _call_back(callback: Callback | None, request: web.Request, status: StreamStatus) -> None:
    if callback is None:
        return
    try:
        result = callback(request, status)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("completion callback raised")
