"""OpenAI's request bodies as pydantic models, and what they become for the engine.

    completion = parse_completion_request(body, defaults, system_prompt, model)   # chat
    completion = parse_text_completion_request(body, defaults, model)             # legacy

The shapes and ranges are declared on the models (`ChatCompletionRequest`,
`TextCompletionRequest`, strict: a number is not a string, an integer not a bool); the rules
across fields or against the model (a schema the grammar must hold, `logit_bias` within the
vocabulary, tools and their choice, prefill under a grammar) are methods next to them. Every
problem is a `BadRequest` naming its parameter as OpenAI names it (`messages[0].role`). A
parameter we do not implement is refused rather than ignored (silently ignoring
`logprobs` would let a client believe it got them), unless it asks for nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from pydantic import ConfigDict, Field, field_validator

from ...engine import Message, ModelInfo, PlainPrompt, PromptInput, SamplingParams
from ...engine.prepare import check_message_count
from ...engine.template import RESERVED_VARIABLES, Conversation, Role
from ...errors import BadRequest
from ..chat_request import parse_json_object
from ..reasoning import opens_thinking
from ..request_model import RequestModel, SamplingFields, validate
from .tools import ToolPlan, check_tool_history, message_tool_fields, parse_tools, tool_format

__all__ = ["ChatCompletionRequest", "CompletionRequest", "TextCompletionRequest",
           "parse_completion_request", "parse_text_completion_request"]

MAX_STOP_STRINGS = 4              # OpenAI's limit
MAX_TOKENS_ASKED = 2**31 - 1      # what max_tokens may ask for; the server's cap applies after
MAX_TOP_LOGPROBS = 20             # OpenAI's limit (chat); the legacy endpoint's is 5, we take 20
MAX_LOGIT_BIAS = 300              # tokens one request may bias (OpenAI: 300)
MAX_CHOICES = 128
MAX_GRAMMAR_TEXT = 256 * 1024     # llama-server's `grammar`: GBNF text
MAX_REPEAT_LAST_N = 1 << 20       # tokens the penalties may look back at (-1: the context)
MAX_TEMPLATE_KWARGS = 32          # chat_template_kwargs: variables, and their JSON text
MAX_TEMPLATE_KWARGS_CHARS = 16 * 1024
TEMPLATE_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Accepted and ignored; and accepted only at the value that asks for nothing.
IGNORED = {"model", "user"}
TEXT_NEUTRAL: dict[str, Any] = {"best_of": 1, "echo": False, "suffix": ""}


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request as the engine and the framings take it."""

    messages: PromptInput       # a conversation, or a plain-text prompt (/v1/completions)
    params: SamplingParams
    stream: bool
    include_usage: bool
    tools: ToolPlan | None = None   # set when the reply may call a tool
    # The prompt ends inside a thinking section (its template, or a prefill, opened it): the
    # reply starts as reasoning (server/reasoning.py).
    reasoning_opened: bool = False

    @property
    def chat(self) -> bool:
        return not isinstance(self.messages, PlainPrompt)


class StreamOptions(RequestModel):
    include_usage: bool | None = None


