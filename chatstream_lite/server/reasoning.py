"""A reply's thinking section (`<think>...</think>`) told apart from its answer, as it streams.

    splitter = ReasoningSplitter()                 # opened=True: the prompt opened it
    reasoning, content = splitter.feed(piece)      # either may be "" (text held back)
    reasoning, content = splitter.finish()         # the end of the reply: what was held

Reasoning models write their thinking before the answer: DeepSeek-R1's distills and Qwen3
between `<think>` and `</think>`, some templates open the section in the generation prompt
itself (the reply then holds only `</think>`). Each wire format shows it apart: OpenAI's
`reasoning_content`, Anthropic's `thinking` block, the Responses API's reasoning item. As
llama-server's `--reasoning-format deepseek` reads it: only a section that opens the reply
(after white space) is reasoning, one section per reply, and the white space after its end
is not part of the answer. A reply that never closes its section (cut by max_tokens) is all
reasoning. Markers split across pieces are held until the next piece tells.
"""

from __future__ import annotations

from typing import Literal, final

__all__ = ["THINK_END", "THINK_START", "ReasoningSplitter", "opens_thinking", "split_reasoning"]

THINK_START = "<think>"
THINK_END = "</think>"


@final
class ReasoningSplitter:
    """See the module docstring. `opened`: the prompt ends inside a thinking section."""

    __slots__ = ("_held", "_state")

    def __init__(self, *, opened: bool = False) -> None:
        self._state: Literal["head", "reasoning", "after", "content"] = \
            "reasoning" if opened else "head"
        self._held = ""

    @property
    def reasoning(self) -> bool:
        """Whether the reply is inside its thinking section now."""
        return self._state == "reasoning"

    def feed(self, text: str) -> tuple[str, str]:
        """The next piece of the reply: (reasoning, content) that can be shown now."""
        if self._state == "content":
            return "", text
        self._held += text
        reasoning = ""
        if self._state == "head":
            stripped = self._held.lstrip()
            if stripped.startswith(THINK_START):
                self._state = "reasoning"
                self._held = stripped[len(THINK_START):]
            elif THINK_START.startswith(stripped):
                return "", ""           # white space, or the marker's start: wait
            else:
                self._state = "content"
                content, self._held = self._held, ""
                return "", content
        if self._state == "reasoning":
            at = self._held.find(THINK_END)
            if at < 0:
                keep = _partial_suffix(self._held, THINK_END)
                reasoning = self._held[:len(self._held) - keep]
                self._held = self._held[len(reasoning):]
                return reasoning, ""
            reasoning, self._held = self._held[:at], self._held[at + len(THINK_END):]
            self._state = "after"
        # After the section: the white space that separates it from the answer is dropped.
        self._held = self._held.lstrip()
        if not self._held:
            return reasoning, ""
        self._state = "content"
        content, self._held = self._held, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The reply has ended: what was held back, as (reasoning, content)."""
        held, self._held = self._held, ""
        if self._state == "reasoning":
            return held, ""
        if self._state == "head":
            return "", held             # white space, or a marker's start, and nothing else
        return "", held


def split_reasoning(text: str, *, opened: bool = False) -> tuple[str | None, str]:
    """A whole reply as (reasoning, content); reasoning is None when it has no section."""
    splitter = ReasoningSplitter(opened=opened)
    reasoning, content = splitter.feed(text)
    more_reasoning, more_content = splitter.finish()
    had_section = opened or text.lstrip().startswith(THINK_START)
    return (reasoning + more_reasoning if had_section else None), content + more_content


def opens_thinking(generation_prompt: str) -> bool:
    """Whether a rendered prompt ends inside a thinking section its template opened (the
    last `<think>` after the last `</think>`)."""
    return generation_prompt.rfind(THINK_START) > generation_prompt.rfind(THINK_END)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
