"""Anthropic's Messages API request bodies as pydantic models, and what they become.

    call = parse_messages_request(body, defaults, system_prompt, model, max_messages)
    call.completion          # what the engine runs (openai/protocol.py's CompletionRequest)
    call.stop_sequences      # the client's own stop strings (stop_reason "stop_sequence")

The shapes and ranges are Anthropic's (`max_tokens` required, `temperature` 0 to 1,
`stop_sequences`, `system` as text or text blocks, content blocks `text`, `tool_use`,
`tool_result`, `thinking`; tools with an `input_schema`; `tool_choice` auto/any/tool/none;
`thinking` as the template's `enable_thinking` switch),
checked strictly by the models below. A valid request is then written in OpenAI's terms and
read by the chat completions' own request model, as vLLM's Anthropic route does: one place
holds the rules of tools (their grammar, the template's tool format, a result answering an
earlier call), prefill, the system prompt and the sampling ranges. An error found there
names OpenAI's field; `_anthropic_names` rewrites the ones that differ.

What we do not implement is refused with a 400 (images, documents, server tools, unknown
fields); what asks for nothing is accepted and ignored (`metadata`, `cache_control` on any
block, `service_tier`, `thinking.budget_tokens`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator

from ...engine import ModelInfo, SamplingParams
from ...engine.prepare import check_message_count
from ...errors import BadRequest
from ..chat_request import parse_json_object
from ..openai.protocol import ChatCompletionRequest, CompletionRequest
from ..openai.tools import MAX_TOOLS
from ..request_model import RequestModel, validate

__all__ = ["MAX_STOP_SEQUENCE_CHARS", "MAX_STOP_SEQUENCES", "CountTokensRequest", "MessagesCall",
           "MessagesRequest", "parse_count_tokens_request", "parse_messages_request"]

MAX_TOKENS_ASKED = 2**31 - 1     # what max_tokens may ask for; the server's cap applies after
MAX_STOP_SEQUENCES = 16          # Anthropic states no limit; each is checked after every token
MAX_STOP_SEQUENCE_CHARS = 1000
IGNORED = {"metadata", "service_tier"}      # accepted and ignored: they ask for nothing
UNSUPPORTED_BLOCKS = {"image", "document", "search_result", "server_tool_use",
                      "web_search_tool_result", "container_upload"}


class _Block(RequestModel):
    """A content block: unknown fields are refused, `cache_control` (prompt caching: this
    server reuses a conversation's cached prefix by itself) is accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    cache_control: Any = None


class TextBlock(_Block):
    type: Literal["text"]
    text: str
    citations: Any = None


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock |
                  RedactedThinkingBlock, Field(discriminator="type")]


class Message(RequestModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        if isinstance(value, list):
            for block in value:
                kind = block.get("type") if isinstance(block, dict) else None
                if isinstance(kind, str) and kind in UNSUPPORTED_BLOCKS:   # [] is unhashable
                    raise ValueError(f"Content blocks of type {kind!r} are not supported "
                                     "(text, tool_use, tool_result and thinking are).")
        return value


class Tool(RequestModel):
    """A client tool (`type` absent or "custom"); Anthropic's server tools are refused."""

    model_config = ConfigDict(extra="forbid")

    name: str
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: Any = None


class ToolChoice(RequestModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(RequestModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_ASKED)   # not enforced


class CountTokensRequest(RequestModel):
    """`POST /v1/messages/count_tokens`: what a prompt is made of."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _client_tools(cls, value: Any) -> Any:
        if isinstance(value, list):
            for tool in value:
                kind = tool.get("type") if isinstance(tool, dict) else None
                if kind not in (None, "custom"):
                    raise ValueError(f"Tools of type {kind!r} are not supported: only client "
                                     "tools (a name and an input_schema) are.")
        return value

    def openai_body(self) -> dict[str, Any]:
        """This request in OpenAI's chat completions terms (see the module docstring)."""
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            messages.append({"role": "system", "content": _text(self.system)})
        for message in self.messages:
            messages.extend(_openai_messages(message))
        body: dict[str, Any] = {"messages": messages}
        if self.tools:              # an empty list offers no tools, as Anthropic reads it
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "parameters": t.input_schema,
                **({"description": t.description} if t.description is not None else {})}}
                for t in self.tools]
        choice = self.tool_choice
        if choice is not None and (self.tools or choice.type not in ("auto", "none")):
            if choice.type == "tool":
                if choice.name is None:
                    raise BadRequest("'tool_choice.name' is required with type 'tool'.",
                                     param="tool_choice.name")
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = {"auto": "auto", "any": "required",
                                       "none": "none"}[choice.type]
            if choice.disable_parallel_tool_use is False and self.tools:
                body["parallel_tool_calls"] = True
        if self.thinking is not None:
            # Qwen3's switch, as llama-server and vLLM map Anthropic's `thinking` onto it; a
            # template without it ignores the variable.
            body["chat_template_kwargs"] = {"enable_thinking": self.thinking.type != "disabled"}
        return body


