"""The few aiohttp internals the connection guard needs, in one place, checked at import.

    check()                                  # RuntimeError naming what moved, if anything did
    hook_request_factory(server, on_head)    # on_head(handler) once a request head is parsed
    handler = new_handler(server)            # the protocol of one new connection
    open_connections(server), is_open(handler), close(handler)
    site_parts(site)                         # (runner, ssl context, backlog) of a BaseSite

aiohttp bounds neither the time a connection takes to send its head nor the number of open
connections (connections.py), and offers no public hook for either: the guard wraps the
server's request factory (called once per parsed head), makes each connection's protocol
itself, and listens with a site of its own. Written against aiohttp 3.14 (setup.cfg pins
`>=3.14,<3.15`); `check()` runs when connections.py is imported and
tests/test_aiohttp_internals.py runs it too, so an aiohttp whose internals moved fails
loudly, at start-up and in the suite, rather than in the middle of serving.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

__all__ = ["TESTED", "RequestHandler", "check", "close", "hook_request_factory", "is_open",
           "new_handler", "open_connections", "site_parts"]

TESTED = "3.14"       # the aiohttp minor version this module was written and tested against

# The factory's parameters as aiohttp 3.14 calls it.
_FACTORY_PARAMETERS = ["message", "payload", "protocol", "writer", "task"]


def check() -> None:
    """RuntimeError naming every internal that is not where this module expects it."""
    missing: list[str] = []
    server_attrs = ("request_factory", "connections", "_make_request")
    for name in server_attrs:
        if not hasattr(web.Server, name) and name not in _init_assignments(web.Server):
            missing.append(f"web.Server.{name}")
    factory = getattr(web.Server, "_make_request", None)
    if factory is not None and \
            list(inspect.signature(factory).parameters)[1:] != _FACTORY_PARAMETERS:
        missing.append("the request factory's parameters "
                       f"({', '.join(_FACTORY_PARAMETERS)})")
    for name in ("force_close", "transport"):
        if not hasattr(RequestHandler, name):
            missing.append(f"web_protocol.RequestHandler.{name}")
    for name in ("_runner", "_ssl_context", "_backlog", "_server"):
        if name not in _init_assignments(web.BaseSite):
            missing.append(f"web.BaseSite.{name}")
    if missing:
        raise RuntimeError(
            f"aiohttp {aiohttp.__version__}: the connection guard needs internals that moved "
            f"({'; '.join(missing)}); chatstream_lite was tested with aiohttp {TESTED}")


def _init_assignments(cls: type) -> set[str]:
    """The attributes `cls.__init__` assigns on `self` (read from its source)."""
    try:
        source = inspect.getsource(vars(cls)["__init__"])
    except (OSError, TypeError, KeyError):
        return set()
    return {line.split("self.", 1)[1].split("=")[0].split(":")[0].strip()
            for line in source.splitlines() if "self." in line and "=" in line}


def hook_request_factory(server: web.Server, on_head: Callable[[RequestHandler], None]
                         ) -> None:
    """Call `on_head(handler)` each time aiohttp has parsed a request head (a bad one too).
    Before the server's first connection: a handler reads the factory when it is made."""
    make_request = server.request_factory

    def request_factory(message: RawRequestMessage, payload: StreamReader,
                        protocol: RequestHandler, writer: AbstractStreamWriter,
                        task: asyncio.Task[None]) -> web.BaseRequest:
        on_head(protocol)
        return make_request(message, payload, protocol, writer, task)

    server.request_factory = request_factory


def new_handler(server: web.Server) -> RequestHandler:
    return server()


def open_connections(server: web.Server) -> int:
    return len(server.connections)


def is_open(handler: RequestHandler) -> bool:
    """False once the client has left (or, within one loop iteration, before it connected)."""
    return handler.transport is not None


def close(handler: RequestHandler) -> None:
    handler.force_close()


def site_parts(site: web.BaseSite) -> tuple[web.BaseRunner, ssl.SSLContext | None, int]:
    """What `BaseSite.__init__` keeps of its arguments, for a site that listens itself."""
    return site._runner, site._ssl_context, site._backlog


def set_site_server(site: web.BaseSite, server: Any) -> None:
    """The listening server, where `BaseSite.stop()` closes it."""
    site._server = server
