"""The OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`.

    OpenAIAPI(chat_stream).add_routes(app)          # create_app() does this

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused-or-your-key")
    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}])

Stateless: the history comes in `messages`, nothing is stored. Function calling (`tools`) is
openai_tools.py's; a last message from the assistant is continued (prefill), and the reply
holds only the continuation, as llama-server's does. It shares ChatStream's engine,
queue bound, disconnect detection and metrics with `/chat_stream`. With `"stream": true` the
reply is Server-Sent Events framed as OpenAI frames them (`aiohttp-sse`). Messages that do not
fit the context are refused with 400 `context_length_exceeded`, as OpenAI does, instead of
silently dropping the oldest turns: the client owns the history, so it must decide what to cut.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from .. import __version__
from ..chat_request import (
    integer_field,
    number_field,
    parse_json_object,
    parse_off_loop,
    read_body,
    sampling_params,
)
from ..engine import Message, ModelInfo, PlainPrompt, PromptInput, SamplingParams
from ..engine.template import Role
from ..errors import BadRequest, ChatStreamError
from .framing import EventStream, JSONBody, ServedModel
from .handler import Accepted, serve_exchange
from .openai_tools import (
    ToolCallsBody,
    ToolCallsStream,
    ToolPlan,
    check_tool_history,
    message_tool_fields,
    parse_tools,
    tool_format,
)
from .responses import openai_error_response

if TYPE_CHECKING:
    from .chat_stream import ChatStream

ENDPOINT = "chat_completions"     # this endpoint's name in metrics and logs
TEXT_ENDPOINT = "completions"     # /v1/completions
MAX_STOP_STRINGS = 4              # OpenAI's limit
MAX_TOKENS_ASKED = 2**31 - 1      # what max_tokens may ask for; the server's cap applies after

# Parameters we implement (top_k and repeat_penalty are llama.cpp extensions, as in
# llama-server), parameters we accept and ignore, and parameters we accept only at the
# value that asks for nothing. Anything else is a 400: silently ignoring e.g. `logprobs`
# would let a client believe it got them.
SUPPORTED = {"messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
             "temperature", "top_p", "top_k", "repeat_penalty", "seed", "stop",
             "response_format", "frequency_penalty", "presence_penalty", "logit_bias",
             "n", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"}
# /v1/completions: the same, with a plain-text `prompt` instead of `messages` and no
# response_format (llama-server takes a grammar there; we have no need yet).
TEXT_SUPPORTED = SUPPORTED - {"messages", "max_completion_tokens", "response_format",
                               "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls"} | {"prompt"}
IGNORED = {"model", "user"}
NEUTRAL: dict[str, Any] = {}
TEXT_NEUTRAL: dict[str, Any] = {"best_of": 1, "echo": False, "suffix": ""}
MAX_TOP_LOGPROBS = 20             # OpenAI's limit (chat); the legacy endpoint's is 5, we take 20
MAX_LOGIT_BIAS = 300              # tokens one request may bias (OpenAI: 300)
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass(frozen=True)
class CompletionRequest:
    messages: PromptInput       # a conversation, or a plain-text prompt (/v1/completions)
    params: SamplingParams
    stream: bool
    include_usage: bool
    tools: ToolPlan | None = None   # set when the reply may call a tool

    @property
    def chat(self) -> bool:
        return not isinstance(self.messages, PlainPrompt)


def parse_completion_request(body: bytes, defaults: SamplingParams,
                             system_prompt: str | None = None,
                             model: ModelInfo | None = None) -> CompletionRequest:
    """Check a `/v1/chat/completions` body; every problem is a `BadRequest` naming its param.
    `model` bounds the token ids of `logit_bias` and turns a JSON Schema into a grammar."""
    data = parse_json_object(body)
    _known(data, SUPPORTED, NEUTRAL)
    stream, include_usage = _stream(data)
    messages = _messages(data.get("messages"), system_prompt)
    params = _params(data, defaults, model.n_vocab if model else 0)
    params = replace(params, n=_choices(data), logprobs=_chat_logprobs(data, model))
    grammar = _response_format(data.get("response_format"), model)
    if grammar is not None:
        params = replace(params, grammar=grammar)
    messages, params, plan = _with_tools(data, messages, params, model)
    if messages[-1]["role"] == "assistant" and params.grammar is not None:
        raise BadRequest("A last assistant message (prefill) cannot be continued under "
                         "tools or a response_format: the reply must start a JSON value.",
                         param="messages")
    return CompletionRequest(messages, params, stream, include_usage, plan)


def _with_tools(data: dict[str, Any], messages: list[Message], params: SamplingParams,
                model: ModelInfo | None) -> tuple[list[Message], SamplingParams, ToolPlan | None]:
    """The messages as the template's tool format renders them (tool calls and results in
    the history, the tools when the reply may call one), and the grammar that holds the
    reply to a call where the format has one."""
    asked = parse_tools(data, model)
    fmt = tool_format(model)
    messages = fmt.messages(messages, asked)
    if not asked.callable:
        return messages, params, None
    # A reply with calls is read whole before its calls go out, one reader per request:
    # several choices, or logprobs tied to text the reader holds back, are not offered.
    for name, given in (("n", params.n > 1), ("logprobs", params.logprobs is not None)):
        if given:
            raise BadRequest(f"'{name}' cannot be combined with tools.", param=name)
    if params.grammar is not None:
        raise BadRequest("'response_format' cannot be combined with tools.",
                         param="response_format")
    if model is None or model.json_grammar is None:
        raise BadRequest("This engine cannot constrain replies to tool calls.", param="tools")
    try:
        grammar = fmt.grammar(asked, model.json_grammar)
    except ValueError as error:
        raise BadRequest(f"These tools' schemas cannot be held by a grammar: {error}",
                         param="tools") from None
    if grammar is not None:
        params = replace(params, grammar=grammar)
    return messages, params, ToolPlan(fmt, asked)


def parse_text_completion_request(body: bytes, defaults: SamplingParams,
                                  model: ModelInfo | None = None) -> CompletionRequest:
    """Check a `/v1/completions` body: `prompt` is plain text, continued as it is (no chat
    template, no system prompt; control-token text in it stays text)."""
    data = parse_json_object(body)
    _known(data, TEXT_SUPPORTED, TEXT_NEUTRAL)
    stream, include_usage = _stream(data)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]          # one prompt in a list, as some clients send it
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string (one prompt per request; "
                         "token-id prompts are not supported).", param="prompt")
    params = _params(data, defaults, model.n_vocab if model else 0)
    top = data.get("logprobs")
    logprobs = None if top is None else _top_logprobs("logprobs", top, model)
    params = replace(params, n=_choices(data), logprobs=logprobs)
    return CompletionRequest(PlainPrompt(prompt), params, stream, include_usage)


def _known(data: dict[str, Any], supported: set[str], neutral: dict[str, Any]) -> None:
    """Refuse every parameter we do not implement, unless it asks for nothing."""
    for name, value in data.items():
        if name in supported or name in IGNORED or value is None:
            continue
        if name in neutral:
            if value != neutral[name] or isinstance(value, bool) != isinstance(neutral[name], bool):
                raise BadRequest(f"Only {name}={json.dumps(neutral[name])} is supported.",
                                 param=name)
            continue
        raise BadRequest(f"Unsupported parameter: '{name}'.", param=name)


def _stream(data: dict[str, Any]) -> tuple[bool, bool]:
    """`stream`, and whether a last chunk carries the usage."""
    stream = data.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    return stream, _stream_options(data.get("stream_options"), stream)


def _response_format(value: Any, model: ModelInfo | None) -> str | None:
    """The grammar `response_format` asks for: None for `{"type": "text"}` (OpenAI's default,
    which some clients send explicitly); any JSON object for `json_object`; what the schema
    allows for `json_schema` (strict or not: the grammar always holds the reply to it)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise BadRequest("'response_format.type' must be text, json_object or json_schema.",
                         param="response_format")
    schema: str | None = None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadRequest("'response_format.json_schema' must be an object whose "
                             "'schema' is a JSON Schema object.",
                             param="response_format.json_schema")
        if "schema" in spec:
            schema = json.dumps(spec["schema"])
    if model is None or model.json_grammar is None:
        raise BadRequest("This engine cannot constrain replies to JSON.",
                         param="response_format")
    try:
        return model.json_grammar(schema)
    except ValueError as error:
        raise BadRequest(f"'response_format.json_schema.schema' is not supported: {error}",
                         param="response_format.json_schema.schema") from None


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
    into one system message (the server's `system_prompt` when there is none), then the
    other messages in their order, holding a user's. Tool calls and results keep their
    fields (openai_tools.py checks them).

    A system message after the first turn is passed to the template as it is: a template
    that cannot render it refuses with its own message (400 `template_refused`). A last
    message from the assistant is the start of the reply (prefill); an empty one is no
    start at all, and is dropped."""
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
            raise BadRequest(f"'{where}.role' must be one of system, developer, user, "
                             f"assistant, tool, not {role!r}.", param=f"{where}.role")
        tool_fields = message_tool_fields(message, role, where)
        raw_content = message.get("content")
        if raw_content is None and "tool_calls" in tool_fields:
            raw_content = ""        # an assistant's turn that only calls tools
        content = _content(raw_content, f"{where}.content")
        if role in ("system", "developer"):
            if not turns:
                systems.append(content)
                continue
            role = "system"
        turns.append(cast(Message, {"role": cast(Role, role), "content": content,
                                    **tool_fields}))
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"] and not (
            turns[-1].get("tool_calls")):
        turns.pop()
    if not any(t["role"] == "user" for t in turns):
        raise BadRequest("The messages must hold a user's.", param="messages")
    if turns[-1].get("tool_calls"):
        raise BadRequest("The last message calls tools: send their results (role 'tool') "
                         "for the model to go on.", param="messages")
    check_tool_history(turns)
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


def _params(data: dict[str, Any], defaults: SamplingParams, n_vocab: int) -> SamplingParams:
    """OpenAI's names for what /chat_stream calls max_new_tokens and stop; the rest shared."""
    shared: dict[str, Any] = {
        k: data[k] for k in ("temperature", "top_p", "top_k", "repeat_penalty", "seed",
                             "frequency_penalty", "presence_penalty")
        if k in data}
    params = sampling_params(shared, defaults)
    for name in ("max_tokens", "max_completion_tokens"):
        if (v := data.get(name)) is not None:
            # Clamped, not refused: clients send 1024-4096 by default, whatever the server's
            # cap; a reply cut at the cap ends with finish_reason "length", as any cut does.
            asked = integer_field(name, v, 1, MAX_TOKENS_ASKED)
            params = replace(params, max_new_tokens=min(asked, defaults.max_new_tokens))
    if (v := data.get("stop")) is not None:
        stops = [v] if isinstance(v, str) else v
        if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and s for s in stops)):
            raise BadRequest(f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} "
                             "non-empty strings.", param="stop")
        params = replace(params, stop=(*defaults.stop, *stops))
    if (v := data.get("logit_bias")) is not None:
        params = replace(params, logit_bias=_logit_bias(v, n_vocab))
    return params


