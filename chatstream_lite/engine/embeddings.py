"""Embedding jobs, and the plan of one embeddings batch (no model inside: tested with fakes).

    job = EmbedJob(inputs=[[1, 2, 3], [4, 5]], on_done=deliver)   # token ids per input
    engine.embed(job)                       # the engine thread runs its batches
    rows = plan_batch(pending, capacity=512, max_seqs=8)         # [(job, input index), ...]

Embeddings do not go through the generation scheduler's plan: they are read by a second
llama.cpp context on the same weights (mean pooling, its own few KV cells, cleared after
each batch), so they hold no generation slot and no KV cells of a conversation. The engine
thread shares its time between them and generation: after a batch, the running streams get
as long before the next one, and beside streams a batch is small, so a stream waits at most
one batch (up to `capacity` tokens, or one longer input) for its next token.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["EmbedJob", "normalized", "plan_batch"]

Outcome = list[list[float]] | BaseException


@dataclass(eq=False)
class EmbedJob:
    """One request's inputs (token ids, each at most the engine's `max_embedding_tokens`).
    `on_done(vectors or error)` is called once, on the event loop."""

    inputs: list[list[int]]
    on_done: Callable[[Outcome], None]
    vectors: list[list[float] | None] = field(default_factory=list)
    planned: int = 0            # inputs handed to a batch so far
    cancelled: bool = False     # the client left: no more of its batches run
    tokens: int = 0

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)
        self.tokens = sum(len(tokens) for tokens in self.inputs)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return all(vector is not None for vector in self.vectors)


def plan_batch(pending: deque[EmbedJob], capacity: int, max_seqs: int
               ) -> list[tuple[EmbedJob, int]]:
    """The inputs of the next batch: whole inputs, oldest job first, while they fit in
    `capacity` tokens and `max_seqs` sequences (a job's inputs in order, so a long request
    does not hold back the ones after it for more than its share). A cancelled job is
    skipped. The first input goes even when it is longer than `capacity` (a smaller budget
    beside running streams than the longest input the request could hold): alone."""
    rows: list[tuple[EmbedJob, int]] = []
    used = 0
    for job in pending:
        if job.cancelled:
            continue
        while job.planned < len(job.inputs) and len(rows) < max_seqs:
            size = len(job.inputs[job.planned])
            if rows and used + size > capacity:
                return rows
            rows.append((job, job.planned))
            used += size
            job.planned += 1
        if len(rows) >= max_seqs:
            break
    return rows


def normalized(vector: Sequence[float]) -> list[float]:
    """L2-normalized, as OpenAI's embeddings and llama-server's (`--embd-normalize 2`)."""
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else list(vector)
