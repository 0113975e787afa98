"""The Responses API's request body (`POST /v1/responses`) as pydantic models, with the field
names of openai-python's `openai/types/responses/`, and what it becomes for the engine.

    request = parse_responses_request(body, max_messages)      # ResponsesRequest; 400s
    items = request.input_items()                              # validated items, with ids
    completion = request.completion(conversation, defaults, system_prompt, model)

A request is read in Responses terms first (its errors name `input[2].call_id`,
`text.format`, `max_output_tokens`), then said as a chat completions body and run through
openai/protocol.py's `ChatCompletionRequest`, so that tools, their grammars, the tool
history's rules and `response_format` are the ones chat completions has, not a fork.
Items are data like message contents: control-token text in them stays characters.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from ...engine import ModelInfo, SamplingParams
from ...engine.prepare import check_message_count
from ...errors import BadRequest
from ..chat_request import parse_json_object
from ..openai.protocol import MAX_TOKENS_ASKED, ChatCompletionRequest, CompletionRequest
from ..openai.tools import MAX_TOOLS
from ..request_model import RequestModel, SamplingFields, validate

__all__ = ["ITEM_TYPES", "RESPONSE_ID", "FunctionTool", "ResponsesCall", "ResponsesRequest",
           "new_id", "parse_responses_request", "responses_names"]

# Our ids: a prefix and 256 random bits (64 hex digits); one a client names must look so.
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{64}")
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
MAX_METADATA = 16                    # OpenAI's limits: 16 pairs, 64-char keys, 512-char values
# Accepted and ignored (one model is served; the rest steer OpenAI's own caches and billing).
IGNORED = {"model", "user", "prompt_cache_key", "safety_identifier", "service_tier",
           "prompt_cache_retention"}
# Accepted only at the value that asks for nothing.
NEUTRAL: dict[str, Any] = {"include": [], "background": False, "truncation": "disabled",
                           "reasoning": {}}


def new_id(prefix: str) -> str:
    """`resp_`, `msg_`, `fc_` + 256 random bits: an id nobody can guess (a stored
    response is still reachable only by its owner, see routes.py)."""
    return f"{prefix}_{secrets.token_hex(32)}"


class _Item(RequestModel):
    model_config = ConfigDict(extra="ignore")   # clients echo output fields (annotations)

    id: str | None = Field(None, max_length=128)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ContentPart(RequestModel):
    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("input_text", "output_text"):
                    raise ValueError(f"Content parts of type {kind!r} are not supported: only "
                                     "input_text and output_text (no images, files or audio).")
        return value

    def text(self) -> str:
        content = self.content
        return content if isinstance(content, str) else "".join(p.text for p in content)


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=64)
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=128)
    output: str | list[ContentPart]

    def text(self) -> str:
        output = self.output
        return output if isinstance(output, str) else "".join(p.text for p in output)


class ReasoningText(RequestModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Item):
    """A reply's thinking section, as the replies give it back (clients that keep the
    conversation themselves send it with the next turn). Kept in the stored conversation and
    listed, never shown to the model again: templates drop an earlier turn's thinking, as
    Anthropic's API does (`encrypted_content` is ignored: there is none of ours)."""

    type: Literal["reasoning"]
    summary: list[ReasoningText] = Field(default_factory=list, max_length=64)
    content: list[ReasoningText] | None = Field(None, max_length=64)


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
ItemModel = type[MessageItem] | type[FunctionCallItem] | type[FunctionCallOutputItem] | \
    type[ReasoningItem]
