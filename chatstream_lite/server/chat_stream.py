"""`ChatStream`: ChatStream's web API on aiohttp. A request goes HTTP -> admission -> engine ->
StreamResponse.

    chat_stream = ChatStream(model_path="models/my-model.gguf", n_gpu_layers=-1)
    app = web.Application()
    chat_stream.setup(app)                       # sessions + engine on the app's lifecycle

    async def stream_api(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_chat_stream_request(request)

    app.router.add_post("/chat_stream", stream_api)

Every accepted request (valid, session free, admitted to the queue) gets exactly one callback
with a `StreamStatus`; rejected ones (4xx, 429, 503) get none and change nothing.

`ChatStream` keeps the original's face and delegates: `runtime` (engine lifecycle, admission,
drain, health, metrics: what `OpenAIAPI` shares), `conversations` (load, lock, save and
settle each session's history), the framings (framing.py) and one handler skeleton
(handler.py) that both endpoints use. `ChatStream(engine=...)` takes any `Engine`;
`mock=True` is a shortcut for `MockEngine` (canned text at a set pace).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard, cast

import aiohttp_session
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_session import AbstractStorage, get_session

from ..auth import DEFAULT_PROTECTED, ApiKey
from ..chat_request import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    parse_chat_request,
    parse_off_loop,
    read_body,
    require_json,
)
from ..engine import Admission, Engine, SamplingParams
from ..engine.admission import (
    DEFAULT_MAX_INPUT_CHARS,
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_QUEUE_SIZE,
)
from ..engine.mock import DEFAULT_DELAY, MockEngine
from ..errors import ChatStreamError, SessionStoreUnavailable
from ..model_file import resolve_model_path
from ..prompt import ChatPrompt
from ..sessions import (
    DEFAULT_IDLE_TTL,
    DEFAULT_MAX_SESSIONS,
    MemorySessionStore,
    MemoryStorage,
    SessionStore,
)
from ..settings import DEFAULTS
from .conversations import PROMPT_KEY, Conversations
from .exchange import Exchange
from .framing import PlainText
from .handler import Accepted, Callback, serve_exchange
from .health import CheckResult, Health
from .metrics import Metrics
from .responses import error_response
from .runtime import DEFAULT_SHUTDOWN_GRACE, Runtime

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

CHAT_STREAM_KEY: web.AppKey[ChatStream] = web.AppKey("chatstream_lite.chat_stream")
ENDPOINT = "chat_stream"                      # this endpoint's name in metrics and logs

__all__ = ["CHAT_STREAM_KEY", "Callback", "ChatStream", "DEFAULT_SHUTDOWN_GRACE"]


class ChatStream:
    """A streaming chat endpoint over one model. See the module docstring."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = DEFAULTS.n_ctx,
        n_gpu_layers: int = DEFAULTS.n_gpu_layers,
        n_threads: int | None = DEFAULTS.n_threads,
        n_batch: int = DEFAULTS.n_batch,
        num_of_concurrent_executions: int = 1,
        flash_attn: str = DEFAULTS.flash_attn,
        deterministic: bool = DEFAULTS.deterministic,
        extra_buffers: str = DEFAULTS.extra_buffers,
        kernel_check: str = DEFAULTS.kernel_check,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_queue_wait: float | None = None,
        max_generation_time: float | None = None,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_input_chars: int = DEFAULT_MAX_INPUT_CHARS,
        temperature: float = DEFAULTS.temperature,
        top_p: float = DEFAULTS.top_p,
        top_k: int = DEFAULTS.top_k,
        repeat_penalty: float = DEFAULTS.repeat_penalty,
        seed: int | None = DEFAULTS.seed,
        system_prompt: str | None = DEFAULTS.system_prompt,
        served_model_name: str | None = DEFAULTS.served_model_name,
        stop: list[str] | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
        session_store: str | Redis | SessionStore | None = None,
        session_storage: AbstractStorage | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        session_idle_ttl: int = DEFAULT_IDLE_TTL,
        cookie_secure: bool = DEFAULTS.cookie_secure,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        stall_timeout: float = DEFAULTS.stall_timeout,
        api_key: str | None = None,
        api_key_paths: Sequence[str] = DEFAULT_PROTECTED,
        load_in_background: bool = False,
        engine: Engine | None = None,
        mock: bool = DEFAULTS.mock,
        mock_delay: float = DEFAULT_DELAY,
        mock_text: str | None = None,
        verbose: bool = False,
    ) -> None:
        if max_new_tokens < 1 or max_new_tokens >= n_ctx:
            raise ValueError("max_new_tokens must be at least 1 and less than n_ctx")
        if engine is None:
            engine = _make_engine(
                mock, model_path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
                n_batch=n_batch, parallel=num_of_concurrent_executions,
                max_generation_time=max_generation_time, flash_attn=flash_attn,
                deterministic=deterministic, extra_buffers=extra_buffers,
                kernel_check=kernel_check, verbose=verbose,
                mock_delay=mock_delay, mock_text=mock_text)
        self.engine = engine
        self.runtime = Runtime(
            engine, Admission(engine, max_queue_size=max_queue_size,
                              max_queue_wait=max_queue_wait, max_messages=max_messages,
                              max_input_chars=max_input_chars),
            shutdown_grace=shutdown_grace, stall_timeout=stall_timeout,
            load_in_background=load_in_background)
        self.defaults = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repeat_penalty=repeat_penalty, seed=seed, stop=tuple(stop or ()))
        self.system_prompt = system_prompt
        self.served_model_name = served_model_name    # the model's id in the OpenAI API
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout      # seconds for a body to arrive (408 past it)
        self.session_store = _open_session_store(
            session_store, session_storage, max_sessions=max_sessions,
            idle_ttl=session_idle_ttl, secure=cookie_secure or None)
        self.conversations = Conversations(
            self.session_store, system_prompt=system_prompt,
            template=lambda: info.chat_template if (info := engine.model_info) else None)
        self.api_key = ApiKey(api_key, api_key_paths)
        self.runtime.health.add_check("session_store", self._session_store_health,
                                      critical=False)
        self.runtime.metrics.add_session_store(self.session_store)

    # -- what the runtime holds, under the names ChatStream has always had ------------------
    @property
    def metrics(self) -> Metrics:
        return self.runtime.metrics

    @property
    def health(self) -> Health:
        return self.runtime.health

    @property
    def load_error(self) -> BaseException | None:
        return self.runtime.load_error

    @property
    def draining(self) -> bool:
        return self.runtime.draining

    @property
    def shutdown_grace(self) -> float:
        return self.runtime.shutdown_grace

    async def wait_loaded(self) -> None:
        """Return once the model is loaded (raise what failed, if it did)."""
        await self.runtime.wait_loaded()

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting (503), give running streams `grace` seconds, cancel the rest;
        returns once every accepted request had its callback. The CLI calls it on
        SIGTERM/SIGINT; `setup()` hooks it to `app.on_shutdown` too."""
        await self.runtime.drain(grace)

    # -- wiring into an aiohttp application -------------------------------------------------
    def setup(self, app: web.Application) -> None:
        """Install the session middleware and run the engine on the app's lifecycle.

        The model loads during the app's startup, so the server listens once it is ready;
        with `load_in_background=True` it listens at once and answers 503 (`/health`
        included) until the model is loaded.
        """
        app.middlewares.append(_session_store_errors)  # outside the session middleware's save
        aiohttp_session.setup(app, self.session_store.storage)
        app.cleanup_ctx.append(self._session_store_context)
        self.runtime.setup(app)
        app[CHAT_STREAM_KEY] = self

    async def _session_store_context(self, app: web.Application) -> AsyncIterator[None]:
        if await self.session_store.healthy():
            log.info("sessions: %s", self.session_store)
        else:  # not fatal: requests that need a session get 503 until it is back
            log.warning("sessions: %s is unreachable", self.session_store)
        yield
        await self.session_store.close()

    async def _session_store_health(self) -> CheckResult:
        # Not critical (/health stays 200, "degraded"): without its store a replica still
        # serves the stateless API, and every replica shares the one store, so failing
        # /health would take them all out of rotation at once. /ready fails instead.
        return CheckResult(await self.session_store.healthy(),
                           {"session_store": self.session_store.kind})

    # -- sessions ---------------------------------------------------------------------------
    def new_chat_prompt(self) -> ChatPrompt:
        return self.conversations.new()

    def get_chat_prompt(self, request: web.Request) -> ChatPrompt:
        """The `ChatPrompt` of this request's session, e.g. inside the completion callback."""
        return self.conversations.get_chat_prompt(request)

    # -- endpoints --------------------------------------------------------------------------
    async def handle_history_request(self, request: web.Request) -> web.Response:
        """This session's turns, oldest first: `{"messages": [{"role", "content"}, ...]}`.

        The system prompt is the server's setting, not a turn, so it is left out. A request
        without a session cookie gets `[]` and no session is made (a page that only looks
        does not use up the new-session allowance). A pure read: it neither takes nor waits
        for the session's lock, because a GET must never make the session's own next
        request get 409; mid-reply it answers at once with the turns stored so far, and the
        reply in flight joins them when it ends (a stopped one with its partial text).
        """
        try:
            self.api_key.check(request)
            if self.session_store.storage.load_cookie(request) is None:
                messages = []
            else:
                session = await get_session(request)
                messages = [m for m in self.conversations.load(session).get_contents()
                            if m["role"] != "system"]
        except ChatStreamError as error:   # 401, 429 (too many new sessions), 503 (store)
            return error_response(error)
        return web.json_response({"messages": messages}, headers={"Cache-Control": "no-store"})

    async def handle_clear_context_request(self, request: web.Request) -> web.Response:
        """Forget this session's history (its system prompt stays)."""
        conversations = self.conversations
        try:
            self.api_key.check(request)   # a missing key says 401 before a wrong type
            require_json(request)         # no body to read, but a state change
            session = await get_session(request)
            if session.new:
                return web.json_response({"status": "cleared"})
            session, session_id = await conversations.lock(request)
        except ChatStreamError as error:
            return error_response(error)
        try:
            prompt = conversations.load(session)
            prompt.clear_history()
            response = web.json_response({"status": "cleared"})
            await conversations.save(request, response, session, prompt)
            request[PROMPT_KEY] = prompt
            return response
        except SessionStoreUnavailable as error:
            return error_response(error)
        finally:
            await conversations.release(session_id)

    async def handle_chat_stream_request(
        self,
        request: web.Request,
        request_body: bytes | None = None,
        callback: Callback | None = None,
    ) -> web.StreamResponse:
        """Stream the reply to `{"user_input": ..., "regenerate": false}` as text/plain.

        `request_body`: the raw body when the caller already read it (message interception).
        `callback(request, message)`: called once when the stream ends; sync or async.
        """
        conversations = self.conversations

        async def admit() -> Accepted:
            self.api_key.check(request)
            body = request_body if request_body is not None else await read_body(
                request, self.max_body_size, self.body_timeout)
            chat_request = await parse_off_loop(parse_chat_request, body, self.defaults)
            session, session_id = await conversations.lock(request)
            try:
                history = conversations.load(session)
                turn = conversations.next_turn(history, chat_request.user_input,
                                               chat_request.regenerate)
                job = self.runtime.submit(turn.get_contents(), chat_request.params,
                                          cache_key=session_id)
            except BaseException:
                await conversations.release(session_id)
                raise
            framing = PlainText(request, lambda response: conversations.save(
                request, response, session, history))
            released = False

            async def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    await conversations.release(session_id)

            async def end_turn(exchange: Exchange) -> None:
                # Before the client sees the end of the reply: its next request, on any
                # replica, must find this turn stored and the session free (not a 409).
                settled = conversations.settle(history, turn, exchange)
                request[PROMPT_KEY] = settled
                if framing.response is not None and framing.headers_sent:
                    await conversations.save_streamed(request, framing.response, session, settled)
                await release()

            return Accepted(job, framing, end_turn, release)

        return await serve_exchange(self.runtime, ENDPOINT, request, admit, error_response,
                                    callback)


