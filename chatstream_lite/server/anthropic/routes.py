"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

    AnthropicAPI(runtime).add_routes(app)        # create_app() does this, on ChatStream's runtime

    from anthropic import Anthropic
    client = Anthropic(base_url="http://127.0.0.1:8080", api_key="unused-or-your-key")
    client.messages.create(model="any", max_tokens=64,
                           messages=[{"role": "user", "content": "Hi"}])

Stateless, as chat completions: the history comes in `messages`. Everything a request goes
through is the runtime's and `serve_exchange`'s, as on every endpoint: the API key (as
`x-api-key` or `Authorization: Bearer`), the body limits, the one bounded queue, the
disconnect detection, the metrics (endpoint "messages"). Messages that do not fit the
context are refused (400), never cut: the client owns the history.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from ...engine.job import PlainPrompt
from ...engine.prepare import check_limits, prepare
from ...errors import ChatStreamError
from ..chat_request import parse_off_loop, read_body
from ..handler import Accepted, serve_exchange
from ..openai.routes import HasRuntime, OpenAIAPI
from ..runtime import Runtime
from .framing import MessageBody, MessageStream, anthropic_error_response
from .protocol import parse_count_tokens_request, parse_messages_request

__all__ = ["ENDPOINT", "AnthropicAPI"]

ENDPOINT = "messages"                 # this endpoint's name in metrics and logs


class AnthropicAPI:
    """The Messages API's routes over one runtime (see the module docstring)."""

    def __init__(self, runtime: Runtime | HasRuntime) -> None:
        self.runtime = runtime if isinstance(runtime, Runtime) else runtime.runtime
        self._openai = OpenAIAPI(self.runtime)      # the served model's name

    def add_routes(self, app: web.Application, prefix: str = "/v1") -> None:
        app.router.add_post(f"{prefix}/messages", self.handle_messages)
        app.router.add_post(f"{prefix}/messages/count_tokens", self.handle_count_tokens)

    async def _body(self, request: web.Request) -> bytes:
        self.runtime.api_key.check(request)
        limits = self.runtime.config.limits
        return await read_body(request, limits.max_body_size, limits.body_timeout)

    async def handle_messages(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/messages`: a reply to `messages`, streamed or whole."""
        runtime = self.runtime

        async def admit() -> Accepted:
            body = await self._body(request)
            # Off the loop whatever the size: tools build grammars.
            call = await parse_off_loop(
                parse_messages_request, body, runtime.defaults,
                runtime.config.generation.system_prompt, runtime.require_model(),
                runtime.config.limits.max_messages, always=True)
            served = self._openai.served_model()
            completion = call.completion
            job = runtime.submit(completion.messages, completion.params, drop_oldest=False)
            framing = MessageStream if completion.stream else MessageBody
            return Accepted(job, framing(request, served, call))

        return await serve_exchange(runtime, ENDPOINT, request, admit, anthropic_error_response)

    async def handle_count_tokens(self, request: web.Request) -> web.Response:
        """`POST /v1/messages/count_tokens`: `{"input_tokens": N}`, the prompt the same body
        would make on `/v1/messages` (tools included), tokenized in a worker thread; nothing
        reaches the model, so it takes no place in the queue."""
        runtime = self.runtime
        try:
            body = await self._body(request)
            info = runtime.require_model()
            completion = await parse_off_loop(
                parse_count_tokens_request, body, runtime.defaults,
                runtime.config.generation.system_prompt, info,
                runtime.config.limits.max_messages, always=True)
            messages = completion.messages
            assert not isinstance(messages, PlainPrompt)
            limits = runtime.config.limits
            check_limits(messages, max_messages=limits.max_messages,
                         max_chars=limits.max_input_chars)
            prompt = await asyncio.to_thread(
                prepare, messages, info.chat_template, info.tokenizer, budget=sys.maxsize,
                drop_oldest=False, cancelled=lambda: False, stops=completion.params.stop)
        except ChatStreamError as error:
            runtime.request_rejected(f"{ENDPOINT}_count_tokens", error)
            return anthropic_error_response(error)
        return web.json_response({"input_tokens": len(prompt.tokens)})