_ITEM_MODELS: dict[str, ItemModel] = {
    "message": MessageItem, "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem}


class FunctionTool(RequestModel):
    type: Literal["function"]
    name: str
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ToolChoiceFunction(RequestModel):
    type: Literal["function"]
    name: str


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(RequestModel):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None     # the only one a small model keeps


class ResponsesRequest(SamplingFields):
    """`POST /v1/responses`."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_ASKED)
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = Field(None, max_length=80)
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > MAX_METADATA or any(
                len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError(f"'metadata' holds up to {MAX_METADATA} pairs: keys of up to 64 "
                             "characters, values of up to 512.")
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("'input' must be a string or a non-empty list of items.")
        return value

    def input_items(self) -> list[dict[str, Any]]:
        """The request's input as items, each checked and given an id (a string input is
        one user message), as `GET /v1/responses/{id}/input_items` lists them."""
        raw: list[Any] = [{"type": "message", "role": "user",
                           "content": self.input}] if isinstance(self.input, str) else self.input
        items: list[dict[str, Any]] = []
        for index, data in enumerate(raw):
            where: tuple[int | str, ...] = ("input", index)
            if not isinstance(data, dict):
                raise BadRequest(f"'input[{index}]' must be an item object.",
                                 param=f"input[{index}]")
            kind = data.get("type", "message" if "role" in data else None)
            if not isinstance(kind, str) or kind not in _ITEM_MODELS:   # [] is unhashable
                given = f" (not {kind!r})" if isinstance(kind, str) and len(kind) <= 40 else ""
                raise BadRequest(f"'input[{index}].type' must be one of {', '.join(ITEM_TYPES)}"
                                 f"{given}.", param=f"input[{index}].type")
            item = validate(_ITEM_MODELS[kind], data, where=where)
            items.append(_item_json(item))
        return items

    def completion(self, conversation: list[dict[str, Any]], defaults: SamplingParams,
                   system_prompt: str | None, model: ModelInfo | None) -> CompletionRequest:
        """What the engine runs: `conversation` (the stored items before this request's,
        then its own) said as chat messages, after `instructions` (or the server's system
        prompt)."""
        messages = _chat_messages(conversation, self.instructions or system_prompt)
        if all(message["role"] == "system" for message in messages):
            raise BadRequest("'input' has nothing to reply to: reasoning items are kept, but "
                             "not shown to the model again.", param="input")
        body: dict[str, Any] = {"messages": messages}
        for name in SamplingFields.model_fields:
            if (value := getattr(self, name)) is not None:
                body[name] = value
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        if self.tools:
            body["tools"] = [_chat_tool(index, tool) for index, tool in enumerate(self.tools)]
        if self.tool_choice is not None:
            choice = self.tool_choice
            body["tool_choice"] = choice if isinstance(choice, str) else {
                "type": "function", "function": {"name": choice.name}}
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        text_format = self.text.format if self.text is not None else None
        if text_format is not None and text_format.type != "text":
            body["response_format"] = {"type": text_format.type} if text_format.type == \
                "json_object" else {"type": "json_schema", "json_schema": {
                    "name": text_format.name or "response", "schema": text_format.schema_ or {},
                    "strict": bool(text_format.strict)}}
        if self.stream:
            body["stream"] = True
        try:
            chat = validate(ChatCompletionRequest, body)
            return chat.completion(defaults, None, model)
        except BadRequest as error:
            param = responses_names(error.param) if error.param is not None else None
            raise type(error)(responses_names(error.message), param=param) from None


@dataclass(frozen=True)
class ResponsesCall:
    """A validated `/v1/responses` request: the body, its own items, and what the engine runs
    (set once the stored conversation it continues is known)."""

    request: ResponsesRequest
    items: list[dict[str, Any]]


def parse_responses_request(body: bytes, max_messages: int | None = None) -> ResponsesCall:
    """Check a `/v1/responses` body; every problem is a `BadRequest` naming its param."""
    data = parse_json_object(body)
    for name, value in data.items():
        if name in ResponsesRequest.model_fields or name in IGNORED or value is None:
            continue
        if name in NEUTRAL and value == NEUTRAL[name]:
            continue
        raise BadRequest(f"Unsupported parameter: '{name}'"
                         + (f" (only {json.dumps(NEUTRAL[name])} is supported)."
                            if name in NEUTRAL else "."), param=name)
    raw = data.get("input")
    if max_messages is not None and isinstance(raw, list):
        try:
            check_message_count(len(raw), max_messages)    # before validating 20,000 of them
        except BadRequest as error:
            raise BadRequest(error.message, param="input") from None
    request = validate(ResponsesRequest, {k: v for k, v in data.items() if k not in IGNORED})
    previous = request.previous_response_id
    if previous is not None and not RESPONSE_ID.fullmatch(previous):
        raise BadRequest("'previous_response_id' is not a response id of this server.",
                         param="previous_response_id")
    return ResponsesCall(request, request.input_items())


def _item_json(item: Item) -> dict[str, Any]:
    """An item as it is stored and listed: its text whole, an id of ours where it had none."""
    if isinstance(item, MessageItem):
        part = "output_text" if item.role == "assistant" else "input_text"
        return {"type": "message", "id": item.id or new_id("msg"), "role": item.role,
                "status": item.status or "completed",
                "content": [{"type": part, "text": item.text(),
                             **({"annotations": []} if part == "output_text" else {})}]}
    if isinstance(item, ReasoningItem):
        return {"type": "reasoning", "id": item.id or new_id("rs"), "status": item.status,
                "summary": [{"type": "summary_text", "text": p.text} for p in item.summary],
                "content": [{"type": "reasoning_text", "text": p.text}
                            for p in item.content or ()]}
    if isinstance(item, FunctionCallItem):
        return {"type": "function_call", "id": item.id or new_id("fc"), "call_id": item.call_id,
                "name": item.name, "arguments": item.arguments,
                "status": item.status or "completed"}
    return {"type": "function_call_output", "id": item.id or new_id("fco"),
            "call_id": item.call_id, "output": item.text(), "status": item.status or "completed"}


def _chat_messages(items: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """Items (as `_item_json` writes them) as chat messages: an assistant's function calls
    join the assistant message before them (a reply that says something, then calls), a
    call's output is a `tool` message; a reasoning item is left out (an earlier turn's
    thinking is not shown to the model again)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            continue
        if kind == "message":
            text = "".join(part["text"] for part in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last.get("content") or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": item["output"]})
    return messages


def _chat_tool(index: int, raw: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, dict) or raw.get("type") != "function":
        kind = raw.get("type") if isinstance(raw, dict) else None
        raise BadRequest(f"'tools[{index}]' must be a function tool (type {kind!r} is not "
                         "supported).", param=f"tools[{index}].type")
    tool = validate(FunctionTool, raw, where=("tools", index))
    function: dict[str, Any] = {"name": tool.name}
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


# Chat completions' names, as its errors write them, and the Responses API's.
_RENAMES = ((re.compile(r"messages(\[\d+\])?(\.[\w\[\].]+)?"), "input"),
            (re.compile(r"response_format(\.json_schema)?"), "text.format"),
            (re.compile(r"\bmax_tokens\b"), "max_output_tokens"),
            (re.compile(r"tools\[(\d+)\]\.function\.(\w+)"), r"tools[\1].\2"))


def responses_names(text: str) -> str:
    """A chat completions error's names (`messages`, `response_format`) as this API's."""
    for pattern, name in _RENAMES:
        text = pattern.sub(name, text)
    return text
