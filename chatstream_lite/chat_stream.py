"""`ChatStream`: the aiohttp side. A request goes HTTP -> admission -> engine -> StreamResponse.

    chat_stream = ChatStream(model_path="models/my-model.gguf", n_gpu_layers=-1)
    app = web.Application()
    chat_stream.setup(app)                       # sessions + engine on the app's lifecycle

    async def stream_api(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_chat_stream_request(request)

    app.router.add_post("/chat_stream", stream_api)

Every accepted request (valid, session free, admitted to the queue) gets exactly one callback
with a `StreamStatus`; rejected ones (4xx, 429, 503) get none and change nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Union

import aiohttp_session
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_session import AbstractStorage, Session, get_session
from redis.asyncio import Redis

from .chat_request import DEFAULT_MAX_BODY_SIZE, ChatRequest, parse_chat_request, read_body
from .engine import Engine, EngineConfig, Failed, Finished, Job, Piece, SamplingParams, Started
from .errors import (
    BadRequest,
    ChatStreamError,
    GenerationFailed,
    ServiceUnavailable,
    SessionBusy,
    SessionStoreUnavailable,
    error_response,
)
from .model_file import resolve_model_path
from .prompt import ChatPrompt
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

# How often a waiting request looks at its connection. A closed socket is seen at the next
# poll (aiohttp does not cancel handlers); while streaming, a failed write sees it at once.
DISCONNECT_POLL_INTERVAL = 0.02
DEFAULT_SHUTDOWN_GRACE = 10.0


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
        verbose: bool = False,
    ) -> None:
        if max_new_tokens < 1 or max_new_tokens >= n_ctx:
            raise ValueError("max_new_tokens must be at least 1 and less than n_ctx")
        self.engine = Engine(
            EngineConfig(
                model_path=resolve_model_path(model_path),
                n_ctx=n_ctx,
                n_gpu_layers=n_gpu_layers,
                n_threads=n_threads,
                n_batch=n_batch,
                num_of_concurrent_executions=num_of_concurrent_executions,
                max_queue_size=max_queue_size,
                verbose=verbose,
            )
        )
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
        self.shutdown_grace = shutdown_grace
        self.draining = False
        self._in_flight: set[Job] = set()     # accepted requests whose callback is pending
        self._idle = asyncio.Event()
        self._idle.set()

    # -- wiring into an aiohttp application -------------------------------------------------
    def setup(self, app: web.Application) -> None:
        """Install the session middleware and run the engine on the app's lifecycle."""
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
        info = await self.engine.start()
        log.info("model ready: %s (n_ctx=%d, GPU offload %s)", info.name, info.n_ctx,
                 "on" if info.gpu_offload else "off")
        yield
        await self.engine.close()

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
            await self._idle.wait()

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
        if self.draining:
            return error_response(ServiceUnavailable("The server is shutting down."))
        locks = self.session_store.locks
        try:
            body = request_body if request_body is not None else await read_body(
                request, self.max_body_size)
            chat_request = parse_chat_request(body, self.defaults)
            session = await get_session(request)
            session_id = ensure_identity(session)
            if not await locks.acquire(session_id):
                raise SessionBusy("This session already has a request in flight.")
        except ChatStreamError as error:
            return error_response(error)
        try:
            history = self._load_prompt(session)
            turn = self._next_turn(history, chat_request)
            job = self.engine.submit(turn.get_contents(), chat_request.params)
        except ChatStreamError as error:
            await locks.release(session_id)
            return error_response(error)

        async def end_turn(response: web.StreamResponse, exchange: _Exchange) -> None:
            # Before the client sees the end of the reply: its next request, on any replica,
            # must find this turn stored and the session free (not a 409).
            nonlocal history
            history = self._settle_history(history, turn, exchange)
            if response.prepared:  # else nothing was streamed and the history is unchanged
                await self._write_back(request, response, session, history)
            await locks.release(session_id)

        # Accepted: from here on, exactly one callback.
        self._in_flight.add(job)
        self._idle.clear()
        try:
            exchange = _Exchange(request, job, received)
            response = await exchange.run(
                lambda r: self._save_prompt(request, r, session, history), end_turn)
            request[_PROMPT_KEY] = history
            exchange.log_line()
            if exchange.status is not None:
                await _call_back(callback, request, exchange.status)
            return response
        finally:
            await locks.release(session_id)  # already released by end_turn unless it broke
            self._in_flight.discard(job)
            if not self._in_flight:
                self._idle.set()

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
    def _settle_history(history: ChatPrompt, turn: ChatPrompt, exchange: _Exchange) -> ChatPrompt:
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


@dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0


