"""The runner: executes a step plan on the model (batches, `llama_decode`, sampler chains).

    >>> runner = Runner(model)
    >>> outputs = runner.execute(plan)        # what the scheduler's `update` takes back

`DecodeChunk`: one prompt chunk alone, its last row's logits kept; `DecodeTokens`: one token
of each generating sequence in one batch; `SampleTokens`: each sequence's sampler chain on
its row. Everything here runs on the engine thread. Decisions are the scheduler's; this
module only knows how to put them through llama.cpp. A failure is an output (`DecodeFailed`,
or what sampling raised), for the scheduler to apply to the jobs it concerns.
"""

from __future__ import annotations

from typing import Any

from ..events import TokenLogprob
from ..scheduler import Chunk, DecodeChunk, DecodeTokens, Plan, Sampled, Sequence
from .model import Model
from .sampler import SamplerChain, token_logprobs

__all__ = ["DecodeFailed", "Runner"]


class DecodeFailed(RuntimeError):
    """`llama_decode` returned an error: the sequences in that batch are in an unknown state."""


class Runner:
    def __init__(self, model: Model) -> None:
        self.model = model

    def attach(self, seq: Sequence) -> None:
        """Give a new sequence its own sampler chain (its penalties and random state)."""
        seq.sampler = SamplerChain(seq.job.params, self.model.n_vocab,
                                   self.model.guidance_vocab, choice=seq.choice)

    def decode_chunk(self, chunk: Chunk) -> int:
        """Decode prompt tokens `chunk.start:end` of one sequence; returns the last row."""
        batch = self.model.batch
        batch.clear()
        seq_id = chunk.seq.slot.seq_id
        last = chunk.end - 1
        for pos, token in enumerate(chunk.tokens, start=chunk.start):
            # Logits for the chunk's last token only, as llama-cpp-python's Llama.eval asks.
            batch.add(token, pos, seq_id, pos == last)
        self._decode()
        return batch.size - 1

    def execute(self, plan: Plan) -> list[Any]:
        """Do `plan`; one output per chunk, per sampled sequence, or the batch's rows."""
        if isinstance(plan, DecodeChunk):
            return [self._try(self.decode_chunk, plan.chunk)]
        if isinstance(plan, DecodeTokens):
            try:
                return self.decode_tokens(plan.members)
            except DecodeFailed as error:
                return [error]
        return [self._try(self.sample_one, seq, row) for seq, row in plan.rows]

    @staticmethod
    def _try(work: Any, *args: Any) -> Any:
        try:
            return work(*args)
        except Exception as error:  # noqa: BLE001 - an output: the scheduler fails that job
            return error

    def decode_tokens(self, members: list[Sequence]) -> list[int]:
        """One `llama_decode` of each member's pending token; their batch rows."""
        batch = self.model.batch
        batch.clear()
        rows = [batch.add(seq.pending, len(seq.slot.tokens), seq.slot.seq_id, True)
                for seq in members]
        self._decode()
        return rows

    def sample_one(self, seq: Sequence, row: int) -> Sampled:
        """`seq`'s next token from `row`: its bytes, whether it ends the reply, its logprob."""
        if seq.sampler is None:     # a choice forked from another's cells since it was made
            self.attach(seq)
        token = self.sample(seq, row)
        model = self.model
        end = model.is_end_of_generation(token)
        logprob = None if end else self.logprob(seq, row, token)
        return Sampled(token, model.piece(token), end, logprob)

    def sample(self, seq: Sequence, row: int) -> int:
        assert isinstance(seq.sampler, SamplerChain)
        return seq.sampler.sample(self.model.context, row)

    def logprob(self, seq: Sequence, row: int, token: int) -> TokenLogprob | None:
        """`token`'s log-probability at `row` and the alternatives, if `seq`'s job asked."""
        top = seq.job.params.logprobs
        if top is None:
            return None
        model = self.model
        value, best = token_logprobs(model.context, row, model.n_vocab, token, top)
        return TokenLogprob(model.piece(token), value,
                            tuple((model.piece(i), lp) for i, lp in best))

    def _decode(self) -> None:
        status = self.model.decode()
        if status != 0:
            raise DecodeFailed(f"llama_decode failed with status {status}")
