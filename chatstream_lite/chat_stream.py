"""`ChatStream`: the aiohttp side. A request goes HTTP -> admission -> engine -> StreamResponse.

    chat_stream = ChatStream(model_path="models/my-model.gguf", n_gpu_layers=-1)
    app = web.Application()
    chat_stream.setup(app)                       # sessions + engine on the app's lifecycle

    async def stream_api(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_chat_stream_request(request)

    app.router.add_post("/chat_stream", stream_api)

Every accepted request (valid, session free, admitted to the queue) gets exactly one callback
with a `StreamStatus`; rejected ones (4xx, 429, 503) get none and change nothing. Both kinds
pass one place each, `request_finished` and `request_rejected`, which count them in `metrics`.

Two time limits, both off by default: `max_queue_wait` (seconds) refuses a request still
waiting for a slot with 503 `queue_timeout` and `Retry-After`, like a full queue (no callback,
it never reaches the model); `max_generation_time` (seconds, from the reply's first token)
ends a reply as `max_new_tokens` would (finish reason "length", callback `success`).

`ChatStream(mock=True)` swaps the model for `MockEngine` (canned text at a set pace) behind
the same queue, disconnect detection and callbacks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Hashable, Sequence, Union

import aiohttp_session
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_session import AbstractStorage, Session, get_session
from redis.asyncio import Redis

from .auth import DEFAULT_PROTECTED, ApiKey
from .chat_request import DEFAULT_MAX_BODY_SIZE, ChatRequest, parse_chat_request, read_body
from .engine import Engine, EngineConfig, Finished, Job, SamplingParams, Started
from .engine_protocol import EngineProtocol
from .errors import (
    BadRequest,
    ChatStreamError,
    ServiceUnavailable,
    SessionBusy,
    SessionStoreUnavailable,
    error_response,
)
from .disconnects import DisconnectWatcher
from .exchange import Exchange
from .health import CheckResult, Health
from .metrics import Metrics
from .mock_engine import DEFAULT_DELAY, MockEngine
from .model_file import resolve_model_path
from .prompt import ChatPrompt, Message
from .redis_sessions import RedisSessionStore
from .sessions import (
    DEFAULT_IDLE_TTL,
    DEFAULT_MAX_SESSIONS,
    MemorySessionStore,
    MemoryStorage,
    SessionStore,
    ensure_identity,
)
from .status import StreamStatus

log = logging.getLogger(__name__)

Callback = Callable[[web.Request, str], Union[None, Awaitable[None]]]

CHAT_STREAM_KEY = web.AppKey("chatstream_lite.chat_stream", "ChatStream")
_PROMPT_KEY = "chatstream_lite.chat_prompt"   # request key: the session's ChatPrompt
_HISTORY_FIELD = "chat"                       # session field holding ChatPrompt.to_dict()
ENDPOINT = "chat_stream"                      # this endpoint's name in metrics and logs
DEFAULT_SHUTDOWN_GRACE = 10.0
# After the grace period, how long cancelled requests may take to end (one token each).
_CANCEL_WAIT = 10.0


class ChatStream:
    """A streaming chat endpoint over one llama.cpp model. See the module docstring."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        n_batch: int = 512,
        num_of_concurrent_executions: int = 1,
        max_queue_size: int = 16,
        max_queue_wait: float | None = None,
        max_generation_time: float | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 40,
        repeat_penalty: float = 1.1,
        seed: int | None = None,
        system_prompt: str | None = None,
        stop: list[str] | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        session_store: str | Redis | SessionStore | None = None,
        session_storage: AbstractStorage | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        session_idle_ttl: int = DEFAULT_IDLE_TTL,
        cookie_secure: bool = False,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        api_key: str | None = None,
        api_key_paths: Sequence[str] = DEFAULT_PROTECTED,
        load_in_background: bool = False,
        mock: bool = False,
        mock_delay: float = DEFAULT_DELAY,
        mock_text: str | None = None,
        verbose: bool = False,
    ) -> None:
        if max_new_tokens < 1 or max_new_tokens >= n_ctx:
            raise ValueError("max_new_tokens must be at least 1 and less than n_ctx")
        self.engine: EngineProtocol
        if mock:
            self.engine = MockEngine(
                n_ctx=n_ctx, num_of_concurrent_executions=num_of_concurrent_executions,
                max_queue_size=max_queue_size, max_queue_wait=max_queue_wait,
                max_generation_time=max_generation_time, delay=mock_delay, text=mock_text)
        else:
            self.engine = Engine(
                EngineConfig(
                    model_path=resolve_model_path(model_path),
                    n_ctx=n_ctx,
                    n_gpu_layers=n_gpu_layers,
                    n_threads=n_threads,
                    n_batch=n_batch,
                    num_of_concurrent_executions=num_of_concurrent_executions,
                    max_queue_size=max_queue_size,
                    max_queue_wait=max_queue_wait,
                    max_generation_time=max_generation_time,
                    verbose=verbose,
                )
            )
        self.max_queue_size = max_queue_size
        self.defaults = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repeat_penalty=repeat_penalty,
            seed=seed,
            stop=tuple(stop or ()),
        )
        self.system_prompt = system_prompt
        self.max_body_size = max_body_size
        self.session_store = _open_session_store(
            session_store, session_storage, max_sessions=max_sessions,
            idle_ttl=session_idle_ttl, secure=cookie_secure or None)
        self.api_key = ApiKey(api_key, api_key_paths)
        self.metrics = Metrics(self.engine)
        self.health = Health()
        # One for every request of every endpoint of this ChatStream (all on one loop).
        self.disconnects = DisconnectWatcher()
        self.health.add_check("engine", self._engine_health)
        self.health.add_check("session_store", self._session_store_health)
        self.load_in_background = load_in_background
        self._loading: asyncio.Task[None] | None = None
        self.load_error: BaseException | None = None
        self.shutdown_grace = shutdown_grace
        self.draining = False
        self._in_flight: set[Job] = set()     # admitted requests not yet finished
        self._idle = asyncio.Event()
        self._idle.set()

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
        app.cleanup_ctx.append(self._engine_context)
        app.on_shutdown.append(lambda _app: self.drain())
        app[CHAT_STREAM_KEY] = self

    async def _session_store_context(self, app: web.Application) -> AsyncIterator[None]:
        if await self.session_store.healthy():
            log.info("sessions: %s", self.session_store)
        else:  # not fatal: requests that need a session get 503 until it is back
            log.warning("sessions: %s is unreachable", self.session_store)
        yield
        await self.session_store.close()

    async def _engine_context(self, app: web.Application) -> AsyncIterator[None]:
        self._loading = asyncio.create_task(self._start_engine())
        if not self.load_in_background:
            await self._loading
        yield
        if not self._loading.done():
            log.info("waiting for the model to finish loading before closing it")
        await asyncio.gather(self._loading, return_exceptions=True)
        await self.engine.close()

    async def _start_engine(self) -> None:
        try:
            info = await self.engine.start()
        except Exception as error:
            self.load_error = error
            if self.load_in_background:
                log.exception("the model failed to load; every request gets 503")
            raise
        log.info("model ready: %s (n_ctx=%d, GPU offload %s)", info.name, info.n_ctx,
                 "on" if info.gpu_offload else "off")

    async def wait_loaded(self) -> None:
        """Return once the model is loaded (raise what failed, if it did); call it after
        the app has started."""
        if self._loading is None:
            raise RuntimeError("the app has not started: setup(app), then start the app")
        await asyncio.shield(self._loading)

    # -- /health ----------------------------------------------------------------------------
    async def _engine_health(self) -> CheckResult:
        engine, info = self.engine, self.engine.model_info
        if self.draining:
            state = "draining"  # shutting down: a load balancer should stop sending here
        elif engine.ready:
            state = "ready"
        elif engine.failure is not None:
            state = f"thread died: {engine.failure!r}"  # for good: restart the server
        elif self.load_error is not None:
            state = f"failed: {self.load_error}"
        elif info is None:
            state = "loading"
        else:
            state = "stopped"
        return CheckResult(engine.ready and not self.draining, {
            "model": info.path.stem if info else None,
            "gpu_offload": info.gpu_offload if info else False,
            "running": engine.running,
            "queued": engine.queued,
            "max_queue_size": self.max_queue_size,
            "engine": state,
        })

    async def _session_store_health(self) -> CheckResult:
        # 503 while the store is away: requests that need a session would get 503 too.
        return CheckResult(await self.session_store.healthy(),
                           {"session_store": self.session_store.kind})

    # -- admission, and the one place each request's end is counted ------------------------
    def submit(self, messages: list[Message], params: SamplingParams, *,
               cache_key: Hashable | None = None) -> Job:
        """Admit a generation for any endpoint: the engine's exact bound (429), and 503 once
        the server is draining for shutdown. `cache_key` (the session id): the engine may
        reuse the KV cells of that session's previous turn."""
        if self.draining:
            raise ServiceUnavailable("The server is shutting down.")
        job = self.engine.submit(messages, params, cache_key=cache_key)
        self._in_flight.add(job)
        self._idle.clear()
        return job

    def request_rejected(self, endpoint: str, error: ChatStreamError) -> None:
        """A request refused before streaming (4xx, 429, 503): no callback, nothing changed."""
        self.metrics.request_rejected(endpoint, error)

    def request_finished(self, endpoint: str, exchange: Exchange) -> None:
        """An admitted request has ended (its callback, if any, already ran)."""
        exchange.log_line(endpoint)
        self.metrics.request_finished(endpoint, exchange)
        self._in_flight.discard(exchange.job)
        if not self._in_flight:
            self._idle.set()

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting (new requests get 503), give running streams `grace` seconds to
        finish, then cancel the rest; returns once every accepted request had its callback.

        The CLI calls this on SIGTERM/SIGINT while still listening; `setup()` also hooks it
        to `app.on_shutdown` so an embedding app that uses `web.run_app` drains too.
        """
        self.draining = True
        grace = self.shutdown_grace if grace is None else grace
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("shutdown: %d request(s) still running after %.1fs; cancelling them",
                        len(self._in_flight), grace)
            for job in list(self._in_flight):
                job.cancel()
            try:
                await asyncio.wait_for(self._idle.wait(), _CANCEL_WAIT)
            except asyncio.TimeoutError:
                log.error("shutdown: %d request(s) did not end after cancelling",
                          len(self._in_flight))

    # -- sessions ---------------------------------------------------------------------------
    def new_chat_prompt(self) -> ChatPrompt:
        info = self.engine.model_info
        return ChatPrompt(info.chat_template if info else None, system=self.system_prompt)

    def _load_prompt(self, session: Session) -> ChatPrompt:
        prompt = self.new_chat_prompt()
        stored = session.get(_HISTORY_FIELD)
        if stored:
            prompt = ChatPrompt.from_dict(stored, prompt.template)
            prompt.set_system(self.system_prompt)  # the server's setting wins over the stored one
        return prompt

    async def _save_prompt(
        self, request: web.Request, response: web.StreamResponse, session: Session, prompt: ChatPrompt
    ) -> None:
        session[_HISTORY_FIELD] = prompt.to_dict()
        await self.session_store.storage.save_session(request, response, session)

    def get_chat_prompt(self, request: web.Request) -> ChatPrompt:
        """The `ChatPrompt` of this request's session, e.g. inside the completion callback."""
        prompt = request.get(_PROMPT_KEY)
        if prompt is not None:
            return prompt
        session = request.get(aiohttp_session.SESSION_KEY)
        if session is None:
            raise LookupError("No session loaded for this request yet; call this from the "
                              "callback, or after `await aiohttp_session.get_session(request)`.")
        return self._load_prompt(session)

    # -- endpoints --------------------------------------------------------------------------
    async def handle_clear_context_request(self, request: web.Request) -> web.Response:
        """Forget this session's history (its system prompt stays)."""
        locks = self.session_store.locks
        try:
            self.api_key.check(request)
            session = await get_session(request)
            if session.new:
                return web.json_response({"status": "cleared"})
            session_id = ensure_identity(session)
            if not await locks.acquire(session_id):
                raise SessionBusy("A request of this session is still running.")
        except ChatStreamError as error:
            return error_response(error)
        try:
            prompt = self._load_prompt(session)
            prompt.clear_history()
            response = web.json_response({"status": "cleared"})
            await self._save_prompt(request, response, session, prompt)
            request[_PROMPT_KEY] = prompt
            return response
        except SessionStoreUnavailable as error:
            return error_response(error)
        finally:
            await locks.release(session_id)

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
        received = time.monotonic()
        locks = self.session_store.locks
        try:
            self.api_key.check(request)
            body = request_body if request_body is not None else await read_body(
                request, self.max_body_size)
            chat_request = parse_chat_request(body, self.defaults)
            session = await get_session(request)
            session_id = ensure_identity(session)
            if not await locks.acquire(session_id):
                raise SessionBusy("This session already has a request in flight.")
        except ChatStreamError as error:
            self.request_rejected(ENDPOINT, error)
            return error_response(error)
        try:
            history = self._load_prompt(session)
            turn = self._next_turn(history, chat_request)
            job = self.submit(turn.get_contents(), chat_request.params, cache_key=session_id)
        except ChatStreamError as error:
            await locks.release(session_id)
            self.request_rejected(ENDPOINT, error)
            return error_response(error)
        framing = _PlainText(request, lambda r: self._save_prompt(request, r, session, history))

        async def end_turn(exchange: Exchange) -> None:
            # Before the client sees the end of the reply: its next request, on any replica,
            # must find this turn stored and the session free (not a 409).
            nonlocal history
            history = self._settle_history(history, turn, exchange)
            if framing.response is not None and framing.headers_sent:
                await self._write_back(request, framing.response, session, history)
            # else nothing was streamed and the history is unchanged
            await locks.release(session_id)

        # Accepted: from here on, exactly one callback (none if refused late).
        try:
            exchange = Exchange(request, job, framing, self.disconnects, received, end_turn)
            await exchange.run()
        finally:
            await locks.release(session_id)  # already released unless something broke
        request[_PROMPT_KEY] = history
        if exchange.status is not None:
            await _call_back(callback, request, exchange.status)
        self.request_finished(ENDPOINT, exchange)
        return framing.response_for(exchange)

    async def _write_back(self, request: web.Request, response: web.StreamResponse,
                          session: Session, history: ChatPrompt) -> None:
        """Store the turn just streamed; with the store gone, the client still has its reply."""
        try:
            await self._save_prompt(request, response, session, history)
        except SessionStoreUnavailable:
            log.warning("the turn just streamed was not stored: the session store is unreachable")

    # -- history ----------------------------------------------------------------------------
    @staticmethod
    def _next_turn(history: ChatPrompt, chat_request: ChatRequest) -> ChatPrompt:
        """The conversation the model must answer: history + user message, or for a
        regenerate, the history without its last reply."""
        if chat_request.regenerate:
            if history.last_reply() is None:
                raise BadRequest("Nothing to regenerate: this session has no reply yet.")
            return history.without_last_reply()
        turn = history.copy()
        turn.add_requester_msg(chat_request.user_input)
        return turn

    @staticmethod
    def _settle_history(history: ChatPrompt, turn: ChatPrompt, exchange: Exchange) -> ChatPrompt:
        """What the session keeps: the finished turn (a partial reply after a stop counts),
        or the history unchanged when nothing reached the user or generation failed."""
        if exchange.status not in (StreamStatus.SUCCESS,
                                   StreamStatus.CLIENT_DISCONNECTED_WHILE_STREAMING):
            return history
        turn.add_responder_msg(exchange.reply)
        turn.drop_oldest_turns(exchange.dropped_messages)
        return turn


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
        return MemorySessionStore(session_storage or MemoryStorage(
            max_sessions=max_sessions, idle_ttl=idle_ttl, secure=secure))
    if isinstance(session_store, Redis):
        return RedisSessionStore(session_store, idle_ttl=idle_ttl, secure=secure)
    if isinstance(session_store, str):
        if not session_store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"session_store must be 'memory' or a redis://, rediss:// or "
                             f"unix:// URL, not {session_store!r}")
        return RedisSessionStore(session_store, idle_ttl=idle_ttl, secure=secure)
    return session_store