def _choices(data: dict[str, Any]) -> int:
    """`n`: how many replies to the one prompt. The bound is the engine's (Admission): each
    choice is a sequence of its own, decoded beside the others."""
    value = data.get("n")
    return 1 if value is None else integer_field("n", value, 1, 128)


def _chat_logprobs(data: dict[str, Any], model: ModelInfo | None) -> int | None:
    """Chat's `logprobs: true` and `top_logprobs` (alternatives per token, 0-20)."""
    wanted, top = data.get("logprobs"), data.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise BadRequest("'logprobs' must be true or false.", param="logprobs")
    if not wanted:
        if top is not None:
            raise BadRequest("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        return None
    _logprobs_supported("logprobs", model)
    return 0 if top is None else integer_field("top_logprobs", top, 0, MAX_TOP_LOGPROBS)


def _top_logprobs(name: str, value: Any, model: ModelInfo | None) -> int:
    _logprobs_supported(name, model)
    return integer_field(name, value, 0, MAX_TOP_LOGPROBS)


def _logprobs_supported(name: str, model: ModelInfo | None) -> None:
    if model is not None and not model.logprobs:
        raise BadRequest("This engine does not report log-probabilities.", param=name)


def _logit_bias(value: Any, n_vocab: int) -> tuple[tuple[int, float], ...]:
    """`{"token id": bias}` as OpenAI takes it: ids as strings, biases from -100 (the token
    is never chosen) to 100 (it is the only choice)."""
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise BadRequest(f"'logit_bias' must be an object of up to {MAX_LOGIT_BIAS} "
                         "token ids and biases.", param="logit_bias")
    top = n_vocab - 1 if n_vocab > 0 else 2**31 - 1
    biases: list[tuple[int, float]] = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10) or int(key) > top:
            raise BadRequest(f"'logit_bias' keys must be token ids from 0 to {top}, not "
                             f"{key!r}.", param="logit_bias")
        biases.append((int(key), number_field(f"logit_bias.{key}", bias, -100.0, 100.0)))
    return tuple(biases)


