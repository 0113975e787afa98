"""The step plan of continuous batching, with no model in it (a runner executes the plan).

    >>> scheduler = Scheduler(slots, n_batch=512, emit=outbox.append)
    >>> scheduler.admit(job)                     # picks its KV slot (prefix reuse); Started
    >>> plan = scheduler.plan()                  # the step's first plan, or None
    >>> while plan is not None:
    ...     outputs = runner.execute(plan)       # the model: decode chunks/tokens, or sample
    ...     plan = scheduler.update(plan, outputs)   # applied here; the step's next plan

As vLLM's scheduler, it never touches the model: what a step does, and in which order, is
decided here (`plan`, `update`), the runner does it, and the outcome comes back here. So the
rules and the order get fast tests with fake outputs (tests/test_scheduler.py).

A step, in order: cancelled jobs leave; each of this step's prompt chunks is a
`DecodeChunk` of its own; after the chunk that ends a prompt, its job's other choices fork
from its cells and `SampleTokens` samples their first tokens from its last row (before the
next decode overwrites llama.cpp's logits; `first`: they go to the client before anything
else of the step); then `DecodeTokens` decodes every generating sequence's last token in one
batch, and `SampleTokens` samples each one's next token.

A step reads the next `n_batch`-token chunk of the prompts still being read (oldest job
first, at least one chunk, more while they fit in `n_batch` tokens together), then decodes,
in one `llama_decode`, the token every generating job sampled last. A long new prompt is
read in chunks between the other streams' tokens instead of freezing them, and a job
cancelled while its prompt is read stops within one chunk. Each prompt chunk is decoded on
its own, with the boundaries it would have alone. New jobs join between steps; finished or
cancelled ones leave before the next.

A job asking for `n` choices runs as `n` sequences: its prompt is read once, by the first;
when that one has read it, `fork` copies its KV cells to the others, which sample their
first token from the same logits. The job's `Finished` comes once its last choice ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import ChatStreamError
from .events import Event, Failed, Finished, FinishReason, Piece, Started, TokenLogprob
from .faults import Faults
from .job import Job
from .kv_slots import KVSlots, Slot
from .protocol import EngineStats
from .text import TextAssembler

__all__ = ["Chunk", "DecodeChunk", "DecodeTokens", "Emit", "Plan", "Sampled", "Sampler",
           "SampleTokens", "Scheduler", "Sequence"]

Emit = Callable[[Job, Event], None]
log = logging.getLogger(__name__)


class Sampler(Protocol):
    def close(self) -> None: ...


@dataclass(eq=False)
class Sequence:
    """One running job: its prompt, KV slot, sampler and reply so far."""

    job: Job
    slot: Slot
    prompt: list[int]
    text: TextAssembler
    started: float
    sampler: Sampler | None = None   # the runner's, for this sequence alone
    pending: int = -1           # the token sampled last, decoded in the next step
    generated: int = 0
    prompt_done: float = 0.0
    choice: int = 0             # which of its job's choices (SamplingParams.n) this is
    logprobs: list[TokenLogprob] = field(default_factory=list)   # not yet sent with a piece

    @property
    def reading(self) -> bool:
        return len(self.slot.tokens) < len(self.prompt)


@dataclass(eq=False)
class _Choices:
    """How a job's choices ended so far (one entry per choice; None: still running)."""

    reasons: list[FinishReason | None]
    generated: int = 0


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens `start:end` of `seq`, decoded alone; the last one's logits are kept."""

    seq: Sequence
    start: int
    end: int

    @property
    def tokens(self) -> list[int]:
        return self.seq.prompt[self.start:self.end]

    @property
    def last(self) -> bool:
        return self.end == len(self.seq.prompt)


@dataclass(frozen=True)
class DecodeChunk:
    """Decode one prompt chunk alone (its own `llama_decode`); outputs: [its last row], or
    [the error]."""

    chunk: Chunk


@dataclass(frozen=True)
class SampleTokens:
    """Sample each sequence's next token from a row of the last decode; outputs: a `Sampled`
    each, or the error. `first`: first tokens, handed to the loop before the step goes on."""

    rows: list[tuple[Sequence, int]]
    first: bool = False


@dataclass(frozen=True)
class DecodeTokens:
    """Decode every member's pending token in one batch; outputs: their rows, or the error."""

    members: list[Sequence]


Plan = DecodeChunk | SampleTokens | DecodeTokens


@dataclass(frozen=True)
class Sampled:
    """What the runner sampled for one sequence."""

    token: int
    data: bytes                 # the token's bytes (b"" for a control token)
    end: bool                   # an end-of-generation token
    logprob: TokenLogprob | None = None


