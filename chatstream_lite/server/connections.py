"""Connection limits: a deadline for each request head, an idle keep-alive limit, and a cap on
open connections below the open-file limit, so that idle sockets cannot starve the server.

aiohttp bounds none of these by default: idle and half-sent connections stayed open for good,
and under a 1,024 open-file limit, 1,100 of them made a normal request time out while asyncio
logged a traceback for every failed accept() (benchmarks/RESULTS.md, "Attacks on the server's
edge").

    guard = ConnectionGuard(ServerConfig(head_timeout=10, keepalive_timeout=15))
    runner = web.AppRunner(app, keepalive_timeout=guard.keepalive_timeout)
    await runner.setup()
    await guard.site(runner, "0.0.0.0", 8080).start()      # instead of web.TCPSite

- **Head timeout**: a new connection must deliver a complete request head within
  `head_timeout` seconds, or it is closed. aiohttp has no such limit; the guard starts a timer
  per connection and stops it in the server's request factory, which aiohttp calls once a
  whole head has been parsed.
- **Keep-alive**: between requests, aiohttp itself closes a connection that has not sent its
  next head within `keepalive_timeout` (the runner's argument: it reaches every connection).
  aiohttp 3.14 also starts that timer when a connection opens, so a first head gets at most
  the shorter of the two limits.
- **Cap**: at start the soft `RLIMIT_NOFILE` is raised to the hard limit, and connections are
  capped at that limit minus the accept backlog and `FD_RESERVE`. At the cap, a new connection
  makes room by closing the oldest one that has not yet sent a request head (what nginx does
  with idle connections); if every connection is busy with a request, the newcomer gets a 503
  and is closed.
- **Accept failures**: if accept() still runs out of files, asyncio reports each try (and
  retries up to `backlog` times per wake-up: 43,007 tracebacks in 15 s); the guard logs them
  as one warning per `LOG_INTERVAL` with a count.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..config import DEFAULTS, ServerConfig
from . import aiohttp_internals as internals
from .aiohttp_internals import RequestHandler

__all__ = ["DEFAULT_BACKLOG", "FD_RESERVE", "LOG_INTERVAL", "ConnectionGuard", "GuardedSite",
           "raise_open_file_limit"]

log = logging.getLogger(__name__)
internals.check()     # an aiohttp whose internals moved fails here, not while serving

DEFAULT_BACKLOG = 128
# Files the process keeps open besides connections: the model, the log, Redis, the event
# loop's own; a few dozen in practice.
FD_RESERVE = 64
LOG_INTERVAL = 10.0

# asyncio's message for an accept() that failed with EMFILE, ENFILE, ENOBUFS or ENOMEM.
_ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"
_REFUSAL_BODY = (b'{"error": "too_many_connections", '
                 b'"message": "The server has too many open connections; retry shortly."}')
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
            % (len(_REFUSAL_BODY), _REFUSAL_BODY))


def raise_open_file_limit() -> int | None:
    """Raise this process's soft `RLIMIT_NOFILE` to its hard limit; return the soft limit now
    in force (None: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, error)
    return None if soft == resource.RLIM_INFINITY else soft