class OpenAIAPI:
    """The `/v1` routes over one ChatStream's runtime (engine, queue, metrics) and API key."""

    def __init__(self, chat_stream: ChatStream) -> None:
        self.chat_stream = chat_stream
        self.runtime = chat_stream.runtime

    def add_routes(self, app: web.Application, prefix: str = "/v1") -> None:
        app.router.add_post(f"{prefix}/chat/completions", self.handle_chat_completions)
        app.router.add_post(f"{prefix}/completions", self.handle_completions)
        app.router.add_get(f"{prefix}/models", self.handle_models)

    def served_model(self) -> ServedModel:
        """The model's id (the `--served-model-name` alias, else the file's stem) and the
        `system_fingerprint` of this server and model."""
        info = self.runtime.require_model()
        name = self.chat_stream.served_model_name or info.path.stem
        return ServedModel(name, fingerprint(info))

    async def handle_models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the one loaded model, under its served name."""
        try:
            self.chat_stream.api_key.check(request)
            info = self.runtime.require_model()
            served = self.served_model()
        except ChatStreamError as error:
            return openai_error_response(error)
        return web.json_response({"object": "list", "data": [{
            "id": served.name, "object": "model", "created": int(info.path.stat().st_mtime)
            if info.path.is_file() else 0, "owned_by": "chatstream_lite",
        }]})

    async def handle_chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`: a reply to `messages`, streamed or whole."""
        chat_stream = self.chat_stream

        async def admit() -> Accepted:
            chat_stream.api_key.check(request)
            body = await read_body(request, chat_stream.max_body_size,
                                   chat_stream.body_timeout)
            # Off the loop whatever the size: `response_format` and `tools` build grammars.
            completion = await parse_off_loop(parse_completion_request, body,
                                              chat_stream.defaults, chat_stream.system_prompt,
                                              self.runtime.require_model(), always=True)
            served = self.served_model()
            # The client owns the history: what does not fit is refused, never cut silently.
            job = self.runtime.submit(completion.messages, completion.params, drop_oldest=False)
            return Accepted(job, _chat_framing(completion)(request, served, completion))

        return await serve_exchange(self.runtime, ENDPOINT, request, admit, openai_error_response)

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/completions`: `prompt` continued as plain text, streamed or whole, with
        the same queue, limits and disconnect handling as the chat endpoint."""
        chat_stream = self.chat_stream

        async def admit() -> Accepted:
            chat_stream.api_key.check(request)
            body = await read_body(request, chat_stream.max_body_size,
                                   chat_stream.body_timeout)
            completion = await parse_off_loop(parse_text_completion_request, body,
                                              chat_stream.defaults, self.runtime.require_model())
            served = self.served_model()
            job = self.runtime.submit(completion.messages, completion.params, drop_oldest=False)
            framing_type = EventStream if completion.stream else JSONBody
            return Accepted(job, framing_type(request, served, completion))

        return await serve_exchange(self.runtime, TEXT_ENDPOINT, request, admit,
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
