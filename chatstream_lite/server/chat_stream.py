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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import aiohttp_session
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_session import AbstractStorage, get_session

from ..config import Config, SessionsConfig
from ..engine import Engine, SamplingParams
from ..engine.mock import MockEngine
from ..errors import ChatStreamError, SessionStoreUnavailable
from ..prompt import ChatPrompt
from ..sessions import MemoryResponseStore, MemorySessionStore, MemoryStorage, SessionStore
from .auth import ApiKey
from .chat_request import parse_chat_request, parse_off_loop, read_body, require_json
from .conversations import PROMPT_KEY, Conversations
from .exchange import Exchange
from .framing import PlainText
from .handler import Accepted, Callback, serve_exchange
from .health import CheckResult, Health
from .metrics import Metrics
from .reasoning import THINK_START, opens_thinking
from .responses import error_response
from .runtime import Runtime

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

CHAT_STREAM_KEY: web.AppKey[ChatStream] = web.AppKey("chatstream_lite.chat_stream")
ENDPOINT = "chat_stream"                      # this endpoint's name in metrics and logs

__all__ = ["CHAT_STREAM_KEY", "Callback", "ChatStream", "make_engine", "open_session_store"]


class ChatStream:
    """A streaming chat endpoint over one model. See the module docstring.

        ChatStream()                                   # the embedded model, the defaults
        ChatStream("models/m.gguf", n_ctx=8192, num_of_concurrent_executions=4)
        ChatStream(config=Config.of(n_ctx=8192), api_key="k")   # options win over config

    `options` are settings by name, any field of config.py's groups (n_ctx, max_new_tokens,
    temperature, api_key, session_idle_ttl, mock, ...); an unknown name is a TypeError.
    `session_store` also takes a Redis client or a ready `SessionStore`, `session_storage`
    any aiohttp-session storage (with locks in this process); `engine` any `Engine`.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        config: Config | None = None,
        engine: Engine | None = None,
        session_store: str | Redis | SessionStore | None = None,
        session_storage: AbstractStorage | None = None,
        load_in_background: bool = False,
        **options: Any,
    ) -> None:
        if model_path is not None:
            options["model"] = str(model_path)
        if isinstance(session_store, str):
            options["session_store"] = session_store
        config = Config.of(config, **options)
        self.config = config
        if engine is None:
            engine = make_engine(config)
        self.engine = engine
        self.runtime = Runtime(engine, config, load_in_background=load_in_background)
        self.session_store = open_session_store(
            config.sessions, None if isinstance(session_store, str) else session_store,
            session_storage)
        self.conversations = Conversations(
            self.session_store, system_prompt=config.generation.system_prompt,
            template=lambda: info.chat_template if (info := engine.model_info) else None)
        self.runtime.health.add_check("session_store", self._session_store_health,
                                      critical=False)
        self.runtime.metrics.add_session_store(self.session_store)

    # -- what the runtime holds, under the names ChatStream has always had ------------------
    @property
    def defaults(self) -> SamplingParams:
        return self.runtime.defaults

    @property
    def system_prompt(self) -> str | None:
        return self.config.generation.system_prompt

    @property
    def api_key(self) -> ApiKey:
        return self.runtime.api_key

    @api_key.setter
    def api_key(self, key: ApiKey) -> None:
        """A new key for every endpoint of this runtime, at once (a key rotated)."""
        self.runtime.api_key = key

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
            limits = self.config.limits
            body = request_body if request_body is not None else await read_body(
                request, limits.max_body_size, limits.body_timeout)
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
            # Where the template opened a thinking section, the reply is shown and kept
            # with the `<think>` the model did not write, as a page tells thinking apart.
            info = self.runtime.model_info
            opened = THINK_START if info is not None and opens_thinking(
                info.chat_template.generation_prompt()) else ""
            framing = PlainText(request, lambda response: conversations.save(
                request, response, session, history), prefix=opened)
            released = False

            async def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    await conversations.release(session_id)

            async def end_turn(exchange: Exchange) -> None:
                # Before the client sees the end of the reply: its next request, on any
                # replica, must find this turn stored and the session free (not a 409).
                settled = conversations.settle(history, turn, exchange, opened)
                request[PROMPT_KEY] = settled
                if framing.response is not None and framing.headers_sent:
                    await conversations.save_streamed(request, framing.response, session, settled)
                await release()

            return Accepted(job, framing, end_turn, release)

        return await serve_exchange(self.runtime, ENDPOINT, request, admit, error_response,
                                    callback)


def make_engine(config: Config) -> Engine:
    """The engine `config` asks for: the mock, or llama.cpp (`ModelNotFound` without a model)."""
    if config.mock.mock:
        return MockEngine(config.engine, config.mock)
    from ..engine.llama import LlamaEngine  # the one import of llama_cpp
    return LlamaEngine(config.engine)


def open_session_store(sessions: SessionsConfig, given: Redis | SessionStore | None = None,
                       storage: AbstractStorage | None = None) -> SessionStore:
    """The store `sessions` names ("memory", or a redis://, rediss:// or unix:// URL), unless
    `given` is a Redis client (shared by every replica) or a ready `SessionStore`, or
    `storage` is an aiohttp-session storage (kept with locks in this process)."""
    secure = sessions.cookie_secure or None
    if given is not None and storage is not None:
        raise ValueError("give session_store or session_storage, not both")
    if storage is not None and sessions.session_store != "memory":
        raise ValueError("give session_store or session_storage, not both")
    if given is None and sessions.session_store == "memory":
        return MemorySessionStore(storage if storage is not None else MemoryStorage(
            max_sessions=sessions.max_sessions, idle_ttl=sessions.session_idle_ttl,
            secure=secure), MemoryResponseStore(max_responses=sessions.max_sessions,
                                                ttl=sessions.response_ttl))
    if given is None or _is_redis_client(given):
        # Imported here, not above: a server on the memory store runs without redis.
        try:
            from ..sessions.redis import RedisSessionStore
        except ImportError as error:
            raise ValueError(f"session_store {sessions.session_store.split('://')[0]}:// needs "
                             f"the redis package ({error.name} is missing): pip install "
                             "'chatstream_lite[redis]'") from None
        return RedisSessionStore(sessions.session_store if given is None else given,
                                 idle_ttl=sessions.session_idle_ttl, secure=secure,
                                 max_pending_turns=sessions.max_pending_turns,
                                 response_ttl=sessions.response_ttl)
    return cast("SessionStore", given)     # neither a URL nor a Redis client


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