class MessagesRequest(CountTokensRequest):
    """`POST /v1/messages`."""

    max_tokens: int = Field(ge=1, le=MAX_TOKENS_ASKED)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: bool | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(0 < len(s) <= MAX_STOP_SEQUENCE_CHARS for s in value):
            raise ValueError(f"'stop_sequences' must hold up to {MAX_STOP_SEQUENCES} strings "
                             f"of 1 to {MAX_STOP_SEQUENCE_CHARS} characters.")
        return value

    def openai_body(self) -> dict[str, Any]:
        body = super().openai_body()
        body["max_tokens"] = self.max_tokens
        if self.stream:
            body["stream"] = True
        for name in ("temperature", "top_p", "top_k"):
            if (value := getattr(self, name)) is not None:
                body[name] = value
        return body


@dataclass(frozen=True)
class MessagesCall:
    """A validated `/v1/messages` request as the engine and the framings take it."""

    completion: CompletionRequest
    stop_sequences: tuple[str, ...] = ()


def parse_messages_request(body: bytes, defaults: SamplingParams,
                           system_prompt: str | None = None, model: ModelInfo | None = None,
                           max_messages: int | None = None) -> MessagesCall:
    """Check a `/v1/messages` body; every problem is a `BadRequest`."""
    request = _validated(MessagesRequest, body, max_messages)
    assert isinstance(request, MessagesRequest)
    completion = _completion(request.openai_body(), defaults, system_prompt, model)
    stops = tuple(request.stop_sequences or ())
    if stops:
        params = completion.params
        completion = replace(completion, params=replace(params, stop=(*params.stop, *stops)))
    return MessagesCall(completion, stops)


def parse_count_tokens_request(body: bytes, defaults: SamplingParams,
                               system_prompt: str | None = None,
                               model: ModelInfo | None = None,
                               max_messages: int | None = None) -> CompletionRequest:
    """Check a `/v1/messages/count_tokens` body: the prompt it would make."""
    request = _validated(CountTokensRequest, body, max_messages)
    return _completion(request.openai_body(), defaults, system_prompt, model)


def _validated(cls: type[CountTokensRequest], body: bytes,
               max_messages: int | None) -> CountTokensRequest:
    data = parse_json_object(body)
    for name, value in data.items():
        if name not in cls.model_fields and name not in IGNORED and value is not None:
            raise BadRequest(f"{name}: Extra inputs are not permitted.", param=name)
    messages = data.get("messages")
    if max_messages is not None and isinstance(messages, list):
        check_message_count(len(messages), max_messages)   # before validating 20,000 of them
    return validate(cls, {k: v for k, v in data.items() if k not in IGNORED})


def _completion(body: dict[str, Any], defaults: SamplingParams, system_prompt: str | None,
                model: ModelInfo | None) -> CompletionRequest:
    try:
        request = validate(ChatCompletionRequest, body)
        return request.completion(defaults, system_prompt, model)
    except BadRequest as error:
        raise BadRequest(_anthropic_names(error.message), param=error.param) from None


# OpenAI's names, as a chat completions error writes them, and Anthropic's.
_RENAMES = ((re.compile(r"tools\[(\d+)\]\.function\.parameters"), r"tools[\1].input_schema"),
            (re.compile(r"tools\[(\d+)\]\.function\.(\w+)"), r"tools[\1].\2"))


def _anthropic_names(message: str) -> str:
    for pattern, name in _RENAMES:
        message = pattern.sub(name, message)
    return message


def _text(value: str | list[TextBlock]) -> str:
    return value if isinstance(value, str) else "".join(block.text for block in value)


def _openai_messages(message: Message) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI messages: a user's tool results become `tool`
    messages (they come first in a user turn, as Anthropic requires), its text a user
    message; an assistant's text and tool uses one assistant message. Thinking blocks of
    earlier turns are not shown to the model again (as Anthropic does)."""
    content = message.content
    if isinstance(content, str):
        return [{"role": message.role, "content": content}]
    texts = [block.text for block in content if isinstance(block, TextBlock)]
    if message.role == "assistant":
        calls = [{"id": block.id, "type": "function", "function": {
            "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}}
            for block in content if isinstance(block, ToolUseBlock)]
        out: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            out["tool_calls"] = calls
        return [out]
    if any(isinstance(block, (ToolUseBlock, ThinkingBlock, RedactedThinkingBlock))
           for block in content):
        raise BadRequest("A user message holds only text and tool_result blocks.",
                         param="messages")
    results = [{"role": "tool", "tool_call_id": block.tool_use_id,
                "content": ("Error: " if block.is_error else "") + _text(block.content or "")}
               for block in content if isinstance(block, ToolResultBlock)]
    if texts or not results:
        results.append({"role": "user", "content": "".join(texts)})
    return results
