"""Input preparation: a conversation becomes token ids that fit the context, off the engine thread.

    >>> check_limits(messages, max_messages=1024, max_chars=200_000)   # before anything else
    >>> prompt = prepare(messages, template, tokenizer, budget=n_ctx - max_new_tokens,
    ...                  drop_oldest=True, cancelled=job_was_cancelled)

Runs once per request in a worker thread (the vocabulary is read-only; llama-server
tokenizes in its HTTP threads too), so the thread that owns the model only decodes and
samples, and a huge request cannot stall the other streams.

Two rules:
- **Message contents never become control tokens.** The template's own text is tokenized
  with special-token parsing, every content without it (`ChatTemplate.layout`), and so is
  every other request text the template renders (tool definitions, calls, results). For a
  template that changes contents while rendering them (so the marked layout is not exact),
  the real rendering is tokenized whole, and a content that holds control-token text is
  refused instead.
- **Fitting is linear.** Each content and each piece of template text is tokenized once;
  the oldest turns are dropped by cumulative counts, and one more rendering confirms the
  result. (Dropping a turn at a time and tokenizing everything again was O(n^2): 1,000
  messages took 26 s on the engine thread.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol

from ..errors import (
    BadRequest,
    ClientClosedRequest,
    ContextLengthExceeded,
    PayloadTooLarge,
    PromptTooLong,
)
from .job import PlainPrompt, Prompt, PromptInput
from .template import ChatTemplate, Conversation, Data, Layout, Message, Part, message_chars

__all__ = ["MAX_FIT_ROUNDS", "check_limits", "check_message_count", "prepare", "prepare_plain",
           "Tokenizer"]

# How many times fitting may re-render after its estimate: a template whose text between
# messages depends on what is dropped can need one more turn dropped; never more than this.
MAX_FIT_ROUNDS = 8


class Tokenizer(Protocol):
    """Text to token ids; safe to call from any thread."""

    def tokenize(self, text: str, *, special: bool) -> list[int]: ...


def check_message_count(count: int, max_messages: int) -> None:
    """Refuse more than `max_messages` messages; a protocol calls it before validating any."""
    if count > max_messages:
        raise BadRequest(f"Too many messages: {count}; this server takes at most "
                         f"{max_messages} per request (max_messages).", param="messages")


def check_limits(messages: PromptInput, *, max_messages: int, max_chars: int) -> None:
    """Refuse what is too big to look at, before any rendering or tokenizing."""
    if isinstance(messages, PlainPrompt):
        if len(messages.text) > max_chars:
            raise PayloadTooLarge(f"The prompt holds {len(messages.text)} characters; this "
                                  f"server takes at most {max_chars} (max_input_chars).")
        return
    check_message_count(len(messages), max_messages)
    total = sum(message_chars(m) for m in messages)
    if isinstance(messages, Conversation):
        total += sum(len(json.dumps(t, ensure_ascii=False)) for t in messages.tools)
        total += len(json.dumps(messages.template_kwargs, ensure_ascii=False))
    if total > max_chars:
        raise PayloadTooLarge(f"The messages hold {total} characters; this server takes at "
                              f"most {max_chars} per request (max_input_chars).")


def prepare_plain(prompt: PlainPrompt, tokenizer: Tokenizer, *, budget: int,
                  bos: list[int], stops: tuple[str, ...] = ()) -> Prompt:
    """A plain-text prompt as token ids (after `bos`, the model's BOS when its vocabulary
    asks for one); one that does not fit `budget` is refused, never cut."""
    try:
        prompt.text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRequest(f"The prompt is not valid Unicode text (a lone surrogate at "
                         f"character {error.start}).", param="prompt") from None
    tokens = bos + tokenizer.tokenize(prompt.text, special=False)
    if len(tokens) <= len(bos):
        raise BadRequest("The prompt must not be empty.", param="prompt")
    if len(tokens) > budget:
        raise ContextLengthExceeded(
            f"The prompt needs {len(tokens)} tokens, but only {budget} fit in this model's "
            "context (n_ctx minus max_tokens). Shorten it or lower max_tokens.",
            param="prompt")
    return Prompt(tokens, 0, stops)


def prepare(messages: list[Message], template: ChatTemplate, tokenizer: Tokenizer, *,
            budget: int, drop_oldest: bool, cancelled: Callable[[], bool],
            stops: tuple[str, ...] = ()) -> Prompt:
    """`messages` as token ids in at most `budget` tokens; see the module docstring.

    With `drop_oldest`, whole turns (a user message and the replies after it) are dropped from
    the oldest on, never the system prompt and never the last message; without it, a
    conversation that does not fit is refused (`ContextLengthExceeded`).

    A `Conversation` gives the template its tool definitions too. A last message from the
    assistant is continued (prefill): the prompt ends with its content.
    """
    _check_text(messages)
    tools = messages.tools if isinstance(messages, Conversation) else None
    kwargs = messages.template_kwargs if isinstance(messages, Conversation) else None
    continue_final = messages[-1]["role"] == "assistant"
    encoder = _Encoder(messages, tokenizer, cancelled)
    layout = template.layout(messages, tools=tools, continue_final=continue_final,
                             template_kwargs=kwargs)
    if not layout.exact:
        return _fit_whole(messages, template, encoder, layout, budget=budget,
                          drop_oldest=drop_oldest, stops=stops)
    tokens = encoder.encode(layout.parts, range(len(messages)))
    if len(tokens) <= budget:
        return Prompt(tokens, 0, stops)
    if not drop_oldest:
        raise ContextLengthExceeded(
            f"The messages need {len(tokens)} tokens, but only {budget} fit in this model's "
            f"context (n_ctx minus the reply's max tokens). Shorten the messages or lower "
            "max_tokens.", param="messages")
    first = 1 if messages and messages[0]["role"] == "system" else 0
    costs = _costs(layout.parts, encoder, len(messages))
    excess = len(tokens) - budget
    dropped = 0
    for _ in range(MAX_FIT_ROUNDS):
        more = _turns_to_drop(messages, first, dropped, costs, excess)
        if more is None:
            break
        dropped = more
        kept = [*range(first), *range(first + dropped, len(messages))]
        kept_layout = template.layout([messages[i] for i in kept], tools=tools,
                                      continue_final=continue_final, template_kwargs=kwargs)
        tokens = encoder.encode(kept_layout.parts, kept)
        if len(tokens) <= budget:
            return Prompt(tokens, dropped, stops)
        excess = len(tokens) - budget
    raise PromptTooLong(
        f"The message is too long for this model's context: the prompt needs more than "
        f"{budget} tokens (n_ctx minus max_new_tokens) even with the older turns dropped.")


def _fit_whole(messages: list[Message], template: ChatTemplate, encoder: _Encoder,
               layout: Layout, *, budget: int, drop_oldest: bool,
               stops: tuple[str, ...]) -> Prompt:
    """`prepare` for a template that edits contents: the same rules, measured on whole
    renderings. Each message's cost is its content's tokens plus an even share of the
    template's text, so each re-rendering drops about what is needed (a few renderings, not
    one per turn)."""
    tokens = encoder.whole(layout)
    if len(tokens) <= budget:
        return Prompt(tokens, 0, stops)
    if not drop_oldest:
        raise ContextLengthExceeded(
            f"The messages need {len(tokens)} tokens, but only {budget} fit in this model's "
            f"context (n_ctx minus the reply's max tokens). Shorten the messages or lower "
            "max_tokens.", param="messages")
    count = len(messages)
    contents = [len(encoder.content(i)) for i in range(count)]
    share = max(0, len(tokens) - sum(contents)) // max(1, count)
    costs = [n + share for n in contents]
    tools = messages.tools if isinstance(messages, Conversation) else None
    kwargs = messages.template_kwargs if isinstance(messages, Conversation) else None
    continue_final = messages[-1]["role"] == "assistant"
    first = 1 if messages[0]["role"] == "system" else 0
    excess = len(tokens) - budget
    dropped = 0
    for _ in range(MAX_FIT_ROUNDS):
        more = _turns_to_drop(messages, first, dropped, costs, excess)
        if more is None:
            break
        dropped = more
        kept = [*messages[:first], *messages[first + dropped:]]
        tokens = encoder.whole(template.layout(kept, tools=tools, continue_final=continue_final,
                                               template_kwargs=kwargs))
        if len(tokens) <= budget:
            return Prompt(tokens, dropped, stops)
        excess = len(tokens) - budget
    raise PromptTooLong(
        f"The message is too long for this model's context: the prompt needs more than "
        f"{budget} tokens (n_ctx minus max_new_tokens) even with the older turns dropped.")


def _check_text(messages: list[Message]) -> None:
    for index, message in enumerate(messages):
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate such as "\ud800" from JSON
            raise BadRequest(f"Message {index} is not valid Unicode text (a lone surrogate "
                             f"at character {error.start}).", param="messages") from None


class _Encoder:
    """Tokenizes each content once and each distinct piece of template text once."""

    def __init__(self, messages: list[Message], tokenizer: Tokenizer,
                 cancelled: Callable[[], bool]) -> None:
        self._messages = messages
        self._tokenizer = tokenizer
        self._cancelled = cancelled
        self._contents: dict[int, list[int]] = {}
        self._texts: dict[str, list[int]] = {}
        self._data: dict[str, list[int]] = {}
        self._checked: set[int] = set()     # contents found free of control-token text

    def content(self, index: int) -> list[int]:
        tokens = self._contents.get(index)
        if tokens is None:
            if self._cancelled():
                raise ClientClosedRequest("the client left while its request was prepared")
            tokens = self._tokenizer.tokenize(self._messages[index]["content"], special=False)
            self._contents[index] = tokens
        return tokens

    def text(self, text: str) -> list[int]:
        tokens = self._texts.get(text)
        if tokens is None:
            tokens = self._texts[text] = self._tokenizer.tokenize(text, special=True)
        return tokens

    def data(self, text: str) -> list[int]:
        """Request text other than a content: plain text, as a content is."""
        tokens = self._data.get(text)
        if tokens is None:
            tokens = self._data[text] = self._tokenizer.tokenize(text, special=False)
        return tokens

    def part(self, part: Part, indices: list[int] | range) -> list[int]:
        if isinstance(part, str):
            return self.text(part)
        if isinstance(part, Data):
            return self.data(part.text)
        return self.content(indices[part])

    def encode(self, parts: list[Part], indices: list[int] | range) -> list[int]:
        """Token ids of a layout of the messages `indices` (part `i` is `indices[i]`)."""
        tokens: list[int] = []
        for part in parts:
            tokens += self.part(part, indices)
        return tokens

    def whole(self, layout: Layout) -> list[int]:
        """A template that edits contents: tokenize its real output with special tokens
        parsed, after making sure that no content holds control-token text."""
        for index, message in enumerate(self._messages):
            if index in self._checked:
                continue
            self._checked.add(index)
            plain = self.content(index)
            if self._tokenizer.tokenize(message["content"], special=True) != plain:
                raise BadRequest(f"Message {index} holds the text of a control token, which "
                                 "this model's chat template cannot keep apart from its own.",
                                 param="messages")
        for text in layout.data:
            if self._tokenizer.tokenize(text, special=True) != self.data(text):
                raise BadRequest("A tool definition, call or name holds the text of a control "
                                 "token, which this model's chat template cannot keep apart "
                                 "from its own.", param="messages")
        return self._tokenizer.tokenize(layout.text, special=True)


def _costs(parts: list[Part], encoder: _Encoder, count: int) -> list[int]:
    """Tokens each message brings: its content and the text up to the next one."""
    costs = [0] * count
    owner = -1
    for part in parts:
        if isinstance(part, int):
            owner = part
        if owner >= 0:
            costs[owner] += len(encoder.part(part, range(count)))
    return costs


def _turns_to_drop(messages: list[Message], first: int, dropped: int, costs: list[int],
                   excess: int) -> int | None:
    """The smallest count of oldest messages, more than `dropped` and ending on a whole turn,
    whose costs cover `excess`; None when only the last message would be left."""
    last = len(messages) - 1
    index = first + dropped
    saved = 0
    while True:
        if index >= last:
            return None
        # One turn: the user message and, when present, the replies that follow it (the
        # assistant's, its tool calls' results, the assistant's again...).
        step = 1
        while index + step < last and messages[index + step]["role"] in ("assistant", "tool"):
            step += 1
        saved += sum(costs[index:index + step])
        index += step
        if saved >= excess:
            return index - first
