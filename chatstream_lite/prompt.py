"""The conversation of one session (`ChatPrompt`), rendered with the model's own chat template.

The template is the Jinja2 text in the GGUF metadata (`tokenizer.chat_template`, see
`engine.template.ChatTemplate`): no hand-written per-model presets.

    >>> prompt = ChatPrompt(template, system="You are terse.")
    >>> prompt.add_requester_msg("Hi!")
    >>> prompt.create_prompt()          # ends with the assistant's header, ready to generate
"""

from __future__ import annotations

from typing import Any

from .engine.template import ChatTemplate, Message

__all__ = ["ChatPrompt", "ChatTemplate", "Message"]


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
