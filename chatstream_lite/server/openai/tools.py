"""Function calling on the OpenAI API: `tools`, `tool_choice`, `parallel_tool_calls` and the
tool fields of `messages` in; `message.tool_calls` (or `tool_calls` deltas) out.

    asked = parse_tools(data, model)                  # a ToolRequest; 400s name their param
    extra = message_tool_fields(message, role, where)   # an assistant's calls, a result's id
    plan = ToolPlan(tool_format(model), asked)        # how the reply is read (framing.py)

What the model is shown and how its reply is read is the engine's (`engine/tools.py`); this
module checks what a client sends and shapes what it gets, as OpenAI does: a call's
`function.arguments` is JSON text, `finish_reason` is "tool_calls", and a stream sends each
call as two deltas (its index, id, type and name; then its arguments) once the reply has
ended, since a call is only known to parse then. Text (the generic format's `response`,
or what a native reply writes before its calls) streams as it comes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, cast

from ...engine import Message, ModelInfo
from ...errors import BadRequest
from .tool_formats import (
    GENERIC,
    Choice,
    ReplyDecoder,
    ToolFormat,
    ToolRequest,
)
from .tool_formats import Tool as ToolSpec
from .tool_formats import tool_format as format_of

__all__ = ["CALL_ID", "CHOICES", "MAX_TOOLS", "MAX_TOOLS_CHARS", "TOOL_NAME", "check_tool_history",
           "message_tool_fields", "parse_tools", "tool_format", "ToolPlan"]

MAX_TOOLS = 128                   # OpenAI's limit
MAX_TOOLS_CHARS = 64 * 1024       # the definitions as JSON text, all tools together
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# A call id is rendered as the template's own text (templates check its length), so it may
# hold no text that could read as a control token.
CALL_ID = re.compile(r"[a-zA-Z0-9_.:-]{1,128}")
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolPlan:
    """How one request's reply is read: the template's format and what the request asked."""

    format: ToolFormat
    asked: ToolRequest

    def decoder(self) -> ReplyDecoder:
        return self.format.decoder(self.asked)


def tool_format(model: ModelInfo | None) -> ToolFormat:
    return format_of(model.chat_template) if model is not None else GENERIC


def parse_tools(data: dict[str, Any], model: ModelInfo | None) -> ToolRequest:
    """`tools`, `tool_choice` and `parallel_tool_calls`, checked. Without `parallel_tool_calls`
    a reply holds one call (llama-server's default: small models asked for a list of calls
    tend to go on calling)."""
    raw = data.get("tools")
    tools = _tools(raw, model) if raw is not None else ()
    choice, name = _tool_choice(data.get("tool_choice"), tools)
    parallel = data.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("'parallel_tool_calls' must be true or false.",
                         param="parallel_tool_calls")
    return ToolRequest(tools, choice, name, bool(parallel))


def _tools(raw: Any, model: ModelInfo | None) -> tuple[ToolSpec, ...]:
    if not isinstance(raw, list) or not raw or len(raw) > MAX_TOOLS:
        raise BadRequest(f"'tools' must be a list of 1 to {MAX_TOOLS} tools.", param="tools")
    if len(json.dumps(raw, ensure_ascii=False)) > MAX_TOOLS_CHARS:
        raise BadRequest(f"'tools' is too large: at most {MAX_TOOLS_CHARS} characters of "
                         "JSON in all.", param="tools")
    tools: list[ToolSpec] = []
    for index, tool in enumerate(raw):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(
                tool.get("function"), dict):
            raise BadRequest(f"'{where}' must be {{\"type\": \"function\", \"function\": "
                             "{...}} (only function tools are supported).", param=where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise BadRequest(f"'{where}.function.name' must be 1 to 64 letters, digits, "
                             "underscores or dashes.", param=f"{where}.function.name")
        if any(t.name == name for t in tools):
            raise BadRequest(f"Two tools are named {name!r}.", param=f"{where}.function.name")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise BadRequest(f"'{where}.function.description' must be a string.",
                             param=f"{where}.function.description")
        parameters = _parameters(function.get("parameters"), f"{where}.function.parameters",
                                 model)
        tools.append(ToolSpec(name, parameters, description))
    return tuple(tools)


def _parameters(value: Any, where: str, model: ModelInfo | None) -> dict[str, Any]:
    """A tool's parameters: a JSON Schema for an object (none: no arguments), that the
    grammar can hold."""
    if value is None:
        return {"type": "object", "properties": {}}
    if not isinstance(value, dict) or value.get("type", "object") != "object":
        raise BadRequest(f"'{where}' must be a JSON Schema of an object.", param=where)
    if model is not None and model.json_grammar is not None:
        try:
            model.json_grammar(json.dumps(value))
        except ValueError as error:
            raise BadRequest(f"'{where}' is not supported: {error}", param=where) from None
    return value


def _tool_choice(value: Any, tools: tuple[ToolSpec, ...]) -> tuple[Choice, str | None]:
    if value is None:
        return ("auto" if tools else "none"), None
    if not tools:
        if value == "none":
            return "none", None
        raise BadRequest("'tool_choice' needs 'tools'.", param="tool_choice")
    if value in CHOICES:
        return cast(Choice, value), None
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(value, dict) and value.get("type") == "function"
            and isinstance(name, str)):
        raise BadRequest("'tool_choice' must be none, auto, required or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                         param="tool_choice")
    if not any(t.name == name for t in tools):
        raise BadRequest(f"'tool_choice' names {name!r}, which is not in 'tools'.",
                         param="tool_choice")
    return "required", name


# -- messages --------------------------------------------------------------------------------
def message_tool_fields(message: dict[str, Any], role: str, where: str) -> dict[str, Any]:
    """The tool fields of one message, as the engine's `Message` holds them: an assistant's
    `tool_calls` (arguments parsed where they are JSON), a tool result's `tool_call_id`."""
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id):
            raise BadRequest(f"'{where}.tool_call_id' must be the id of an earlier tool call.",
                             param=f"{where}.tool_call_id")
        return {"tool_call_id": call_id}
    calls = message.get("tool_calls")
    if role != "assistant" or calls is None:
        return {}
    if not isinstance(calls, list):
        raise BadRequest(f"'{where}.tool_calls' must be a list.", param=f"{where}.tool_calls")
    parsed: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(call, dict) and call.get("type", "function") == "function"
                and isinstance(function, dict)):
            raise BadRequest(f"'{at}' must be a function call.", param=at)
        call_id, name = call.get("id"), function.get("name")
        arguments = function.get("arguments", "{}")
        if not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id):
            raise BadRequest(f"'{at}.id' must be 1 to 128 letters, digits or _.:-",
                             param=f"{at}.id")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise BadRequest(f"'{at}.function.name' must be a tool name.",
                             param=f"{at}.function.name")
        if not isinstance(arguments, str):
            raise BadRequest(f"'{at}.function.arguments' must be JSON text.",
                             param=f"{at}.function.arguments")
        parsed.append({"id": call_id, "type": "function",
                       "function": {"name": name, "arguments": _arguments(arguments)}})
    return {"tool_calls": parsed} if parsed else {}


def _arguments(text: str) -> Any:
    """Templates render arguments as an object (llama-server parses them too); text that
    is not JSON stays text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_tool_history(turns: list[Message]) -> None:
    """Each tool result answers an earlier call (as OpenAI requires); it gets that tool's
    name, which templates show. A call is answered before the conversation goes on."""
    names: dict[str, str] = {}
    for index, message in enumerate(turns):
        for call in message.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
        if message["role"] == "tool":
            call_id = message.get("tool_call_id", "")
            if call_id not in names:
                raise BadRequest(f"Message {index} answers tool call {call_id!r}, which no "
                                 "earlier assistant message made.", param="messages")
            message["name"] = names[call_id]
