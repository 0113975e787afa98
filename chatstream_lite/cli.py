"""`python -m chatstream_lite`: the chat server from the command line.

Every option is a field of `settings.Settings` (its default, range and help text live
there); this module turns the fields into flags, reads the `CHATSTREAM_*` variables (a flag
wins over its variable) and serves. The server listens at once and loads the model in the
background (`/health` answers 503 until it is ready); if loading fails, it exits with 1. A
bad flag, variable or model path exits with 2 before anything listens.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiohttp import web

from . import crash_report
from .cpu import Cpu
from .model_file import ModelNotFound
from .server.app import create_app
from .server.chat_stream import ChatStream
from .server.connections import ConnectionGuard
from .server.cors import setup_cors
from .settings import ENV_HELP, ENV_PREFIX, add_arguments, load_config

__all__ = ["HEADER_LIMITS", "build_parser", "crash_advice", "event_loop_runner", "main", "Runner",
           "serve"]

log = logging.getLogger("chatstream_lite")

# Request-head limits, chosen rather than inherited: a chat client sends a short request
# line, a cookie and a few headers. Past them aiohttp answers 400 before any handler runs.
HEADER_LIMITS: dict[str, Any] = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 64}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatstream_lite",
        description="A streaming chat server (ChatStream's web API) on aiohttp and llama.cpp. "
        "POST /chat_stream with {\"user_input\": \"...\"} streams the reply as text/plain; "
        "POST /clear_context forgets the session's history; POST /v1/chat/completions and "
        "GET /v1/models speak OpenAI's API; GET / is a chat UI in the browser; GET /health "
        "and GET /metrics (Prometheus) are for operators.",
        epilog=ENV_HELP,
    )
    add_arguments(parser)
    return parser


Runner = Callable[[Coroutine[Any, Any, None]], None]


def event_loop_runner(name: str) -> Runner:
    """`asyncio.run`, or uvloop's equivalent; ValueError when uvloop is asked for but missing.

    uvloop is an extra, not a dependency: the standard loop serves as well here unless the
    figures say otherwise (benchmarks/RESULTS.md, issue 14).
    """
    if name != "uvloop":
        return asyncio.run
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        raise ValueError("--loop uvloop: uvloop is not installed (pip install "
                         "'chatstream_lite[uvloop]', or pip install uvloop); without it, "
                         "use --loop asyncio") from None
    run: Runner = uvloop.run
    return run


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(argv, os.environ, build_parser())
        run = event_loop_runner(config.server.loop)
    except ValueError as error:       # a bad variable, two values that do not fit, no uvloop
        print(f"error: {error}", file=sys.stderr)
        return 2
    server = config.server
    logging.getLogger().setLevel(server.log_level)
    crash_report.install(crash_advice())
    try:
        # Listen at once; /health says 503 until the model is loaded.
        chat_stream = ChatStream(config=config, load_in_background=True)
    except (ModelNotFound, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if config.access.api_key is None and not _is_loopback(server.host):
        log.warning("listening on %s without an API key: anyone who can reach this address "
                    "can use the model (set --api-key / %sAPI_KEY)", server.host, ENV_PREFIX)
    app = create_app(chat_stream)
    setup_cors(app, server.cors_origin)
    if server.loop != "asyncio":
        log.info("event loop: %s", server.loop)
    try:
        run(serve(app, chat_stream, server.host, server.port, ConnectionGuard(server)))
    except OSError as error:           # the port is taken, the address is not ours, ...
        log.error("cannot listen on %s:%d: %s", server.host, server.port,
                  error.strerror or error)
        return 1
    return 1 if chat_stream.load_error is not None else 0


def crash_advice() -> str:
    """What the line after a fatal signal's stack says (crash_report.py)."""
    cpu = Cpu.detect().describe()
    return ("If the stack above is in llama.cpp (llama_decode, Model.load), its CPU kernels "
            f"faulted on this CPU ({cpu}): start with --extra-buffers off, or with "
            "--kernel-check on to try the configuration in a child process first; README "
            "'CPUs with AMX'.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


async def serve(app: web.Application, chat_stream: ChatStream, host: str, port: int,
                guard: ConnectionGuard | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or a failed model load), then shut down gracefully.

    Unlike `web.run_app`, which stops listening first, we keep the socket open while
    running streams finish, so that a new request gets a clear 503 instead of a refused
    connection; then the model is closed on its own thread (the engine's cleanup).
    """
    guard = guard or ConnectionGuard()
    runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=guard.keepalive_timeout,
                           shutdown_timeout=chat_stream.shutdown_grace + 5, **HEADER_LIMITS)
    await runner.setup()
    try:
        await guard.site(runner, host, port).start()
        log.info("serving on http://%s:%d", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        watcher = asyncio.create_task(_stop_if_loading_fails(chat_stream, stop))
        await stop.wait()
        watcher.cancel()
        if chat_stream.load_error is None:
            log.info("shutting down: new requests get 503; running streams have %.1fs to "
                     "finish", chat_stream.shutdown_grace)
            await chat_stream.drain()
    finally:
        await runner.cleanup()
    log.info("stopped")


async def _stop_if_loading_fails(chat_stream: ChatStream, stop: asyncio.Event) -> None:
    try:
        await chat_stream.wait_loaded()
    except Exception:  # noqa: BLE001 - logged by ChatStream; a server without a model must stop
        stop.set()