class ConnectionGuard:
    """Time limits and a cap for the connections of one aiohttp server (see the module doc).

    `head_timeout`: seconds a new connection has to send a whole request head (None: no limit).
    `keepalive_timeout`: seconds an idle connection is kept between requests; give it to the
    runner (`web.AppRunner(app, keepalive_timeout=guard.keepalive_timeout)`).
    `max_connections`: None for the open-file limit less a margin, 0 for no cap, or a number
    (lowered to that margin if it is above it).
    """

    def __init__(self, server: ServerConfig = DEFAULTS.server, *,
                 backlog: int = DEFAULT_BACKLOG) -> None:
        # The keep-alive default (15 s) is longer than the head timeout's (10 s): a browser
        # sends its next request within seconds, and a reverse proxy keeps its upstream
        # connections for less (nginx: 60 s unless told otherwise).
        self.head_timeout = server.head_timeout
        self.keepalive_timeout = server.keepalive_timeout
        self.max_connections = server.max_connections
        self.backlog = backlog
        # Connections that have not yet sent a whole request head, oldest first, each with
        # its head-timeout timer (None without a head timeout).
        self._waiting: OrderedDict[RequestHandler, asyncio.TimerHandle | None] = OrderedDict()
        self._server: web.Server | None = None
        self.timed_out = 0          # closed for not sending a head in time
        self.evicted = 0            # closed at the cap to make room for a new connection
        self.refused = 0            # turned away at the cap (503)
        self._refusals = _Throttled("connection cap (%s) reached: refused new connections "
                                    "with 503")
        self._evictions = _Throttled("connection cap (%s) reached: closed connections that "
                                     "had not sent a request to make room")
        self._accept_failures = _Throttled("accept() ran out of files (cap %s): new connections "
                                           "wait in the backlog")

    def site(self, runner: web.BaseRunner, host: str | None, port: int, *,
             ssl_context: ssl.SSLContext | None = None, reuse_address: bool | None = None,
             reuse_port: bool | None = None) -> GuardedSite:
        """A `web.TCPSite` replacement whose connections are guarded by this guard."""
        return GuardedSite(runner, host, port, self, ssl_context=ssl_context,
                           reuse_address=reuse_address, reuse_port=reuse_port)

    # -- wiring: once per server, when its first site starts --------------------------------
    def attach(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        """Hook `server`'s request factory, set the cap, and return the protocol factory to
        listen with. Call it before the server accepts its first connection."""
        if self._server is not server:
            if self._server is not None:
                raise ValueError("a ConnectionGuard guards one server: make one per runner")
            self._server = server
            self._hook_request_factory(server)
            self._set_cap()
            self._log_accept_failures(asyncio.get_running_loop())
        return lambda: self._new_connection(server)

    def _set_cap(self) -> None:
        files = raise_open_file_limit()
        ceiling = None if files is None else max(1, files - self.backlog - FD_RESERVE)
        if self.max_connections is None:
            self.max_connections = ceiling or 0
        elif self.max_connections and ceiling is not None and self.max_connections > ceiling:
            log.warning("max connections %d lowered to %d: the open-file limit is %d",
                        self.max_connections, ceiling, files)
            self.max_connections = ceiling
        log.info("connections: at most %s open, request head within %s s, keep-alive %s s "
                 "(open-file limit %s)", self.max_connections or "unlimited",
                 self.head_timeout or "unlimited", self.keepalive_timeout, files or "unlimited")

    def _hook_request_factory(self, server: web.Server) -> None:
        internals.hook_request_factory(server, self._head_received)

    def _log_accept_failures(self, loop: asyncio.AbstractEventLoop) -> None:
        previous = loop.get_exception_handler()

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if context.get("message") == _ACCEPT_OUT_OF_RESOURCES:
                self._accept_failures(self.max_connections or "none")
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handle)

    # -- per connection ---------------------------------------------------------------------
    def _new_connection(self, server: web.Server) -> asyncio.BaseProtocol:
        if self.max_connections and internals.open_connections(server) >= self.max_connections:
            if not self._close_oldest_waiting():
                self.refused += 1
                self._refusals(self.max_connections)
                return _Refuse()
            self.evicted += 1
            self._evictions(self.max_connections)
        handler = internals.new_handler(server)
        timer = None
        if self.head_timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                self.head_timeout, self._head_timed_out, handler)
        self._waiting[handler] = timer
        return handler

    def _head_received(self, handler: RequestHandler) -> None:
        if handler in self._waiting:
            timer = self._waiting.pop(handler)
            if timer is not None:
                timer.cancel()

    def _head_timed_out(self, handler: RequestHandler) -> None:
        waited = self._waiting.pop(handler, False) is not False
        if waited and internals.is_open(handler):
            self.timed_out += 1
            internals.close(handler)

    def _close_oldest_waiting(self) -> bool:
        """Close the longest-waiting connection that has not sent a request head; False if
        there is none (the ones whose client already left do not count)."""
        while self._waiting:
            handler, timer = self._waiting.popitem(last=False)
            if timer is not None:
                timer.cancel()
            # None: the client has left already (or, within this very loop iteration, the
            # connection is not made yet; aiohttp's keep-alive timer still bounds it).
            if internals.is_open(handler):
                internals.close(handler)
                return True
        return False


class GuardedSite(web.BaseSite):
    """`web.TCPSite` with a `ConnectionGuard` on every connection it accepts."""

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int,
                 guard: ConnectionGuard, *, ssl_context: ssl.SSLContext | None = None,
                 reuse_address: bool | None = None, reuse_port: bool | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=guard.backlog)
        self.host = host
        self.port = port
        self.guard = guard
        self.reuse_address = reuse_address
        self.reuse_port = reuse_port

    @property
    def name(self) -> str:
        scheme = "https" if internals.site_parts(self)[1] else "http"
        return f"{scheme}://{self.host or '0.0.0.0'}:{self.port}"

    async def start(self) -> None:
        await super().start()
        runner, ssl_context, backlog = internals.site_parts(self)
        server = runner.server
        assert server is not None, "runner.setup() first"
        listening = await asyncio.get_running_loop().create_server(
            self.guard.attach(server), self.host, self.port, ssl=ssl_context,
            backlog=backlog, reuse_address=self.reuse_address, reuse_port=self.reuse_port)
        internals.set_site_server(self, listening)
        if listening.sockets and self.port == 0:
            self.port = listening.sockets[0].getsockname()[1]


class _Refuse(asyncio.Protocol):
    """A connection over the cap: a 503 and close, without reading the request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSAL)
        transport.close()


class _Throttled:
    """A warning logged at most once per `LOG_INTERVAL`, with how often it happened since."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.count = 0
        self._last = -LOG_INTERVAL

    def __call__(self, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= LOG_INTERVAL:
            log.warning(self.message + " (%d time(s) since the last report)", *args, self.count)
            self.count = 0
            self._last = now
