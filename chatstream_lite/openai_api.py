"""The OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`.

    OpenAIAPI(chat_stream).add_routes(app)          # create_app() does this

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused-or-your-key")
    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}])

Stateless: the history comes in `messages`, nothing is stored. It shares ChatStream's engine,
queue bound, disconnect detection and metrics with `/chat_stream`. With `"stream": true` the
reply is Server-Sent Events framed as OpenAI frames them (`aiohttp-sse`). Messages that do not
fit the context are refused with 400 `context_length_exceeded`, as OpenAI does, instead of
silently dropping the oldest turns: the client owns the history, so it must decide what to cut.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .chat_request import integer_field, parse_json_object, read_body, sampling_params
from .engine import Finished, FinishReason, SamplingParams, Started
from .errors import (
    BadRequest,
    ChatStreamError,
    ContextLengthExceeded,
    GenerationFailed,
    PromptTooLong,
    ServiceUnavailable,
    openai_error_response,
)
from .exchange import Exchange
from .prompt import Message

if TYPE_CHECKING:
    from .chat_stream import ChatStream

ENDPOINT = "chat_completions"     # this endpoint's name in metrics and logs
MAX_STOP_STRINGS = 4              # OpenAI's limit

# Parameters we implement (top_k and repeat_penalty are llama.cpp extensions, as in
# llama-server), parameters we accept and ignore, and parameters we accept only at the
# value that asks for nothing. Anything else is a 400: silently ignoring e.g. `tools` would
# let a client believe it got tool calling.
SUPPORTED = {"messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
             "temperature", "top_p", "top_k", "repeat_penalty", "seed", "stop"}
IGNORED = {"model", "user"}
NEUTRAL: dict[str, Any] = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0,
                           "logprobs": False}
ROLES = {"system", "developer", "user", "assistant"}


@dataclass(frozen=True)
class CompletionRequest:
    messages: list[Message]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_completion_request(body: bytes, defaults: SamplingParams,
                             system_prompt: str | None = None) -> CompletionRequest:
    """Check a `/v1/chat/completions` body; every problem is a `BadRequest` naming its param."""
    data = parse_json_object(body)
    for name, value in data.items():
        if name in SUPPORTED or name in IGNORED or value is None:
            continue
        if name in NEUTRAL:
            if value != NEUTRAL[name] or isinstance(value, bool) != isinstance(NEUTRAL[name], bool):
                raise BadRequest(f"Only {name}={json.dumps(NEUTRAL[name])} is supported.",
                                 param=name)
            continue
        raise BadRequest(f"Unsupported parameter: '{name}'.", param=name)
    stream = data.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    include_usage = _stream_options(data.get("stream_options"), stream)
    messages = _messages(data.get("messages"), system_prompt)
    return CompletionRequest(messages, _params(data, defaults), stream, include_usage)


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise BadRequest("'stream_options' is only allowed with stream=true.",
                         param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise BadRequest("'stream_options' supports only {\"include_usage\": bool}.",
                         param="stream_options")
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise BadRequest("'stream_options.include_usage' must be true or false.",
                         param="stream_options.include_usage")
    return include_usage


def _messages(raw: Any, system_prompt: str | None) -> list[Message]:
    """The conversation as the engine takes it: leading system/developer messages merged
    into one system message (the server's `system_prompt` when there is none), then user
    and assistant turns, ending with the user's."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list.", param="messages")
    systems: list[str] = []
    turns: list[Message] = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{where}' must be an object.", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list is unhashable
            raise BadRequest(f"'{where}.role' must be one of system, developer, user, assistant "
                             f"(tool calls are not supported), not {role!r}.", param=f"{where}.role")
        content = _content(message.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            if turns:
                raise BadRequest(f"'{where}': system messages must come before the others.",
                                 param=f"{where}.role")
            systems.append(content)
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "user":
        raise BadRequest("The last message must be the user's.", param="messages")
    system = "\n\n".join(systems) if systems else system_prompt
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    return head + turns


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"'{where}' must be a string or a list of text parts "
                     "(images and audio are not supported).", param=where)


def _params(data: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    """OpenAI's names for what /chat_stream calls max_new_tokens and stop; the rest shared."""
    shared: dict[str, Any] = {
        k: data[k] for k in ("temperature", "top_p", "top_k", "repeat_penalty", "seed") if k in data}
    params = sampling_params(shared, defaults)
    for name in ("max_tokens", "max_completion_tokens"):
        if (v := data.get(name)) is not None:
            params = replace(params, max_new_tokens=integer_field(
                name, v, 1, defaults.max_new_tokens))
    if (v := data.get("stop")) is not None:
        stops = [v] if isinstance(v, str) else v
        if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and s for s in stops)):
            raise BadRequest(f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} "
                             "non-empty strings.", param="stop")
        params = replace(params, stop=(*defaults.stop, *stops))
    return params