class Scheduler:
    def __init__(self, slots: KVSlots, *, n_batch: int, emit: Emit, stats: EngineStats,
                 faults: Faults | None = None,
                 max_generation_time: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self.n_batch = n_batch
        self.emit = emit
        self.faults = faults or Faults()
        self.max_generation_time = max_generation_time
        self.clock = clock
        self.stats = stats
        self.sequences: list[Sequence] = []
        self._choices: dict[Job, _Choices] = {}
        self._chunks: list[Chunk] = []          # this step's prompt chunks not decoded yet

    @property
    def active(self) -> bool:
        return bool(self.sequences)

    # -- the step -------------------------------------------------------------------------
    def plan(self) -> Plan | None:
        """A step's first plan: its first prompt chunk, else the generation batch; None when
        there is nothing to do."""
        self.leave_cancelled()
        self._chunks = self.plan_prompts()
        return self._next()

    def update(self, plan: Plan, outputs: list[Any]) -> Plan | None:
        """Apply what the runner did with `plan`; the step's next plan, or None at its end."""
        if isinstance(plan, DecodeChunk):
            return self._chunk_done(plan.chunk, outputs[0])
        if isinstance(plan, DecodeTokens):
            error = outputs[0] if outputs and isinstance(outputs[0], BaseException) else None
            if error is not None:
                self._decode_failed(plan.members, error)
                return None
            self.generated(plan.members)
            return SampleTokens(list(zip(plan.members, outputs, strict=True)))
        for (seq, _), sampled in zip(plan.rows, outputs, strict=True):
            if seq not in self.sequences:
                continue        # its job failed with another choice's sample
            if isinstance(sampled, BaseException):
                self._sample_failed(seq, sampled)
            else:
                self.take(seq, sampled.token, sampled.data, sampled.end, sampled.logprob)
        return self._next() if plan.first else None

    def _next(self) -> Plan | None:
        """The step's next prompt chunk (of a job still here), else its generation batch."""
        while self._chunks:
            chunk = self._chunks.pop(0)
            if chunk.seq in self.sequences:
                return DecodeChunk(chunk)
        return self._generation()

    def _chunk_done(self, chunk: Chunk, row: int | BaseException) -> Plan | None:
        if isinstance(row, BaseException):
            self._decode_failed([chunk.seq], row)
            return self._next()
        self.chunk_read(chunk)
        if not chunk.last:
            return self._next()
        # The job's other choices (n > 1) copy these cells and sample from this row.
        return SampleTokens([(seq, row) for seq in [chunk.seq, *self.fork(chunk.seq)]],
                            first=True)

    def _generation(self) -> DecodeTokens | None:
        members = self.plan_generation()
        return DecodeTokens(members) if members else None

    def _decode_failed(self, members: list[Sequence], error: BaseException) -> None:
        log.error("%s; failing the %d jobs in the batch", error, len(members))
        for seq in members:
            self.fail(seq, error, clear_slot=True)

    def _sample_failed(self, seq: Sequence, error: BaseException) -> None:
        if isinstance(error, ChatStreamError):  # the request's own doing: an unsatisfiable schema
            log.info("generation ended: %s", error.message)
        else:
            log.error("generation failed", exc_info=error)
        self.fail(seq, error)

    # -- joining --------------------------------------------------------------------------
    def admit(self, job: Job) -> Sequence | None:
        """Give a prepared job its KV slot and announce it; None if it was cancelled."""
        if job.cancelled:
            self.stats.jobs_skipped += 1
            self.emit(job, Finished("cancelled", reached_model=False))
            return None
        assert job.prompt is not None, "jobs are prepared before they reach the engine"
        prompt = job.prompt
        slot, reused = self.slots.acquire(job.cache_key, prompt.tokens)
        self.stats.jobs_started += 1
        self.stats.prompt_tokens += len(prompt.tokens)
        self.stats.prompt_tokens_reused += reused
        self.emit(job, Started(len(prompt.tokens), prompt.dropped_messages))
        seq = Sequence(job, slot, prompt.tokens, TextAssembler(list(prompt.stops)),
                       started=self.clock())
        self.sequences.append(seq)
        self._choices[job] = _Choices([None] * job.params.n)
        return seq

    def fork(self, seq: Sequence) -> list[Sequence]:
        """`seq` has read its prompt: its job's other choices start from a copy of its KV
        cells (never reading the prompt again) and sample from the same logits. The
        admission layer counted a place for each choice, so their slots are free."""
        forks: list[Sequence] = []
        stops = seq.job.prompt.stops if seq.job.prompt is not None else ()
        for choice in range(1, seq.job.params.n):
            slot = self.slots.fork(seq.slot)
            forks.append(Sequence(seq.job, slot, seq.prompt,
                                  TextAssembler(list(stops)), started=seq.started,
                                  prompt_done=seq.prompt_done, choice=choice))
        self.sequences.extend(forks)
        return forks

    # -- planning -------------------------------------------------------------------------
    def leave_cancelled(self) -> None:
        for seq in [s for s in self.sequences if s.job.cancelled]:
            self.finish(seq, "cancelled")

    def plan_prompts(self) -> list[Chunk]:
        """This step's prompt chunks: at least one, more while they fit in `n_batch` tokens."""
        chunks: list[Chunk] = []
        budget = self.n_batch
        for seq in [s for s in self.sequences if s.reading]:
            start = len(seq.slot.tokens)
            end = min(len(seq.prompt), start + self.n_batch)
            if self.slots.exact and len(seq.prompt) - end == 1 and end - start > 2:
                end -= 1    # the exact mode decodes no prompt token alone (kv_slots.py)
            if end - start > budget:
                break
            budget -= end - start
            chunks.append(Chunk(seq, start, end))
        return chunks

    def chunk_read(self, chunk: Chunk) -> None:
        chunk.seq.slot.tokens.extend(chunk.tokens)
        self.slots.prompt_read(chunk.seq.slot, chunk.start, chunk.end)
        self.stats.prompt_tokens_evaluated += chunk.end - chunk.start
        if chunk.last:
            chunk.seq.prompt_done = self.clock()

    def plan_generation(self) -> list[Sequence]:
        """The sequences with a sampled token to decode, in sequence-id order.

        With a KV stream per sequence, llama.cpp splits a batch into one forward pass per
        run of consecutive ids *in batch order* (split_equal with sequential=true), so ids
        3,0,1,2 cost two passes and 0,1,2,3 one; admission order would cost up to one pass
        per job.
        """
        return sorted((s for s in self.sequences if s.pending >= 0 and not s.job.cancelled),
                      key=lambda s: s.slot.seq_id)

    def generated(self, members: list[Sequence]) -> None:
        """`members`' pending tokens were decoded: they are in the KV cells now."""
        self.stats.generation_steps += 1
        for seq in members:
            seq.slot.tokens.append(seq.pending)
            seq.pending = -1

    # -- outcomes -------------------------------------------------------------------------
    def take(self, seq: Sequence, token: int, data: bytes, end_of_generation: bool,
             logprob: TokenLogprob | None = None) -> None:
        """One sampled token (`data`: its bytes): end of reply, or a piece and the next input."""
        job = seq.job
        if job.cancelled:
            self.finish(seq, "cancelled")
            return
        if end_of_generation:
            self.finish(seq, "stop")
            return
        if self.faults.before_token is not None:
            try:
                self.faults.before_token(seq.generated)
            except Exception as error:  # noqa: BLE001 - an injected model failure
                self.fail(seq, error)
                return
        seq.generated += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        piece, stopped = seq.text.add(data)
        if piece:
            self._piece(seq, piece)
        if stopped:
            self.finish(seq, "stop")
        elif seq.generated >= job.params.max_new_tokens or self._out_of_time(seq):
            self.finish(seq, "length")
        else:
            seq.pending = token

    def _out_of_time(self, seq: Sequence) -> bool:
        """Whether the reply has used up `max_generation_time`, checked after every token.

        The clock starts when the prompt has been read: a long prompt read in chunks between
        other streams' tokens must not use up the reply's time before its first token.
        """
        limit = self.max_generation_time
        return limit is not None and self.clock() - seq.prompt_done >= limit

    def _piece(self, seq: Sequence, text: str) -> None:
        self.emit(seq.job, Piece(text, seq.choice, tuple(seq.logprobs)))
        seq.logprobs.clear()

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """`seq`'s reply ended; its job's `Finished` goes out with its last choice's end."""
        job = seq.job
        if reason != "cancelled":
            tail = seq.text.flush()
            if tail:
                self._piece(seq, tail)
        choices = self._choices[job]
        choices.reasons[seq.choice] = reason
        choices.generated += seq.generated
        self._leave(seq)
        if any(s.job is job for s in self.sequences):
            return
        del self._choices[job]
        now = self.clock()
        prompt_done = seq.prompt_done or now
        reasons = tuple(r or "cancelled" for r in choices.reasons)
        first = "cancelled" if job.cancelled else reasons[0]
        self.emit(job, Finished(first, True, len(seq.prompt), choices.generated,
                                prompt_done - seq.started, now - prompt_done,
                                reasons if len(reasons) > 1 else (),
                                seq.text.matched if first == "stop" and len(reasons) == 1
                                else None))

    def fail(self, seq: Sequence, error: BaseException, *, clear_slot: bool = False) -> None:
        """`seq` failed, and with it its job: its other choices leave too."""
        if clear_slot:
            self.slots.clear(seq.slot)  # its cells are in an unknown state now
        self.emit(seq.job, Failed(error))
        self._choices.pop(seq.job, None)
        for other in [s for s in self.sequences if s.job is seq.job]:
            self._leave(other)

    def _leave(self, seq: Sequence) -> None:
        self.stats.completion_tokens += seq.generated
        if seq.sampler is not None:
            seq.sampler.close()
        self.slots.release(seq.slot)
        self.sequences.remove(seq)

    def fail_everything(self, error: BaseException) -> None:
        """The engine is going down: no job may be left without its last event."""
        for seq in list(self.sequences):
            self.fail(seq, error)

