"""The OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/completions`,
`POST /v1/embeddings` and `GET /v1/models`.

    OpenAIAPI(runtime).add_routes(app)          # create_app() does this, on ChatStream's runtime

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused-or-your-key")
    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}])

Stateless: the history comes in `messages`, nothing is stored. The bodies are protocol.py's
models; function calling (`tools`) is tools.py's; a last message from the assistant is
continued (prefill), and the reply holds only the continuation, as llama-server's does. It
shares the runtime's engine, queue bound, disconnect detection and metrics with
`/chat_stream`. With `"stream": true` the reply is Server-Sent Events framed as OpenAI frames
them (`aiohttp-sse`). Messages that do not fit the context are refused with 400
`context_length_exceeded`, as OpenAI does, instead of silently dropping the oldest turns:
the client owns the history, so it must decide what to cut.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from aiohttp import web

from ...engine import ModelInfo
from ...errors import ChatStreamError
from ...version import __version__
from ..chat_request import parse_off_loop, read_body
from ..handler import Accepted, serve_exchange
from ..responses import openai_error_response
from ..runtime import Runtime
from .embeddings import ENDPOINT as EMBEDDINGS_ENDPOINT
from .embeddings import handle_embeddings
from .framing import EventStream, JSONBody, ServedModel, ToolCallsBody, ToolCallsStream
from .protocol import CompletionRequest, parse_completion_request, parse_text_completion_request

__all__ = ["OpenAIAPI", "fingerprint"]

ENDPOINT = "chat_completions"     # this endpoint's name in metrics and logs
TEXT_ENDPOINT = "completions"     # /v1/completions


class HasRuntime(Protocol):
    """A face over a runtime, such as `ChatStream`."""

    @property
    def runtime(self) -> Runtime: ...


class OpenAIAPI:
    """The `/v1` routes over one runtime: its engine, queue, limits, metrics and API key.

        OpenAIAPI(runtime).add_routes(app)        # alone: no ChatStream, no sessions
        OpenAIAPI(chat_stream).add_routes(app)    # beside /chat_stream, on its runtime
    """

    def __init__(self, runtime: Runtime | HasRuntime) -> None:
        self.runtime = runtime if isinstance(runtime, Runtime) else runtime.runtime

    def add_routes(self, app: web.Application, prefix: str = "/v1") -> None:
        app.router.add_post(f"{prefix}/chat/completions", self.handle_chat_completions)
        app.router.add_post(f"{prefix}/completions", self.handle_completions)
        app.router.add_get(f"{prefix}/models", self.handle_models)
        app.router.add_post(f"{prefix}/embeddings", self.handle_embeddings)

    def served_model(self) -> ServedModel:
        """The model's id (the `--served-model-name` alias, else the file's stem) and the
        `system_fingerprint` of this server and model."""
        info = self.runtime.require_model()
        name = self.runtime.config.engine.served_model_name or info.path.stem
        return ServedModel(name, fingerprint(info))

    async def handle_models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the one loaded model, under its served name."""
        try:
            self.runtime.api_key.check(request)
            info = self.runtime.require_model()
            served = self.served_model()
        except ChatStreamError as error:
            return openai_error_response(error)
        return web.json_response({"object": "list", "data": [{
            "id": served.name, "object": "model", "created": int(info.path.stat().st_mtime)
            if info.path.is_file() else 0, "owned_by": "chatstream_lite",
        }]})

    async def handle_embeddings(self, request: web.Request) -> web.Response:
        """`POST /v1/embeddings` (embeddings.py): the model's name is the served one."""
        try:
            name = self.served_model().name
        except ChatStreamError as error:
            self.runtime.request_rejected(EMBEDDINGS_ENDPOINT, error)
            return openai_error_response(error)
        return await handle_embeddings(self.runtime, request, name)

    async def _body(self, request: web.Request) -> bytes:
        self.runtime.api_key.check(request)
        limits = self.runtime.config.limits
        return await read_body(request, limits.max_body_size, limits.body_timeout)

    async def handle_chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`: a reply to `messages`, streamed or whole."""
        runtime = self.runtime

        async def admit() -> Accepted:
            body = await self._body(request)
            # Off the loop whatever the size: `response_format` and `tools` build grammars.
            completion = await parse_off_loop(
                parse_completion_request, body, runtime.defaults,
                runtime.config.generation.system_prompt, runtime.require_model(),
                runtime.config.limits.max_messages, always=True)
            served = self.served_model()
            # The client owns the history: what does not fit is refused, never cut silently.
            job = runtime.submit(completion.messages, completion.params, drop_oldest=False)
            return Accepted(job, _chat_framing(completion)(request, served, completion))

        return await serve_exchange(runtime, ENDPOINT, request, admit, openai_error_response)

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/completions`: `prompt` continued as plain text, streamed or whole, with
        the same queue, limits and disconnect handling as the chat endpoint."""
        runtime = self.runtime

        async def admit() -> Accepted:
            body = await self._body(request)
            completion = await parse_off_loop(parse_text_completion_request, body,
                                              runtime.defaults, runtime.require_model())
            served = self.served_model()
            job = runtime.submit(completion.messages, completion.params, drop_oldest=False)
            framing_type = EventStream if completion.stream else JSONBody
            return Accepted(job, framing_type(request, served, completion))

        return await serve_exchange(runtime, TEXT_ENDPOINT, request, admit,
                                    openai_error_response)


def _chat_framing(completion: CompletionRequest) -> type[EventStream] | type[JSONBody]:
    if completion.tools is not None:
        return ToolCallsStream if completion.stream else ToolCallsBody
    return EventStream if completion.stream else JSONBody


def fingerprint(info: ModelInfo) -> str:
    """OpenAI's `system_fingerprint`: it changes when what decides the output may have
    changed (this package's version, the model file, the context size), so a client that
    compares seeded replies can tell a changed backend from chance."""
    size = info.path.stat().st_size if info.path.is_file() else 0
    key = f"{__version__}|{info.name}|{info.path.name}|{size}|{info.n_ctx}"
    return "fp_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