class _Completion:
    """What every framing of one completion shares: its id, the model, the context check."""

    def __init__(self, request: web.Request, model: str, completion: CompletionRequest,
                 n_ctx: int) -> None:
        self.request = request
        self.model = model
        self.completion = completion
        self.n_ctx = n_ctx
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def check_fits(self, started: Started) -> None:
        if started.dropped_messages:
            max_tokens = self.completion.params.max_new_tokens
            raise ContextLengthExceeded(
                f"The messages do not fit in this model's context: {self.n_ctx} tokens minus "
                f"max_tokens={max_tokens} leaves {self.n_ctx - max_tokens} for the prompt, and "
                f"the oldest {started.dropped_messages} message(s) would have to be dropped. "
                "Shorten the messages or lower max_tokens.", param="messages")

    def usage(self, exchange_or_finished: Finished | Exchange) -> dict[str, int]:
        if isinstance(exchange_or_finished, Exchange):
            prompt, completion = (exchange_or_finished.usage.prompt_tokens,
                                  exchange_or_finished.usage.completion_tokens)
        else:
            prompt, completion = (exchange_or_finished.prompt_tokens,
                                  exchange_or_finished.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def error_response(self, error: ChatStreamError) -> web.Response:
        if isinstance(error, PromptTooLong):  # OpenAI clients look for this code
            error = ContextLengthExceeded(error.message, param="messages")
        return openai_error_response(error)


def _finish_reason(reason: FinishReason | str) -> str:
    return "length" if reason == "length" else "stop"


class _JSONBody(_Completion):
    """`stream: false`: one `chat.completion` object once the reply is complete."""

    headers_sent = False

    async def open(self, started: Started) -> None:
        self.check_fits(started)

    async def send(self, text: str) -> None:
        pass  # the Exchange keeps the text; it goes out whole at the end

    async def close(self, finished: Finished) -> None:
        pass

    async def abort(self, error: BaseException) -> None:
        pass  # never called: no header goes out before the end

    def response_for(self, exchange: Exchange) -> web.StreamResponse:
        if exchange.error is not None:
            return self.error_response(exchange.error)
        if exchange.status != "success":
            return web.Response(status=499)  # the client left: nobody reads this
        return web.json_response({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": exchange.reply},
                "logprobs": None,
                "finish_reason": _finish_reason(exchange.finish_reason),
            }],
            "usage": self.usage(exchange),
        }, dumps=_dumps)