class _Common(SamplingFields):
    """What both completion endpoints share."""

    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_ASKED)
    stop: str | list[str] | None = None
    logit_bias: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    # llama-server's extensions, which llama.cpp's clients send: a grammar (GBNF text, or a
    # JSON Schema at the top level) and the samplers OpenAI has no name for.
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_TEXT)
    json_schema: dict[str, Any] | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    typical_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_last_n: int | None = Field(None, ge=-1, le=MAX_REPEAT_LAST_N)   # -1: the context
    n_probs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Accepted, and what it asks is always done: a conversation's cells stay cached (its
    # session's, or the prefix cache's) whatever the request says.
    cache_prompt: bool | None = None

    def _llama_server(self, params: SamplingParams, model: ModelInfo | None
                      ) -> SamplingParams:
        """`params` with llama-server's extensions applied: its samplers, `n_probs` as
        logprobs (when the request did not ask for them by OpenAI's names), and the grammar
        `grammar` or `json_schema` holds the reply to."""
        changes: dict[str, Any] = {name: value for name in ("min_p", "typical_p")
                                   if (value := getattr(self, name)) is not None}
        if self.repeat_last_n is not None:
            changes["repeat_last_n"] = self.repeat_last_n if self.repeat_last_n >= 0 else (
                model.n_ctx if model is not None else MAX_REPEAT_LAST_N)
        if self.n_probs and params.logprobs is None:
            _logprobs_supported("n_probs", model)
            changes["logprobs"] = self.n_probs
        params = replace(params, **changes)
        if self.grammar is None and self.json_schema is None:
            return params
        name = "grammar" if self.grammar is not None else "json_schema"
        if self.grammar is not None and self.json_schema is not None:
            raise BadRequest("'grammar' and 'json_schema' cannot be combined.", param=name)
        if params.grammar is not None:
            raise BadRequest(f"'{name}' cannot be combined with 'response_format'.",
                             param=name)
        maker = model.json_grammar if model is not None else None
        if maker is None:
            raise BadRequest("This engine cannot constrain replies to a grammar.", param=name)
        try:
            if self.grammar is not None:
                grammar = maker.gbnf(self.grammar)
            else:
                grammar = maker(json.dumps(self.json_schema))
        except ValueError as error:
            raise BadRequest(f"'{name}' is not supported: {error}", param=name) from None
        return replace(params, grammar=grammar)

    def _stream(self) -> tuple[bool, bool]:
        """`stream`, and whether a last chunk carries the usage."""
        stream = bool(self.stream)
        options = self.stream_options
        if options is None:
            return stream, False
        if not stream:
            raise BadRequest("'stream_options' is only allowed with stream=true.",
                             param="stream_options")
        if set(options) - {"include_usage"}:
            raise BadRequest("'stream_options' supports only {\"include_usage\": bool}.",
                             param="stream_options")
        checked = validate(StreamOptions, options, where=("stream_options",))
        return stream, bool(checked.include_usage)

    def _params(self, defaults: SamplingParams, n_vocab: int) -> SamplingParams:
        """OpenAI's names for what /chat_stream calls max_new_tokens and stop; the rest
        shared."""
        params = self.sampling(defaults)
        asked = self._max_tokens()
        if asked is not None:
            # Clamped, not refused: clients send 1024-4096 by default, whatever the server's
            # cap; a reply cut at the cap ends with finish_reason "length", as any cut does.
            params = replace(params, max_new_tokens=min(asked, defaults.max_new_tokens))
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if len(stops) > MAX_STOP_STRINGS or not all(stops):
                raise BadRequest(f"'stop' must be a string or a list of up to "
                                 f"{MAX_STOP_STRINGS} non-empty strings.", param="stop")
            params = replace(params, stop=(*defaults.stop, *stops))
        if self.logit_bias is not None:
            params = replace(params, logit_bias=_logit_bias(self.logit_bias, n_vocab))
        return replace(params, n=self.n or 1)

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise ValueError(f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} "
                             "non-empty strings.")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_shape(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS):
            raise ValueError(f"'logit_bias' must be an object of up to {MAX_LOGIT_BIAS} "
                             "token ids and biases.")
        return value


