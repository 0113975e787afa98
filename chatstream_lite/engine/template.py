"""A model's chat template (the Jinja2 text in the GGUF's `tokenizer.chat_template`).

    >>> template = ChatTemplate(source, bos_token="<s>", eos_token="<|im_end|>")
    >>> template.render([{"role": "user", "content": "Hi"}]).text
    >>> template.layout(messages).parts      # ["<|im_start|>user\\n", 0, "<|im_end|>\\n..."]

Rendered as llama-cpp-python's `Jinja2ChatFormatter` renders it (sandboxed Jinja2, the same
options, globals and filters), without importing llama_cpp: the mock engine and the request
path use it too.

`layout()` is why this module exists. It renders the conversation with every message
content replaced by a marker, which tells the template's own text (tokenized with special
tokens parsed: `<|im_start|>` is one control token) from the message contents (tokenized as
plain text, so a user who types `<|im_end|>` gets those characters, not a turn of their own).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NoReturn, TypedDict

import jinja2
import jinja2.ext
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateRefused

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: list[str]          # the template's end-of-turn text, never shown to the user


# A part of a layout: template text, or the index of the message whose content goes there.
Part = str | int


@dataclass(frozen=True)
class Layout:
    parts: list[Part]
    # False when the template changes contents as it renders them (trims them, say), so the
    # marked rendering is not the real one; see `ChatTemplate.layout`.
    exact: bool
    text: str                # the real rendering


# Private-use characters: no template writes them, and a content that holds them is
# replaced by its marker before rendering, so only our markers can match.
_MARK = re.compile("\ue000(\\d+)\ue001")


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

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages, eos_token=self.eos_token, bos_token=self.bos_token,
                raise_exception=_raise_exception, add_generation_prompt=add_generation_prompt,
                functions=None, function_call=None, tools=None, tool_choice=None,
                strftime_now=_strftime_now)
        except TemplateRefused:
            raise
        except (jinja2.TemplateError, ValueError, TypeError, LookupError) as error:
            # Templates index and compare messages freely; a conversation they cannot take
            # (roles out of order, say) is the request's problem, not the server's.
            raise TemplateRefused(
                f"The model's chat template cannot render this conversation: {error}") from None

    def render(self, messages: list[Message], *,
               add_generation_prompt: bool = True) -> RenderedPrompt:
        text = self._render([dict(m) for m in messages], add_generation_prompt)
        return RenderedPrompt(text, [self.eos_token] if self.eos_token else [])

    def layout(self, messages: list[Message], *, add_generation_prompt: bool = True) -> Layout:
        """The rendering as template text and message indices (where each content goes)."""
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        parts: list[Part] = []
        position = 0
        marked_text = self._render(marked, add_generation_prompt)
        for match in _MARK.finditer(marked_text):
            if match.start() > position:
                parts.append(marked_text[position:match.start()])
            parts.append(int(match.group(1)))
            position = match.end()
        if position < len(marked_text):
            parts.append(marked_text[position:])
        text = self.render(messages, add_generation_prompt=add_generation_prompt).text
        joined = "".join(p if isinstance(p, str) else messages[p]["content"] for p in parts)
        return Layout(parts, joined == text, text)