class _EventStream(_Completion):
    """`stream: true`: `chat.completion.chunk` events, then `data: [DONE]`."""

    response: EventSourceResponse | None = None

    @property
    def headers_sent(self) -> bool:
        return self.response is not None and self.response.prepared

    async def open(self, started: Started) -> None:
        self.check_fits(started)
        self.response = _event_source_response()
        await self.response.prepare(self.request)
        await self._chunk({"role": "assistant", "content": ""}, None)

    async def send(self, text: str) -> None:
        await self._chunk({"content": text}, None)

    async def close(self, finished: Finished) -> None:
        await self._chunk({}, _finish_reason(finished.reason))
        if self.completion.include_usage:
            await self._event({**self._head(), "choices": [], "usage": self.usage(finished)})
        await self._event("[DONE]")
        assert self.response is not None
        await self.response.write_eof()

    async def abort(self, error: BaseException) -> None:
        # An error event (the `openai` client raises it as an APIError), then drop the
        # connection: no [DONE], so no client mistakes the reply for a complete one.
        problem = error if isinstance(error, ChatStreamError) else GenerationFailed(
            "The model failed while generating the reply.")
        try:
            await self._event({"error": {"message": problem.message, "type": "server_error",
                                         "param": None, "code": problem.code}})
        except ConnectionError:
            pass
        if self.request.transport is not None:
            self.request.transport.close()

    def response_for(self, exchange: Exchange) -> web.StreamResponse:
        if self.response is not None and self.response.prepared:
            self.response.stop_streaming()   # its keep-alive pings end with the stream
            return self.response
        if exchange.error is not None:
            return self.error_response(exchange.error)
        return web.Response(status=499)  # the client left before the headers

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model}

    async def _chunk(self, delta: dict[str, str], finish_reason: str | None) -> None:
        chunk = {**self._head(), "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish_reason}]}
        if self.completion.include_usage:
            chunk["usage"] = None   # as OpenAI: every chunk but the last has usage null
        await self._event(chunk)

    async def _event(self, data: dict[str, Any] | str) -> None:
        assert self.response is not None
        text = data if isinstance(data, str) else _dumps(data)
        try:
            await self.response.send(text)
        except TimeoutError as stalled:  # aiohttp-sse aborted a client that stopped reading
            raise ConnectionError("the client stopped reading") from stalled


def _event_source_response() -> EventSourceResponse:
    # "\n" ends lines as OpenAI's own stream does (aiohttp-sse defaults to "\r\n").
    # aiohttp-sse >= 3.0 refuses non-GET requests unless told; 2.x (Python 3.10) has no flag.
    try:
        return EventSourceResponse(sep="\n", allow_all_methods=True)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        return EventSourceResponse(sep="\n")


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class OpenAIAPI:
    """The `/v1` routes over one ChatStream's engine, queue, API key and metrics."""

    def __init__(self, chat_stream: ChatStream) -> None:
        self.chat_stream = chat_stream

    def add_routes(self, app: web.Application, prefix: str = "/v1") -> None:
        app.router.add_post(f"{prefix}/chat/completions", self.handle_chat_completions)
        app.router.add_get(f"{prefix}/models", self.handle_models)

    def _model_id(self) -> str:
        info = self.chat_stream.engine.model_info
        if info is None:
            raise ServiceUnavailable("The model is not loaded yet.")
        return info.path.stem

    async def handle_models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the one loaded model."""
        try:
            self.chat_stream.api_key.check(request)
            model = self._model_id()
        except ChatStreamError as error:
            return openai_error_response(error)
        info = self.chat_stream.engine.model_info
        assert info is not None
        return web.json_response({"object": "list", "data": [{
            "id": model, "object": "model", "created": int(info.path.stat().st_mtime)
            if info.path.is_file() else 0, "owned_by": "chatstream_lite",
        }]})

    async def handle_chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`: a reply to `messages`, streamed or whole."""
        received = time.monotonic()
        chat_stream = self.chat_stream
        try:
            chat_stream.api_key.check(request)
            body = await read_body(request, chat_stream.max_body_size)
            completion = parse_completion_request(body, chat_stream.defaults,
                                                  chat_stream.system_prompt)
            model = self._model_id()
            job = chat_stream.submit(completion.messages, completion.params)
        except ChatStreamError as error:
            chat_stream.request_rejected(ENDPOINT, error)
            return openai_error_response(error)
        n_ctx = chat_stream.engine.model_info.n_ctx if chat_stream.engine.model_info else 0
        framing_type = _EventStream if completion.stream else _JSONBody
        framing = framing_type(request, model, completion, n_ctx)
        exchange = Exchange(request, job, framing, chat_stream.disconnects, received)
        await exchange.run()
        chat_stream.request_finished(ENDPOINT, exchange)
        return framing.response_for(exchange)