class ChatMessage(RequestModel):
    """One message; an assistant's `tool_calls` and a result's `tool_call_id` (kept as extra
    fields) are read by tools.py, which knows their rules."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_ASKED)
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Any = None                 # tools.py: their rules depend on the model's grammar
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    chat_template_kwargs: dict[str, Any] | None = None   # llama-server's, vLLM's

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """More variables for the chat template (`{"enable_thinking": false}`): data, as
        message contents are (engine/template.py marks every string in them), under names
        that cannot replace the template's own variables."""
        if value is None:
            return None
        if len(value) > MAX_TEMPLATE_KWARGS or len(json.dumps(
                value, ensure_ascii=False)) > MAX_TEMPLATE_KWARGS_CHARS:
            raise ValueError(f"'chat_template_kwargs' must hold at most {MAX_TEMPLATE_KWARGS} "
                             f"variables, {MAX_TEMPLATE_KWARGS_CHARS} characters of JSON.")
        for name in value:
            if not TEMPLATE_VARIABLE.fullmatch(name) or name in RESERVED_VARIABLES:
                raise ValueError(f"'chat_template_kwargs' cannot set {name!r}: a variable is "
                                 "a name of letters, digits and underscores, and not one the "
                                 "server sets (messages, tools, bos_token, ...).")
        return value

    @field_validator("messages", mode="before")
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError("'messages' must be a non-empty list.")
        return value

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None \
            else self.max_tokens

    def completion(self, defaults: SamplingParams, system_prompt: str | None,
                   model: ModelInfo | None) -> CompletionRequest:
        """What the engine runs: `model` bounds `logit_bias` and turns schemas into grammars."""
        stream, include_usage = self._stream()
        messages = self._messages(system_prompt)
        params = self._params(defaults, model.n_vocab if model else 0)
        params = replace(params, logprobs=self._logprobs(model))
        grammar = _response_format(self.response_format, model)
        if grammar is not None:
            params = replace(params, grammar=grammar)
        params = self._llama_server(params, model)
        messages, params, plan = self._with_tools(messages, params, model)
        if messages[-1]["role"] == "assistant" and params.grammar is not None:
            raise BadRequest("A last assistant message (prefill) cannot be continued under "
                             "tools or a response_format: the reply must start a JSON value.",
                             param="messages")
        kwargs = self.chat_template_kwargs
        if kwargs:
            tools = messages.tools if isinstance(messages, Conversation) else []
            messages = Conversation(messages, tools, kwargs)
        return CompletionRequest(messages, params, stream, include_usage, plan,
                                 _reasoning_opened(messages, model, kwargs))

    def _messages(self, system_prompt: str | None) -> list[Message]:
        """The conversation as the engine takes it: leading system/developer messages merged
        into one system message (the server's `system_prompt` when there is none), then the
        other messages in their order, holding a user's. A system message after the first
        turn is passed to the template as it is (one that cannot render it refuses: 400
        `template_refused`). A last message from the assistant is the start of the reply
        (prefill); an empty one is no start at all, and is dropped."""
        systems: list[str] = []
        turns: list[Message] = []
        for index, message in enumerate(self.messages):
            where = f"messages[{index}]"
            role: str = message.role
            tool_fields = message_tool_fields(message.model_extra or {}, role, where)
            raw_content = message.content
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
            raise BadRequest("The last message calls tools: send their results (role "
                             "'tool') for the model to go on.", param="messages")
        check_tool_history(turns)
        system = "\n\n".join(systems) if systems else system_prompt
        head: list[Message] = [{"role": "system", "content": system}] if system else []
        return head + turns

    def _logprobs(self, model: ModelInfo | None) -> int | None:
        """Chat's `logprobs: true` and `top_logprobs` (alternatives per token, 0-20)."""
        if not self.logprobs:
            if self.top_logprobs is not None:
                raise BadRequest("'top_logprobs' needs 'logprobs': true.",
                                 param="top_logprobs")
            return None
        _logprobs_supported("logprobs", model)
        return self.top_logprobs or 0

    def _with_tools(self, messages: list[Message], params: SamplingParams,
                    model: ModelInfo | None
                    ) -> tuple[list[Message], SamplingParams, ToolPlan | None]:
        """The messages as the template's tool format renders them (tool calls and results
        in the history, the tools when the reply may call one), and the grammar that holds
        the reply to a call where the format has one."""
        asked = parse_tools({name: getattr(self, name) for name in
                             ("tools", "tool_choice", "parallel_tool_calls")}, model)
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
            raise BadRequest("This engine cannot constrain replies to tool calls.",
                             param="tools")
        try:
            grammar = fmt.grammar(asked, model.json_grammar)
        except ValueError as error:
            raise BadRequest(f"These tools' schemas cannot be held by a grammar: {error}",
                             param="tools") from None
        if grammar is not None:
            params = replace(params, grammar=grammar)
        return messages, params, ToolPlan(fmt, asked)


class TextCompletionRequest(_Common):
    """`POST /v1/completions`: `prompt` is plain text, continued as it is (no chat template,
    no system prompt; control-token text in it stays text)."""

    prompt: Any = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]          # one prompt in a list, as some clients send it
        if not isinstance(value, str) or not value:
            raise ValueError("'prompt' must be a non-empty string (one prompt per request; "
                             "token-id prompts are not supported).")
        return value

    def completion(self, defaults: SamplingParams, model: ModelInfo | None
                   ) -> CompletionRequest:
        stream, include_usage = self._stream()
        params = self._params(defaults, model.n_vocab if model else 0)
        if self.logprobs is not None:
            _logprobs_supported("logprobs", model)
        params = self._llama_server(replace(params, logprobs=self.logprobs), model)
        return CompletionRequest(PlainPrompt(cast(str, self.prompt)), params, stream,
                                 include_usage)


