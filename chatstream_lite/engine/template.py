"""A model's chat template (the Jinja2 text in the GGUF's `tokenizer.chat_template`).

    >>> template = ChatTemplate(source, bos_token="<s>", eos_token="<|im_end|>")
    >>> template.render([{"role": "user", "content": "Hi"}]).text
    >>> template.layout(messages).parts      # ["<|im_start|>user\\n", 0, "<|im_end|>\\n..."]
    >>> template.layout(messages, tools=tools, continue_final=True)

Rendered as llama-cpp-python's `Jinja2ChatFormatter` renders it (sandboxed Jinja2, the same
options, globals and filters), without importing llama_cpp: the mock engine and the request
path use it too.

`layout()` is why this module exists. It renders the conversation with every message
content replaced by a marker, which tells the template's own text (tokenized with special
tokens parsed: `<|im_start|>` is one control token) from the message contents (tokenized as
plain text, so a user who types `<|im_end|>` gets those characters, not a turn of their own).
The same holds for every other piece of request text a template renders: tool definitions
(names, descriptions, schema strings), the name and arguments of a tool call in the history,
a tool result. Only what is checked to be plain (a tool call's id, JSON Schema keywords and
types) is left to the template as it is.

`continue_final` renders a conversation whose last message is the assistant's as the start of
that reply (prefill): no generation prompt, and nothing of the template's after that content.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NoReturn, TypedDict

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateRefused

__all__ = ["RESERVED_VARIABLES", "ChatTemplate", "Conversation", "Data", "Layout", "Message",
           "message_chars", "Part", "RenderedPrompt", "Role"]

Role = Literal["system", "user", "assistant", "tool"]


class _Message(TypedDict):
    role: Role
    content: str


class Message(_Message, total=False):
    """One message. The optional fields are function calling's, as chat templates read them:
    an assistant's `tool_calls` (OpenAI's shape, `{"id", "type": "function", "function":
    {"name", "arguments"}}`, the arguments parsed from JSON where they parse), and a tool
    result's `tool_call_id` and `name` (role "tool")."""

    tool_calls: list[dict[str, Any]]
    tool_call_id: str
    name: str


class Conversation(list[Message]):
    """Messages, and the tool definitions (OpenAI's `tools`) that the chat template renders
    with them: function calling with a template that knows tools. A plain list has none.
    `template_kwargs` are more variables for the template (`{"enable_thinking": False}`).

        >>> Conversation(messages, tools=[{"type": "function", "function": {...}}])
    """

    def __init__(self, messages: list[Message], tools: list[dict[str, Any]],
                 template_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(messages)
        self.tools = tools
        self.template_kwargs = template_kwargs or {}


# The variables a template is rendered with: a request's template kwargs may not replace them.
RESERVED_VARIABLES = frozenset({
    "messages", "tools", "eos_token", "bos_token", "raise_exception", "add_generation_prompt",
    "functions", "function_call", "tool_choice", "strftime_now"})


def message_chars(message: Message) -> int:
    """How much text a message brings: its content, and its tool calls' names and arguments."""
    calls = message.get("tool_calls") or []
    return len(message["content"]) + sum(len(json.dumps(c, ensure_ascii=False)) for c in calls)


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: list[str]          # the template's end-of-turn text, never shown to the user


@dataclass(frozen=True)
class Data:
    """Request text other than a content (a tool's name, a call's argument, ...) that the
    template put here, as the template wrote it (JSON-escaped inside a `tojson`)."""

    text: str


# A part of a layout: template text, the index of the message whose content goes there, or
# other request text.
Part = str | int | Data


@dataclass(frozen=True)
class Layout:
    parts: list[Part]
    # False when the template changes contents as it renders them (trims them, say), so the
    # marked rendering is not the real one; see `ChatTemplate.layout`.
    exact: bool
    text: str                # the real rendering
    data: tuple[str, ...] = ()   # every request text marked as `Data`, as the request gave it


# Private-use characters: no template writes them, and a content that holds them is
# replaced by its marker before rendering, so only our markers can match. U+E000 marks a
# message's content, U+E002 any other request text.
_MARK = re.compile("([\ue000\ue002])(\\d+)\ue001")
_CONTENT, _DATA = "\ue000", "\ue002"

# JSON Schema keywords a template may test (`param.type == "string"`): left as they are in
# the marked rendering. Any other key of a schema is request text and marked.
_SCHEMA_KEYWORDS = frozenset({
    "$schema", "$id", "$ref", "$anchor", "$comment", "$defs", "definitions", "type", "enum",
    "const", "default", "examples", "title", "description", "properties", "required",
    "additionalProperties", "patternProperties", "propertyNames", "minProperties",
    "maxProperties", "items", "prefixItems", "additionalItems", "contains", "minItems",
    "maxItems", "uniqueItems", "minContains", "maxContains", "minLength", "maxLength",
    "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "anyOf", "oneOf", "allOf", "not", "if", "then", "else",
    "dependentRequired", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems",
    "nullable", "readOnly", "writeOnly", "deprecated", "contentEncoding", "contentMediaType",
})
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                        "dependentSchemas", "dependentRequired"})
_VALUES = frozenset({"enum", "const", "default", "examples"})
_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})