class _Exchange:
    """One accepted request: relays the job's events to the client, watching the socket."""

    def __init__(self, request: web.Request, job: Job, received: float) -> None:
        self.request = request
        self.job = job
        self.received = received
        self.status: StreamStatus | None = None
        self.reply = ""                 # exactly the text the client was sent
        self.dropped_messages = 0
        self.first_piece_at: float | None = None
        self.finish_reason = ""
        self.usage = _Usage()
        self._pieces: list[str] = []
        self._gone = False
        self._turn_ended = False

    def _client_gone(self) -> None:
        self._gone = True
        self.job.cancel()

    async def _watch(self) -> None:
        while True:
            transport = self.request.transport
            if transport is None or transport.is_closing():
                self._client_gone()
                return
            await asyncio.sleep(DISCONNECT_POLL_INTERVAL)

    async def run(
        self,
        before_headers: Callable[[web.StreamResponse], Awaitable[None]],
        end_turn: Callable[[web.StreamResponse, _Exchange], Awaitable[None]],
    ) -> web.StreamResponse:
        """Relay the job. `before_headers(response)` runs before the headers go out;
        `end_turn(response, exchange)` runs once, when the outcome is known: for a complete
        reply, before the client sees its end."""
        watcher = asyncio.create_task(self._watch())
        response: web.StreamResponse | None = None
        failure: BaseException | None = None
        try:
            async for event in self.job.events():
                if isinstance(event, Piece):
                    if not self._gone and response is not None:
                        await self._write(response, event.text)
                elif isinstance(event, Started):
                    self.dropped_messages = event.dropped_messages
                    self.usage.prompt_tokens = event.prompt_tokens
                    if not self._gone:
                        response = await self._prepare(before_headers)
                elif isinstance(event, Finished):
                    self.finish_reason = event.reason
                    self.usage = _Usage(event.prompt_tokens, event.completion_tokens,
                                        event.generation_seconds)
                    if response is not None and not self._gone and event.reason != "cancelled":
                        self.status = StreamStatus.SUCCESS
                        self.reply = "".join(self._pieces)
                        await self._end_turn(end_turn, response)
                        await self._end(response)
                elif isinstance(event, Failed):
                    failure = event.error
        except ChatStreamError as error:  # ours, e.g. the session store failing before headers
            self.job.cancel()
            failure = error
        except Exception as error:  # noqa: BLE001 - a bug here must still end in one callback
            log.exception("streaming failed")
            self.job.cancel()
            failure = error
        finally:
            watcher.cancel()
        self.reply = "".join(self._pieces)
        outcome = self._outcome(response, failure)
        await self._end_turn(end_turn, outcome)
        return outcome

    async def _end_turn(
        self,
        end_turn: Callable[[web.StreamResponse, _Exchange], Awaitable[None]],
        response: web.StreamResponse,
    ) -> None:
        if not self._turn_ended:
            self._turn_ended = True
            await end_turn(response, self)

    def _outcome(self, response: web.StreamResponse | None, failure: BaseException | None
                 ) -> web.StreamResponse:
        if isinstance(failure, ChatStreamError) and response is None:
            # Refused by the engine before it started (e.g. the prompt cannot fit): a
            # rejection like any other 4xx, so no callback and no change to the history.
            return error_response(failure)
        if self.finish_reason == "cancelled" and not self._gone:
            # Cancelled by the server itself (shutting down), not by the client.
            failure = ServiceUnavailable("The server is shutting down.")
        if failure is not None:
            self.status = StreamStatus.UNKNOWN_ERROR_OCCURRED
            self.finish_reason = "error"
            if response is None:
                if isinstance(failure, ChatStreamError):
                    return error_response(failure)
                return error_response(GenerationFailed("The model failed to generate a reply."))
            # Mid-stream there is no status code left to change: drop the connection so the
            # client sees an incomplete body instead of a reply that merely looks short.
            if self.request.transport is not None:
                self.request.transport.close()
            return response
        if self._gone or response is None:
            self.status = (StreamStatus.CLIENT_DISCONNECTED_WHILE_STREAMING if self._pieces
                           else StreamStatus.CLIENT_DISCONNECTED_BEFORE_STREAMING)
            return response or web.Response(status=499)
        self.status = StreamStatus.SUCCESS
        return response

    async def _prepare(
        self, before_headers: Callable[[web.StreamResponse], Awaitable[None]]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        response.content_type = "text/plain"
        response.charset = "utf-8"
        response.enable_chunked_encoding()
        await before_headers(response)  # the session cookie must go out with the headers
        try:
            await response.prepare(self.request)
        except ConnectionError:
            self._client_gone()
        return response

    async def _write(self, response: web.StreamResponse, text: str) -> None:
        try:
            await response.write(text.encode("utf-8"))
        except ConnectionError:
            self._client_gone()
            return
        if self.first_piece_at is None:
            self.first_piece_at = time.monotonic()
        self._pieces.append(text)

    async def _end(self, response: web.StreamResponse) -> None:
        try:
            await response.write_eof()
        except ConnectionError:
            self._client_gone()

    def log_line(self) -> None:
        ttft = (self.first_piece_at - self.received) * 1000 if self.first_piece_at else float("nan")
        seconds = self.usage.generation_seconds
        rate = self.usage.completion_tokens / seconds if seconds > 0 else float("nan")
        log.info(
            "chat_stream status=%s finish=%s prompt_tokens=%d tokens=%d ttft_ms=%.1f "
            "tokens_per_s=%.1f total_ms=%.1f",
            self.status or "rejected", self.finish_reason or "-", self.usage.prompt_tokens,
            self.usage.completion_tokens, ttft, rate, (time.monotonic() - self.received) * 1000,
        )