@web.middleware
async def _session_store_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A session store failure anywhere, the session middleware's own save included, is a
    JSON 503 like our other errors, not aiohttp's 500."""
    try:
        return await handler(request)
    except SessionStoreUnavailable as error:
        return error_response(error)


async def _call_back(callback: Callback | None, request: web.Request, status: StreamStatus) -> None:
    if callback is None:
        return
    try:
        result = callback(request, status)
        if inspect.isawaitable(result):
            await result
    except Exception:  # noqa: BLE001 - the user's callback must not break the server
        log.exception("completion callback raised")


class _PlainText:
    """`/chat_stream`'s wire format: the reply as text/plain chunks, written as they come;
    the session cookie goes out with the headers."""

    def __init__(self, request: web.Request,
                 before_headers: Callable[[web.StreamResponse], Awaitable[None]]) -> None:
        self.request = request
        self.before_headers = before_headers
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

    async def send(self, text: str) -> None:
        assert self.response is not None
        await self.response.write(text.encode("utf-8"))

    async def close(self, finished: Finished) -> None:
        assert self.response is not None
        await self.response.write_eof()

    async def abort(self, error: BaseException) -> None:
        # Drop the connection: the client sees an incomplete body instead of a reply that
        # merely looks short.
        if self.request.transport is not None:
            self.request.transport.close()

    def response_for(self, exchange: Exchange) -> web.StreamResponse:
        if exchange.error is not None:
            return error_response(exchange.error)
        if self.response is not None and self.headers_sent:
            return self.response
        return web.Response(status=499)  # the client left before the headers: nobody reads this