class _Marks:
    """Replaces request text with markers, one per distinct text (so that a template that
    compares two names, a `required` entry with a property, still finds them equal)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._index: dict[str, int] = {}

    def text(self, text: str) -> str:
        index = self._index.get(text)
        if index is None:
            index = self._index[text] = len(self.texts)
            self.texts.append(text)
        return f"{_DATA}{index}\ue001"

    def value(self, value: Any) -> Any:
        """Any JSON value: every string in it, keys included, marked."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return value

    def schema(self, schema: Any) -> Any:
        """A JSON Schema: keywords and type names kept, every other string marked."""
        if isinstance(schema, list):
            return [self.schema(s) for s in schema]
        if not isinstance(schema, dict):
            return self.value(schema)
        marked: dict[str, Any] = {}
        for key, value in schema.items():
            if key not in _SCHEMA_KEYWORDS:
                marked[self.text(key)] = self.value(value)
            elif key in _NAME_MAPS and isinstance(value, dict):
                marked[key] = {self.text(name): self.schema(sub) for name, sub in value.items()}
            elif key in _VALUES:
                marked[key] = self.value(value)
            elif key == "type" and (value in _JSON_TYPES or isinstance(value, list) and all(
                    t in _JSON_TYPES for t in value)):
                marked[key] = value
            else:
                marked[key] = self.schema(value)
        return marked

    def tool(self, tool: dict[str, Any]) -> dict[str, Any]:
        function = tool.get("function") or {}
        marked = {k: self.text(v) for k, v in function.items()
                  if k in ("name", "description") and isinstance(v, str)}
        if "parameters" in function:
            marked["parameters"] = self.schema(function["parameters"])
        return {"type": "function", "function": marked}

    def message(self, index: int, message: Message) -> dict[str, Any]:
        marked: dict[str, Any] = {**message, "content": f"{_CONTENT}{index}\ue001"}
        if "name" in message:
            marked["name"] = self.text(message["name"])
        if "tool_calls" in message:
            marked["tool_calls"] = [{
                **call, "function": {
                    "name": self.text(call["function"]["name"]),
                    "arguments": self.value(call["function"]["arguments"])}}
                for call in message["tool_calls"]]
        return marked


