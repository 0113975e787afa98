"""Token bytes to text pieces that never split a UTF-8 character or leak a stop string.

    >>> text = TextAssembler(stops=["<|im_end|>"])
    >>> piece, stopped = text.add(token_bytes)   # safe to send now; True once a stop is seen
    >>> tail = text.flush()                      # what was held back, at the end of the reply
"""

from __future__ import annotations

import codecs

__all__ = ["TextAssembler"]


class TextAssembler:
    """Incomplete UTF-8 sequences wait in the incremental decoder; text that could be the
    start of a stop string waits here until the next token shows whether it is one."""

    def __init__(self, stops: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._stops = stops
        self._held = ""
        self.matched: str | None = None   # the stop string that ended the reply, once seen

    def add(self, data: bytes) -> tuple[str, bool]:
        """The text that is safe to send now, and whether a stop string was reached."""
        self._held += self._decoder.decode(data)
        if not self._stops:
            out, self._held = self._held, ""
            return out, False
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            at = min(hits)
            self.matched = next(s for s in self._stops if self._held.find(s) == at)
            out, self._held = self._held[:at], ""
            return out, True
        keep = max((_overlap(self._held, s) for s in self._stops), default=0)
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        out, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a beginning of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
