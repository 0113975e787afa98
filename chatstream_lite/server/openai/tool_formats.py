"""Function calling: how tool definitions reach the model, and how its calls are read back.

    >>> fmt = tool_format(template)                   # GENERIC, or the template's own format
    >>> asked = ToolRequest((Tool("get_weather", schema),), choice="required")
    >>> messages = fmt.messages(messages, asked)      # what the chat template renders
    >>> grammar = fmt.grammar(asked, json_grammar)    # GBNF, or None (unconstrained)
    >>> decoder = fmt.decoder(asked)
    >>> shown = decoder.feed(piece)                   # text to show as it comes (may be "")
    >>> reply = decoder.finish()                      # the calls, and any text held back

Two ways, as llama-server has them:
- **Generic**, for a template that renders no tools (SmolLM2's): the system turn describes
  the tools, and a grammar holds the reply to JSON, `{"tool_call": {"name", "arguments"}}`
  (`{"tool_calls": [...]}` with parallel calls) or `{"response": "text"}`; "required" or a
  named function leaves the call only. Calls and results in the history become text in the
  same JSON shapes (minja's polyfills, which llama-server uses).
- **Native**, for the families llama-server knows by their template (Hermes/Qwen
  `<tool_call>`, Llama 3.x JSON, Mistral `[TOOL_CALLS]`): the template gets the tools and
  renders the history itself; the reply is read in the family's format. "required" or a named
  function is held by a grammar in that format; "auto" is not constrained, so a call the
  model botches stays text.
Either way a call's arguments come back as JSON text that parses; a grammar holds them to the
tool's schema. The decoders read a reply piece by piece, so a stream shows text as it comes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ...engine.protocol import Grammars
from ...engine.template import ChatTemplate, Conversation, Message

__all__ = ["GENERIC", "LARK_JSON_STYLE", "MAX_HEAD", "RESPOND_IN_JSON", "RESPOND_WITH_CALL",
           "TOOLS_INTRO", "Choice", "HermesFormat", "JSONGrammar", "Llama3Format",
           "MistralFormat", "read_reply", "Reply", "ReplyDecoder", "Tool", "tool_format",
           "ToolCall", "ToolFormat", "ToolRequest"]

Choice = Literal["auto", "required", "none"]
JSONGrammar = Grammars     # ModelInfo.json_grammar: JSON Schema or Lark text -> a grammar

# llama-server's words (common/chat.cpp, and minja's tool polyfill).
RESPOND_IN_JSON = ("Respond in JSON format, either with `{call}` (a request to call tools) or "
                   "with `response` reply to the user's request")
RESPOND_WITH_CALL = "Respond in JSON format, with `{call}` (a request to call tools)"
TOOLS_INTRO = "You can call any of the following tools to satisfy the user's requests: "


@dataclass(frozen=True)
class Tool:
    """One function the model may call; `parameters` is the JSON Schema of its arguments."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None

    def openai(self) -> dict[str, Any]:
        """As OpenAI's `tools` list holds it, which is how chat templates take it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    """What a request asks: its tools, `tool_choice` (`name` for a named function, which is
    "required" with that one tool) and whether one reply may hold several calls."""

    tools: tuple[Tool, ...]
    choice: Choice = "auto"
    name: str | None = None
    parallel: bool = False

    @property
    def callable(self) -> tuple[Tool, ...]:
        """The tools the reply may call."""
        if self.choice == "none":
            return ()
        if self.name is not None:
            return tuple(t for t in self.tools if t.name == self.name)
        return self.tools


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str          # JSON text, as OpenAI's `function.arguments`


@dataclass
class Reply:
    """The end of a reply: text not yet shown (all of it, for a call that did not parse)
    and the calls."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ReplyDecoder(Protocol):
    def feed(self, text: str) -> str:
        """Take the next piece of the reply; return the text that can be shown now."""

    def finish(self, cut: bool = False) -> Reply:
        """The reply has ended: the rest of its text, and its calls (`cut`: by max_tokens,
        so a call may be written only in part)."""


def read_reply(decoder: ReplyDecoder, text: str, *, cut: bool = False) -> Reply:
    """A whole reply at once: its text (shown or not) and its calls."""
    shown = decoder.feed(text)
    end = decoder.finish(cut)
    return Reply(shown + end.content, end.calls)


