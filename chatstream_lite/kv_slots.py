"""Which llama.cpp sequence holds which conversation: per-session prefix reuse, LRU eviction.

    >>> slots = KVSlots(model, count=4)
    >>> slot, reused = slots.acquire("session-id", prompt)   # `reused` tokens need no decoding
    >>> ...                                                   # the engine appends to slot.tokens
    >>> slots.release(slot)        # idle: its cells stay for the session's next turn

Each slot is one sequence id (with a KV stream of its own), and `slot.tokens` mirrors its
cells position by position. A slot keeps what its last job left when the job ends, so a
session's next turn (or a regenerate) starts from its previous turn: everything up to the
first token that differs is not evaluated again. A job whose session has no slot takes an
empty one, else the least recently used idle one (that session's cells are evicted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Protocol


class _Memory(Protocol):
    def forget(self, seq_id: int, start: int = 0) -> None: ...


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)   # what its KV cells hold, by position
    owner: Hashable | None = None                     # the cache key of the turn that filled it
    busy: bool = False
    last_used: int = 0


class KVSlots:
    def __init__(self, memory: _Memory, count: int) -> None:
        self._memory = memory
        self._slots = [Slot(seq_id) for seq_id in range(count)]
        self._clock = 0

    def acquire(self, key: Hashable | None, prompt: list[int]) -> tuple[Slot, int]:
        """A free slot for `prompt`, trimmed to the prefix it shares with it.

        Preference: the slot this cache key filled last; for a request without a key, the
        unowned idle slot sharing the longest prefix; then an empty slot; then the least
        recently used one. Returns the slot and how many prompt tokens it already holds; the
        last prompt token is never counted, since its logits are needed to sample.
        """
        idle = [slot for slot in self._slots if not slot.busy]
        if not idle:
            raise RuntimeError("every KV slot is busy")  # the engine never runs more jobs
        slot = None
        if key is not None:
            slot = next((s for s in idle if s.owner == key), None)
        else:
            unowned = [s for s in idle if s.owner is None and s.tokens]
            best = max(unowned, key=lambda s: common_prefix(s.tokens, prompt), default=None)
            if best is not None and common_prefix(best.tokens, prompt) > 0:
                slot = best
        if slot is None:
            slot = min(idle, key=lambda s: (bool(s.tokens), s.last_used))
        reused = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
        self.trim(slot, reused)
        slot.busy = True
        slot.owner = key
        self._touch(slot)
        return slot, reused

    def release(self, slot: Slot) -> None:
        """The job is done; the slot's cells stay for its owner's next turn."""
        slot.busy = False
        self._touch(slot)

    def trim(self, slot: Slot, length: int) -> None:
        """Keep the first `length` positions of the slot, free the rest."""
        if length < len(slot.tokens):
            self._memory.forget(slot.seq_id, length)
            del slot.tokens[length:]

    def clear(self, slot: Slot) -> None:
        """Free every cell of the slot and forget whose it was (e.g. after a failed decode)."""
        self._memory.forget(slot.seq_id)
        slot.tokens.clear()
        slot.owner = None

    def _touch(self, slot: Slot) -> None:
        self._clock += 1
        slot.last_used = self._clock


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists.

    A binary search over slice comparisons: each comparison runs in C, so a 4,000-token
    history costs a dozen of them instead of a 4,000-step Python loop.
    """
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low