def parse_completion_request(body: bytes, defaults: SamplingParams,
                             system_prompt: str | None = None,
                             model: ModelInfo | None = None,
                             max_messages: int | None = None) -> CompletionRequest:
    """Check a `/v1/chat/completions` body; every problem is a `BadRequest` naming its param.
    `model` bounds the token ids of `logit_bias` and turns a JSON Schema into a grammar;
    more than `max_messages` messages are refused before any of them is validated."""
    data = parse_json_object(body)
    _known(data, ChatCompletionRequest, {})
    messages = data.get("messages")
    if max_messages is not None and isinstance(messages, list):
        check_message_count(len(messages), max_messages)   # before validating 20,000 of them
    if "prompt" in data:
        raise BadRequest("Unsupported parameter: 'prompt'.", param="prompt")
    request = validate(ChatCompletionRequest, data)
    return request.completion(defaults, system_prompt, model)


def parse_text_completion_request(body: bytes, defaults: SamplingParams,
                                  model: ModelInfo | None = None) -> CompletionRequest:
    """Check a `/v1/completions` body."""
    data = parse_json_object(body)
    _known(data, TextCompletionRequest, TEXT_NEUTRAL)
    if "prompt" not in data:
        raise BadRequest("'prompt' must be a non-empty string (one prompt per request; "
                         "token-id prompts are not supported).", param="prompt")
    return validate(TextCompletionRequest, data).completion(defaults, model)


def _known(data: dict[str, Any], model: type[RequestModel], neutral: dict[str, Any]) -> None:
    """Refuse every parameter we do not implement (the model's fields are those we do),
    unless it asks for nothing."""
    supported = model.model_fields
    for name, value in data.items():
        if name in supported or name in IGNORED or value is None:
            continue
        if name in neutral:
            if value != neutral[name] or isinstance(value, bool) != isinstance(
                    neutral[name], bool):
                raise BadRequest(f"Only {name}={json.dumps(neutral[name])} is supported.",
                                 param=name)
            continue
        raise BadRequest(f"Unsupported parameter: '{name}'.", param=name)


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


def _response_format(value: dict[str, Any] | None, model: ModelInfo | None) -> str | None:
    """The grammar `response_format` asks for: None for `{"type": "text"}` (OpenAI's default,
    which some clients send explicitly); any JSON object for `json_object`; what the schema
    allows for `json_schema` (strict or not: the grammar always holds the reply to it)."""
    if value is None:
        return None
    kind = value.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequest("'response_format.type' must be text, json_object or json_schema.",
                         param="response_format")
    if kind == "text":
        return None
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


def _reasoning_opened(messages: list[Message], model: ModelInfo | None,
                      kwargs: dict[str, Any] | None) -> bool:
    """Whether the reply starts inside a thinking section: a prefill that opened one, or a
    template whose generation prompt does (DeepSeek-R1's)."""
    if messages[-1]["role"] == "assistant":
        return opens_thinking(messages[-1]["content"])
    return model is not None and opens_thinking(model.chat_template.generation_prompt(kwargs))


def _logprobs_supported(name: str, model: ModelInfo | None) -> None:
    if model is not None and not model.logprobs:
        raise BadRequest("This engine does not report log-probabilities.", param=name)


def _logit_bias(value: dict[str, Any], n_vocab: int) -> tuple[tuple[int, float], ...]:
    """`{"token id": bias}` as OpenAI takes it: ids as strings, biases from -100 (the token
    is never chosen) to 100 (it is the only choice)."""
    top = n_vocab - 1 if n_vocab > 0 else 2**31 - 1
    biases: list[tuple[int, float]] = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10) or int(key) > top:
            raise BadRequest(f"'logit_bias' keys must be token ids from 0 to {top}, not "
                             f"{key!r}.", param="logit_bias")
        biases.append((int(key), _bias(f"logit_bias.{key}", bias)))
    return tuple(biases)


def _bias(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not -100.0 <= value <= 100.0:
        raise BadRequest(f"'{name}' must be a number from -100 to 100.", param=name)
    return float(value)