class ToolFormat:
    """How one family of templates takes tools and writes calls. This base class is the
    generic format; the native ones override what differs."""

    name = "generic"
    call_key = "tool_call"       # what the reply's JSON calls one call

    def new_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    # -- the prompt ---------------------------------------------------------------------------
    def messages(self, messages: list[Message], asked: ToolRequest) -> list[Message]:
        """The conversation as the template renders it: calls and results as JSON text, and
        the tools (when the reply may call one) described in the system turn."""
        names = _call_names(messages)
        rendered: list[Message] = []
        for message in messages:
            if message.get("tool_calls"):
                rendered.append({"role": "assistant", "content": _calls_text(message)})
            elif message["role"] == "tool":
                rendered.append({"role": "user", "content": _result_text(message, names)})
            else:
                rendered.append({"role": message["role"], "content": message["content"]})
        if not asked.callable:
            return rendered
        call = "tool_calls" if asked.parallel else "tool_call"
        respond = (RESPOND_IN_JSON if asked.choice == "auto" and asked.name is None
                   else RESPOND_WITH_CALL).format(call=call)
        tools = json.dumps([t.openai() for t in asked.tools], indent=2, ensure_ascii=False)
        example = {"name": "tool_name", "arguments": {"arg1": "some_value"}}
        shown = {call: [example] if asked.parallel else example}
        system = (f"{respond}\n\n{TOOLS_INTRO}{tools}\n\nExample tool call syntax:\n\n"
                  f"{json.dumps(shown, indent=2)}\n\n")
        if rendered and rendered[0]["role"] == "system":
            return [{"role": "system", "content": f"{rendered[0]['content']}\n\n{system}"},
                    *rendered[1:]]
        return [{"role": "system", "content": system}, *rendered]

    # -- the grammar --------------------------------------------------------------------------
    def grammar(self, asked: ToolRequest, json_grammar: JSONGrammar) -> str | None:
        """The grammar for the reply (`json_grammar` makes it of JSON Schema or Lark text);
        None when it is free. Raises ValueError for a schema the grammar cannot hold."""
        if not asked.callable:
            return None
        calls = [_call_schema(t, "arguments") for t in asked.callable]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if asked.parallel:
            schema: dict[str, Any] = _object(
                {"tool_calls": {"type": "array", "items": one, "minItems": 1}})
        else:
            schema = _object({"tool_call": one})
        if asked.choice == "auto" and asked.name is None:
            schema = {"anyOf": [schema, _object({"response": {"type": "string"}})]}
        return json_grammar(json.dumps(schema))

    # -- the reply ----------------------------------------------------------------------------
    def decoder(self, asked: ToolRequest) -> ReplyDecoder:
        return _GenericDecoder(self, asked)

    def calls(self, text: str, asked: ToolRequest) -> list[ToolCall] | None:
        """The calls in `text` (the part of the reply that holds them), None when it holds
        none that parse."""
        value = _json(text)
        if not isinstance(value, dict):
            return None
        if isinstance(value.get("tool_call"), dict):
            return self._checked([value["tool_call"]], asked, "arguments")
        if isinstance(value.get("tool_calls"), list):
            return self._checked(value["tool_calls"], asked, "arguments")
        return None

    def partial_calls(self, text: str, asked: ToolRequest) -> list[ToolCall]:
        """The calls of a reply cut by max_tokens, as OpenAI returns a cut call: each call
        whose name was written whole, its arguments as far as they go (JSON only when they
        were finished). Empty when no offered tool's name was written whole."""
        names = {t.name for t in asked.callable}
        heads = [h for h in _PARTIAL_HEAD.finditer(text) if h.group(1) in names]
        calls: list[ToolCall] = []
        for k, head in enumerate(heads):
            raw = text[head.end():heads[k + 1].start() if k + 1 < len(heads) else len(text)]
            try:
                value, _ = _DECODER.raw_decode(raw)
            except ValueError:
                value = None
            arguments = json.dumps(_clean(value), ensure_ascii=False) \
                if isinstance(value, dict) else raw.rstrip()
            calls.append(ToolCall(self.new_id(), head.group(1), arguments))
        return calls

    def _checked(self, raw: list[Any], asked: ToolRequest, key: str) -> list[ToolCall] | None:
        """Calls of tools the request offered, with arguments that are a JSON object."""
        names = {t.name for t in asked.callable}
        calls: list[ToolCall] = []
        for call in raw:
            if not (isinstance(call, dict) and call.get("name") in names
                    and isinstance(call.get(key, {}), dict)):
                return None
            arguments = json.dumps(_clean(call.get(key, {})), ensure_ascii=False)
            calls.append(ToolCall(self.new_id(), call["name"], arguments))
        return calls or None