def _make_engine(mock: bool, model_path: str | Path | None, *, n_ctx: int, n_gpu_layers: int,
                 n_threads: int | None, n_batch: int, parallel: int,
                 max_generation_time: float | None, flash_attn: str, deterministic: bool,
                 extra_buffers: str, kernel_check: str, verbose: bool, mock_delay: float,
                 mock_text: str | None) -> Engine:
    if mock:
        return MockEngine(n_ctx=n_ctx, parallel=parallel, max_generation_time=max_generation_time,
                          delay=mock_delay, text=mock_text)
    from ..engine.llama import LlamaConfig, LlamaEngine  # the one import of llama_cpp
    return LlamaEngine(LlamaConfig(
        model_path=resolve_model_path(model_path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
        n_threads=n_threads, n_batch=n_batch, parallel=parallel,
        max_generation_time=max_generation_time, flash_attn=flash_attn,
        deterministic=deterministic, extra_buffers=extra_buffers, kernel_check=kernel_check,
        verbose=verbose))


def _open_session_store(
    session_store: str | Redis | SessionStore | None,
    session_storage: AbstractStorage | None,
    *,
    max_sessions: int,
    idle_ttl: int,
    secure: bool | None,
) -> SessionStore:
    """`session_store`: None or "memory" (this process), a redis:// URL or a Redis client
    (shared by every replica), or a ready `SessionStore`. `session_storage`: any
    aiohttp-session storage, with locks in this process."""
    if session_store is not None and session_storage is not None:
        raise ValueError("give session_store or session_storage, not both")
    if session_store is None or session_store == "memory":
        return MemorySessionStore(session_storage if session_storage is not None else MemoryStorage(
            max_sessions=max_sessions, idle_ttl=idle_ttl, secure=secure))
    if isinstance(session_store, str) and not session_store.startswith(
            ("redis://", "rediss://", "unix://")):
        raise ValueError(f"session_store must be 'memory' or a redis://, rediss:// or "
                         f"unix:// URL, not {session_store!r}")
    if isinstance(session_store, str) or _is_redis_client(session_store):
        # Imported here, not above: a server on the memory store runs without redis.
        from ..sessions.redis import RedisSessionStore
        return RedisSessionStore(session_store, idle_ttl=idle_ttl, secure=secure)
    return cast("SessionStore", session_store)     # neither a URL nor a Redis client


def _is_redis_client(value: object) -> TypeGuard[Redis]:
    """Whether `value` is a `redis.asyncio.Redis`, without importing redis: whoever made
    a client has imported it already."""
    client = sys.modules.get("redis.asyncio")
    return client is not None and isinstance(value, client.Redis)


@web.middleware
async def _session_store_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A session store failure anywhere, the session middleware's own save included, is a
    JSON 503 like our other errors, not aiohttp's 500."""
    try:
        return await handler(request)
    except SessionStoreUnavailable as error:
        return error_response(error)
