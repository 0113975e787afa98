"""The conversation of one session (`ChatPrompt`) and the model's own chat template.

The template is the Jinja2 text in the GGUF metadata (`tokenizer.chat_template`), rendered by
llama-cpp-python's sandboxed `Jinja2ChatFormatter`: no hand-written per-model presets.

    >>> prompt = ChatPrompt(template, system="You are terse.")
    >>> prompt.add_requester_msg("Hi!")
    >>> prompt.create_prompt()          # ends with the assistant's header, ready to generate
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, TypedDict

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .errors import PromptTooLong

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: list[str]          # the template's end-of-turn text, never shown to the user
    added_special: bool      # True when the template itself wrote the BOS token


class ChatTemplate:
    """A model's chat template; `render(messages)` gives the prompt text and its stop strings."""

    def __init__(self, template: str, *, bos_token: str, eos_token: str) -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Two formatters: one that ends with the assistant header (ready to generate), one
        # that renders a finished transcript. The formatter fixes this at construction.
        self._open = Jinja2ChatFormatter(template, eos_token, bos_token, add_generation_prompt=True)
        self._closed = Jinja2ChatFormatter(template, eos_token, bos_token, add_generation_prompt=False)

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> RenderedPrompt:
        formatter = self._open if add_generation_prompt else self._closed
        result = formatter(messages=[dict(m) for m in messages])  # type: ignore[misc]
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return RenderedPrompt(result.prompt, [s for s in stop if s], bool(result.added_special))


class ChatPrompt:
    """The history of one conversation: an optional system prompt, then user/assistant turns.

    Keeps ChatStream's method names (`add_requester_msg`, `add_responder_msg`,
    `create_prompt`, ...) so code written for the original keeps working.
    """

    def __init__(self, template: ChatTemplate | None = None, *, system: str | None = None) -> None:
        self.template = template
        self._system: str | None = system
        self._turns: list[Message] = []

    # -- building ---------------------------------------------------------------------------
    def set_system(self, text: str | None) -> None:
        self._system = text

    def add_requester_msg(self, text: str) -> None:
        self._turns.append({"role": "user", "content": text})

    def add_responder_msg(self, text: str) -> None:
        self._turns.append({"role": "assistant", "content": text})

    def clear_history(self) -> None:
        """Forget every turn; the system prompt stays."""
        self._turns.clear()

    # -- reading ----------------------------------------------------------------------------
    @property
    def system(self) -> str | None:
        return self._system

    def get_contents(self) -> list[Message]:
        """Every message, system prompt first, as plain dicts (a copy)."""
        head: list[Message] = [{"role": "system", "content": self._system}] if self._system else []
        return head + [dict(m) for m in self._turns]  # type: ignore[misc]

    def last_reply(self) -> str | None:
        if self._turns and self._turns[-1]["role"] == "assistant":
            return self._turns[-1]["content"]
        return None

    def create_prompt(self) -> str:
        """The whole conversation rendered with the model's chat template.

        Ends with the assistant's header when the last message is the user's (what the model
        is given to answer), or with the last reply when the conversation is complete.
        """
        if self.template is None:
            raise RuntimeError("This ChatPrompt has no chat template; create it with one.")
        messages = self.get_contents()
        open_turn = not messages or messages[-1]["role"] != "assistant"
        return self.template.render(messages, add_generation_prompt=open_turn).text

    # -- edits the server makes -------------------------------------------------------------
    def without_last_reply(self) -> ChatPrompt:
        """A copy ending at the last user message (what `regenerate` answers again)."""
        if self.last_reply() is None:
            raise ValueError("no reply to regenerate")
        copy = self.copy()
        copy._turns.pop()
        return copy

    def drop_oldest_turns(self, count: int) -> None:
        """Forget the `count` oldest messages (whole turns); the system prompt stays."""
        del self._turns[:count]

    def copy(self) -> ChatPrompt:
        other = ChatPrompt(self.template, system=self._system)
        other._turns = [dict(m) for m in self._turns]  # type: ignore[misc]
        return other

    # -- storage ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"system": self._system, "turns": [dict(m) for m in self._turns]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], template: ChatTemplate | None = None) -> ChatPrompt:
        prompt = cls(template, system=data.get("system"))
        for message in data.get("turns", []):
            if message["role"] not in ("user", "assistant"):
                raise ValueError(f"unexpected role in stored history: {message['role']!r}")
            prompt._turns.append({"role": message["role"], "content": str(message["content"])})
        return prompt

    def __repr__(self) -> str:
        return f"<ChatPrompt system={self._system is not None} turns={len(self._turns)}>"


def fit_to_context(
    messages: list[Message], encode: Callable[[list[Message]], list[int]], budget: int
) -> tuple[list[int], int]:
    """Encode `messages`, dropping the oldest turns until they fit in `budget` tokens.

    Returns the tokens and how many messages were dropped. Drops whole turns (a user message
    and the reply after it), never the system prompt and never the last (new) user message;
    raises `PromptTooLong` when even that is too long.
    """
    first = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        tokens = encode(messages[:first] + messages[first + dropped:])
        if len(tokens) <= budget:
            return tokens, dropped
        remaining = len(messages) - first - dropped
        if remaining <= 1:
            raise PromptTooLong(
                f"The message is too long for this model's context: the prompt needs "
                f"{len(tokens)} tokens but only {budget} fit (n_ctx minus max_new_tokens)."
            )
        # One turn: the user message and, when present, the reply that follows it.
        step = 2 if messages[first + dropped + 1]["role"] == "assistant" else 1
        dropped += min(step, remaining - 1)