class HermesFormat(ToolFormat):
    """Hermes 2 Pro, Qwen 2.5/3 and their kin: `<tool_call>\\n{"name": ..., "arguments":
    {...}}\\n</tool_call>` blocks, after any text."""

    name = "hermes"
    start = "<tool_call>"

    def messages(self, messages: list[Message], asked: ToolRequest) -> list[Message]:
        return _native(messages, asked)

    def grammar(self, asked: ToolRequest, json_grammar: JSONGrammar) -> str | None:
        calls = [_call_schema(t, "arguments") for t in asked.callable]
        if not calls:
            return None
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        forced = asked.choice == "required" or asked.name is not None
        # A call is `<tool_call>`, JSON, `</tool_call>`. With "auto" any text may come first
        # (text that never holds the marker), and the grammar holds the reply from the
        # marker on: the lazy grammar llama-server triggers on the same marker.
        call = f'call: "\\n" {_lark_json(one)} "\\n</tool_call>"\n'
        more = ' ("\\n<tool_call>" call)*' if asked.parallel else ""
        if forced:
            return json_grammar.lark(f'start: "<tool_call>" call{more}\n{call}')
        return json_grammar.lark(f"start: TEXT | opener call{more}\n{call}"
                                 "opener[lazy]: /(.|\\n)*<tool_call>/\n"
                                 "TEXT: /(.|\\n)*/ & ~/(.|\\n)*<tool_call>(.|\\n)*/\n")

    def decoder(self, asked: ToolRequest) -> ReplyDecoder:
        return _MarkerDecoder(self, asked, self.start)

    def calls(self, text: str, asked: ToolRequest) -> list[ToolCall] | None:
        blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.DOTALL)
        if not blocks or text.count(self.start) != len(blocks):
            return None
        values = [_json(b) for b in blocks]
        return self._checked(values, asked, "arguments")

    def rest(self, text: str) -> str:
        """The text of a reply around its call blocks."""
        return re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.DOTALL).strip()


class Llama3Format(ToolFormat):
    """Llama 3.1-3.3's JSON tool calls: the reply is `{"name": ..., "parameters": {...}}`."""

    name = "llama3"
    opener = "{"
    key = "parameters"
    control_opener = False      # a call opens with a control token (Mistral's [TOOL_CALLS])

    def messages(self, messages: list[Message], asked: ToolRequest) -> list[Message]:
        return _native(messages, asked)

    def grammar(self, asked: ToolRequest, json_grammar: JSONGrammar) -> str | None:
        if not asked.callable:
            return None
        if asked.choice != "required" and asked.name is None:
            if self.control_opener:
                # Mistral's "auto" stays free: its calls open with a control token, which
                # a text grammar would forbid.
                return None
            # "auto": a reply that opens as a call (its first character) is held to one;
            # any other is text, free (the decoder reads it the same way).
            opener = json.dumps(self.opener)
            return json_grammar.lark(f"start: TEXT | {_lark_json(self._schema(asked))}\n"
                                     f"TEXT: /[^{re.escape(self.opener)}\\s](.|\\n)*/\n"
                                     f"// a reply opening with {opener} is a call\n")
        return json_grammar(json.dumps(self._schema(asked)))

    def _schema(self, asked: ToolRequest) -> dict[str, Any]:
        calls = [_call_schema(t, self.key) for t in asked.callable]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def decoder(self, asked: ToolRequest) -> ReplyDecoder:
        return _LeadingDecoder(self, asked, self.opener)

    def calls(self, text: str, asked: ToolRequest) -> list[ToolCall] | None:
        value = _json(text)
        if isinstance(value, dict) and "arguments" in value and self.key not in value:
            return self._checked([value], asked, "arguments")
        return self._checked([value], asked, self.key)


