"""Which llama.cpp sequence holds which conversation: per-session prefix reuse, LRU eviction.

    >>> slots = KVSlots(model, count=4)
    >>> slot, reused = slots.acquire("session-id", prompt)   # `reused` tokens need no decoding
    >>> ...                                                   # the engine appends to slot.tokens
    >>> slots.release(slot)        # idle: its cells stay for the session's next turn

Each slot is one sequence id (with a KV stream of its own), and `slot.tokens` mirrors its
cells position by position. A slot keeps what its last job left when the job ends, so a
session's next turn (or a regenerate) starts from its previous turn: everything up to the
first token that differs is not evaluated again. A job without a slot of its own (a new
session; a request without a cache key that continues no idle conversation) takes an empty
slot, else the least recently used idle one (that conversation's cells are evicted). If
another slot shares a longer prefix with its prompt (a server-wide system prompt, say), that
prefix is copied over instead of evaluated again: the slot that holds it keeps it.

With `exact=True` (the deterministic mode), only cells that a cold start of the same prompt
would compute the same way are reused: those decoded inside prompt chunks of two tokens or
more (`Slot.exact`), never the cells of generated tokens, and at least two prompt tokens are
left to decode. llama.cpp computes a token that is alone in its call with other kernels than
one inside a chunk (llamafile's sgemm against ggml's vec_dot: benchmarks/RESULTS.md,
"Determinism across CPUs"), so a reused reply would part from a cold start after some tens
of greedy tokens. The price: each turn reads the previous reply again.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["MIN_BORROWED_PREFIX", "common_prefix", "KVSlots", "Slot"]


class _Memory(Protocol):
    def forget(self, seq_id: int, start: int = 0) -> None: ...

    def copy(self, src_seq_id: int, dst_seq_id: int, cells: int) -> None: ...


# The least shared prefix worth copying from another slot. A copy costs at most a whole KV
# stream's (~22 ms for n_ctx 4,096 with SmolLM2-135M on the 2-core CPU, about what
# evaluating 4 prompt tokens costs there), and less from a short donor (Model.copy).
MIN_BORROWED_PREFIX = 16


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)   # what its KV cells hold, by position
    exact: int = 0     # leading cells decoded in prompt chunks of 2+ tokens (see `exact`)
    owner: Hashable | None = None                     # the cache key of the turn that filled it
    busy: bool = False
    last_used: int = 0


class KVSlots:
    def __init__(self, memory: _Memory, count: int, *, exact: bool = False) -> None:
        self._memory = memory
        self._slots = [Slot(seq_id) for seq_id in range(count)]
        self._clock = 0
        self.exact = exact
        # Prompt tokens always left to decode: the last one's logits are needed to sample;
        # in the exact mode two, so that no prompt token is decoded alone in its call.
        self.min_tail = 2 if exact else 1

    def acquire(self, key: Hashable | None, prompt: list[int]) -> tuple[Slot, int]:
        """A free slot for `prompt`, holding the longest prefix of it that can be had.

        Preference: the slot this cache key filled last; for a request without a key, the
        unowned idle slot whose conversation the prompt continues (it shares at least half of
        what the slot holds: taking a slot for a few shared template tokens would evict
        another conversation that is likely to come back); then an empty slot; then the least
        recently used one. Returns the slot and how many prompt tokens it already holds; the
        last prompt token is never counted, since its logits are needed to sample (in the
        exact mode neither are the last two, nor any cell past `Slot.exact`).
        """
        idle = [slot for slot in self._slots if not slot.busy]
        if not idle:
            raise RuntimeError("every KV slot is busy")  # the engine never runs more jobs
        slot = None
        if key is not None:
            slot = next((s for s in idle if s.owner == key), None)
        else:
            slot = self._continued(idle, prompt)
        if slot is None:
            slot = min(idle, key=lambda s: (bool(s.tokens), s.last_used))
        limit = max(0, len(prompt) - self.min_tail)
        reused = min(self._reusable(slot, prompt), limit)
        self.trim(slot, reused)
        reused = self._borrow(slot, prompt, reused, limit)
        slot.busy = True
        slot.owner = key
        self._touch(slot)
        return slot, reused

    @staticmethod
    def _continued(idle: list[Slot], prompt: list[int]) -> Slot | None:
        best, best_shared = None, 0
        for slot in idle:
            if slot.owner is None and slot.tokens:
                shared = common_prefix(slot.tokens, prompt)
                if shared > best_shared and 2 * shared >= len(slot.tokens):
                    best, best_shared = slot, shared
        return best

    def _borrow(self, slot: Slot, prompt: list[int], reused: int, limit: int) -> int:
        """Copy a longer shared prefix from another slot (busy or not: a slot only ever
        appends after its prefix, and the copy keeps just the prefix). Returns the new count."""
        donor, shared = None, reused
        for other in self._slots:
            if other is not slot:
                length = min(self._reusable(other, prompt), limit)
                if length > shared:
                    donor, shared = other, length
        if donor is None or shared - reused < MIN_BORROWED_PREFIX:
            return reused
        self._memory.copy(donor.seq_id, slot.seq_id, len(donor.tokens))
        slot.tokens[:] = donor.tokens
        slot.exact = donor.exact
        self.trim(slot, shared)
        return shared

    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        shared = common_prefix(slot.tokens, prompt)
        return min(shared, slot.exact) if self.exact else shared

    def fork(self, source: Slot) -> Slot:
        """A free slot holding a copy of everything `source` holds (another choice of the
        same prompt): empty slots first, else the least recently used idle one."""
        idle = [slot for slot in self._slots if not slot.busy]
        if not idle:
            raise RuntimeError("every KV slot is busy")  # admission counted a place per choice
        slot = min(idle, key=lambda s: (bool(s.tokens), s.last_used))
        self._memory.copy(source.seq_id, slot.seq_id, len(source.tokens))
        slot.tokens[:] = source.tokens
        slot.exact = source.exact
        slot.busy = True
        slot.owner = None
        self._touch(slot)
        return slot

    def prompt_read(self, slot: Slot, start: int, end: int) -> None:
        """Prompt tokens `start:end` were decoded in one call: cells a cold start matches
        when the chunk held two tokens or more and continued an exact prefix."""
        if end - start >= 2 and slot.exact == start:
            slot.exact = end

    def release(self, slot: Slot) -> None:
        """The job is done; the slot's cells stay for its owner's next turn."""
        slot.busy = False
        self._touch(slot)

    def trim(self, slot: Slot, length: int) -> None:
        """Keep the first `length` positions of the slot, free the rest."""
        if length < len(slot.tokens):
            self._memory.forget(slot.seq_id, length)
            del slot.tokens[length:]
        slot.exact = min(slot.exact, length)

    def clear(self, slot: Slot) -> None:
        """Free every cell of the slot and forget whose it was (e.g. after a failed decode)."""
        self._memory.forget(slot.seq_id)
        slot.tokens.clear()
        slot.exact = 0
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