def _escaped(text: str) -> str:
    """`text` as a template's `tojson` writes it inside a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Pass-through for Hugging Face's `{% generation %}` tag, as llama-cpp-python does."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRefused(f"The model's chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A model's chat template; `render(messages)` gives the prompt text and its stop strings."""

    def __init__(self, template: str, *, bos_token: str, eos_token: str) -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        environment = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
            extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols])
        environment.filters["tojson"] = _tojson
        self._template = environment.from_string(template)

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Whether the template reads `tools` (renders tool definitions itself)."""
        return "tools" in jinja2.meta.find_undeclared_variables(
            self._template.environment.parse(self.source))

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None,
                template_kwargs: dict[str, Any] | None = None) -> str:
        # A request's variables first: the template's own cannot be replaced by them.
        extra = {k: v for k, v in (template_kwargs or {}).items()
                 if k not in RESERVED_VARIABLES}
        try:
            return self._template.render(
                **extra, messages=messages, eos_token=self.eos_token, bos_token=self.bos_token,
                raise_exception=_raise_exception, add_generation_prompt=add_generation_prompt,
                functions=None, function_call=None, tools=tools or None, tool_choice=None,
                strftime_now=_strftime_now)
        except TemplateRefused:
            raise
        except (jinja2.TemplateError, ValueError, TypeError, LookupError) as error:
            # Templates index and compare messages freely; a conversation they cannot take
            # (roles out of order, say) is the request's problem, not the server's.
            raise TemplateRefused(
                f"The model's chat template cannot render this conversation: {error}") from None

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None,
               template_kwargs: dict[str, Any] | None = None) -> RenderedPrompt:
        text = self._render([dict(m) for m in messages], add_generation_prompt, tools,
                            template_kwargs)
        return RenderedPrompt(text, [self.eos_token] if self.eos_token else [])

    def generation_prompt(self, template_kwargs: dict[str, Any] | None = None) -> str:
        """The text the template writes to open the assistant's reply (after a user turn):
        what tells whether it opens a thinking section itself. '' when it cannot tell."""
        if not template_kwargs:
            return self._plain_generation_prompt
        return self._generation_prompt(template_kwargs)

    @functools.cached_property
    def _plain_generation_prompt(self) -> str:
        return self._generation_prompt(None)

    def _generation_prompt(self, template_kwargs: dict[str, Any] | None) -> str:
        probe: list[dict[str, Any]] = [{"role": "user", "content": "\ue003"}]
        try:
            text = self._render(probe, True, None, template_kwargs)
        except TemplateRefused:
            return ""
        at = text.rfind("\ue003")
        return text[at + 1:] if at >= 0 else ""

    def layout(self, messages: list[Message], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None,
               continue_final: bool = False,
               template_kwargs: dict[str, Any] | None = None) -> Layout:
        """The rendering as template text, message indices (where each content goes) and
        other request text. `continue_final`: the last message, the assistant's, is the
        start of the reply; the rendering ends with its content. `template_kwargs` are
        request data like the contents: their strings are marked, never control tokens."""
        if continue_final:
            add_generation_prompt = False
        marks = _Marks()
        marked = [marks.message(i, m) for i, m in enumerate(messages)]
        marked_tools = [marks.tool(t) for t in tools] if tools else None
        # The variables' names are the template's; their values (strings in them) are data.
        marked_kwargs = {k: marks.value(v) for k, v in (template_kwargs or {}).items()}
        marked_text = self._render(marked, add_generation_prompt, marked_tools, marked_kwargs)
        text = self._render([dict(m) for m in messages], add_generation_prompt, tools,
                            template_kwargs)
        parts, exact = _align(marked_text, text, messages, marks.texts)
        if continue_final:
            parts, text = _cut_after_last(parts, text, messages, exact)
        return Layout(parts, exact, text, tuple(marks.texts))


def _align(marked: str, text: str, messages: list[Message], data: list[str]
           ) -> tuple[list[Part], bool]:
    """Split the marked rendering into parts, checking each against the real rendering
    `text`: exact when they join to it. Request text may stand there as it is or, inside a
    template's `tojson`, JSON-escaped; the real rendering says which."""
    pieces: list[str | tuple[str, int]] = []
    position = 0
    for match in _MARK.finditer(marked):
        if match.start() > position:
            pieces.append(marked[position:match.start()])
        pieces.append((match.group(1), int(match.group(2))))
        position = match.end()
    if position < len(marked):
        pieces.append(marked[position:])
    parts: list[Part] = []
    at = 0
    exact = True
    for i, piece in enumerate(pieces):
        after = pieces[i + 1] if i + 1 < len(pieces) else None
        if isinstance(piece, str):
            parts.append(piece)
            exact = exact and text.startswith(piece, at)
            at += len(piece)
            continue
        kind, index = piece
        if kind == _CONTENT:
            parts.append(index)
            content = messages[index]["content"]
            exact = exact and text.startswith(content, at)
            at += len(content)
            continue
        raw = data[index]
        written = raw
        for candidate in (raw, _escaped(raw)):
            if text.startswith(candidate, at) and (
                    not isinstance(after, str) or text.startswith(after, at + len(candidate))):
                written = candidate
                break
        else:
            exact = False
        parts.append(Data(written))
        at += len(written)
    return parts, exact and at == len(text)


def _cut_after_last(parts: list[Part], text: str, messages: list[Message], exact: bool
                    ) -> tuple[list[Part], str]:
    """The layout and text up to the end of the last message's content (prefill)."""
    last = len(messages) - 1
    content = messages[last]["content"]
    ends = [i for i, part in enumerate(parts) if isinstance(part, int) and part == last]
    cut = text.rfind(content) if content else -1
    if not ends or cut < 0:
        raise TemplateRefused("The model's chat template does not render the last assistant "
                              "message as it is, so the reply cannot continue it.")
    parts = parts[:ends[-1] + 1]
    if exact:
        return parts, "".join(p if isinstance(p, str) else p.text if isinstance(p, Data)
                              else messages[p]["content"] for p in parts)
    return parts, text[:cut + len(content)]