class MistralFormat(Llama3Format):
    """Mistral's `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]`. The control
    token itself never reaches the text (control tokens are not shown), so a reply that is
    a JSON array of calls is read as calls."""

    name = "mistral"
    opener = "["
    key = "arguments"
    control_opener = True

    def new_id(self) -> str:
        return uuid.uuid4().hex[:9]     # Mistral's templates check for 9 characters

    def _schema(self, asked: ToolRequest) -> dict[str, Any]:
        items = super()._schema(asked)
        array: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
        if not asked.parallel:
            array["maxItems"] = 1
        return array

    def calls(self, text: str, asked: ToolRequest) -> list[ToolCall] | None:
        value = _json(text)
        return self._checked(value, asked, self.key) if isinstance(value, list) else None


GENERIC = ToolFormat()


def tool_format(template: ChatTemplate) -> ToolFormat:
    """The format of a template's family, told by its text as llama-server tells it; the
    generic format for a template that renders no tools or is of no family we read."""
    source = template.source
    if not template.supports_tools:
        return GENERIC
    if "[TOOL_CALLS]" in source:
        return MistralFormat()
    if "<tool_call>" in source:
        return HermesFormat()
    if "<|start_header_id|>" in source:
        return Llama3Format()
    return GENERIC


# -- decoders ----------------------------------------------------------------------------------
_HEAD = re.compile(r'\s*\{\s*"(tool_calls?|response)"\s*:\s*("?)')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t"}
MAX_HEAD = 64        # characters read before a generic reply must have shown its branch
# Where a call's arguments begin, in every format: its name, then its arguments' key.
_PARTIAL_HEAD = re.compile(r'"name"\s*:\s*"([^"\\]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_DECODER = json.JSONDecoder(strict=False)


class _GenericDecoder:
    """A generic reply: `{"response": "..."}` is shown as its string, unescaped, as it comes;
    a call is held until the reply ends."""

    def __init__(self, fmt: ToolFormat, asked: ToolRequest) -> None:
        self.fmt = fmt
        self.asked = asked
        self.state: Literal["head", "response", "after", "calls"] = "head"
        self.text = ""          # the whole reply so far
        self.pending = ""       # response text not yet unescaped

    def feed(self, text: str) -> str:
        self.text += text
        if self.state == "head":
            match = _HEAD.match(self.text)
            if match is None:
                if len(self.text) > MAX_HEAD:
                    self.state = "calls"
                return ""
            if match.group(1) != "response":
                self.state = "calls"
                return ""
            if not match.group(2):
                return ""       # the string has not opened yet
            self.state = "response"
            text = self.text[match.end():]
        if self.state != "response":
            return ""
        shown, self.pending, closed = _unescape(self.pending + text)
        if closed:
            self.state = "after"
        return shown

    def finish(self, cut: bool = False) -> Reply:
        if self.state in ("response", "after"):
            return Reply()
        calls = self.fmt.calls(self.text, self.asked)
        if not calls and cut and self.state == "calls":
            calls = self.fmt.partial_calls(self.text, self.asked)
        return Reply(calls=calls) if calls else Reply(self.text)


def _unescape(text: str) -> tuple[str, str, bool]:
    """Decode the inside of a JSON string as far as it goes: (text, what is left to decode,
    whether the string closed). A lone surrogate escape becomes U+FFFD."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == '"':
            return "".join(out), "", True
        if char != "\\":
            out.append(char)
            i += 1
            continue
        if i + 1 >= len(text):
            break
        kind = text[i + 1]
        if kind != "u":
            out.append(_ESCAPES.get(kind, kind))
            i += 2
            continue
        if i + 6 > len(text):
            break
        code = _hex(text[i + 2:i + 6])
        if 0xD800 <= code < 0xDC00:
            follow = text[i + 6:i + 8]
            if len(text) < i + 12 and "\\u".startswith(follow):
                break        # wait for the low half
            low = _hex(text[i + 8:i + 12]) if follow == "\\u" else -1
            if 0xDC00 <= low < 0xE000:
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                i += 12
                continue
            out.append("\ufffd")
        else:
            out.append("\ufffd" if 0xDC00 <= code < 0xE000 or code < 0 else chr(code))
        i += 6
    return "".join(out), text[i:], False


def _hex(digits: str) -> int:
    try:
        return int(digits, 16) if len(digits) == 4 else -1
    except ValueError:
        return -1


class _MarkerDecoder:
    """Text is shown until a call's start marker; from there the reply is held, and read
    as calls when it ends (as text when they do not parse)."""

    def __init__(self, fmt: HermesFormat, asked: ToolRequest, marker: str) -> None:
        self.fmt = fmt
        self.asked = asked
        self.marker = marker
        self.held = ""
        self.calling = False

    def feed(self, text: str) -> str:
        self.held += text
        if self.calling:
            return ""
        at = self.held.find(self.marker)
        if at >= 0:
            shown, self.held = self.held[:at], self.held[at:]
            self.calling = True
            return shown
        keep = _partial_suffix(self.held, self.marker)
        shown = self.held[:len(self.held) - keep]
        self.held = self.held[len(shown):]
        return shown

    def finish(self, cut: bool = False) -> Reply:
        calls = self.fmt.calls(self.held, self.asked) if self.calling else None
        if not calls and cut and self.calling:
            partial = self.fmt.partial_calls(self.held, self.asked)
            if partial:
                return Reply("", partial)          # the held text is the calls' own
        if not calls:
            return Reply(self.held)
        return Reply(self.fmt.rest(self.held), calls)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class _LeadingDecoder:
    """A reply that opens with `opener` (after white space) is held and read as calls when
    it ends; any other is shown as it comes."""

    def __init__(self, fmt: ToolFormat, asked: ToolRequest, opener: str) -> None:
        self.fmt = fmt
        self.asked = asked
        self.opener = opener
        self.held = ""
        self.state: Literal["head", "text", "calls"] = "head"

    def feed(self, text: str) -> str:
        if self.state == "text":
            return text
        self.held += text
        if self.state == "calls" or not self.held.strip():
            return ""
        if self.held.lstrip().startswith(self.opener):
            self.state = "calls"
            return ""
        self.state = "text"
        shown, self.held = self.held, ""
        return shown

    def finish(self, cut: bool = False) -> Reply:
        calls = self.fmt.calls(self.held, self.asked) if self.state == "calls" else None
        if not calls and cut and self.state == "calls":
            calls = self.fmt.partial_calls(self.held, self.asked)
        return Reply(calls=calls) if calls else Reply(self.held)


# -- helpers -----------------------------------------------------------------------------------
def _native(messages: list[Message], asked: ToolRequest) -> list[Message]:
    """A native template renders calls and results itself; it gets the tools when the reply
    may call one."""
    if not asked.callable:
        return messages
    return Conversation(messages, [t.openai() for t in asked.tools])


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties)}


def _call_schema(tool: Tool, key: str) -> dict[str, Any]:
    return _object({"name": {"type": "string", "const": tool.name}, key: tool.parameters})


def _json(text: str) -> Any:
    try:
        # strict=False: llama.cpp's JSON grammar lets raw control characters into strings.
        return json.loads(text, strict=False)
    except ValueError:
        return None


def _clean(value: Any) -> Any:
    """`value` with lone surrogates (a grammar allows a lone "\\ud800" escape) as U+FFFD,
    so that it can be written as UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _call_names(messages: list[Message]) -> dict[str, str]:
    """Each call id in the history, and the name of the tool it called."""
    return {call["id"]: call["function"]["name"]
            for m in messages for call in m.get("tool_calls") or []}


def _calls_text(message: Message) -> str:
    """An assistant's calls as text (minja's polyfill, which llama-server renders)."""
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"],
              "id": c["id"]} for c in message.get("tool_calls") or []]
    shown: dict[str, Any] = {"tool_calls": calls}
    if message["content"]:
        shown["content"] = message["content"]
    return json.dumps(shown, indent=2, ensure_ascii=False)


def _result_text(message: Message, names: dict[str, str]) -> str:
    """A tool's result as text (minja's polyfill)."""
    result: dict[str, Any] = {}
    name = message.get("name") or names.get(message.get("tool_call_id", ""))
    if name:
        result["tool"] = name
    result["content"] = message["content"]
    if "tool_call_id" in message:
        result["tool_call_id"] = message["tool_call_id"]
    return json.dumps({"tool_response": result}, indent=2, ensure_ascii=False)


# JSON inside a Lark grammar, written as the JSON Schema grammars are (engine/llama/guidance.py
# JSON_OPTIONS): ", " and ": ", no free white space for a small model to loop in.
LARK_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lark_json(schema: dict[str, Any]) -> str:
    """`schema` as an inline JSON Schema of a Lark grammar (llguidance's `%json`)."""
    return "%json " + json.dumps({**schema, "x-guidance": LARK_JSON_STYLE})
