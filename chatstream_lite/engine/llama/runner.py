"""The runner: executes a step plan on the model (batches, `llama_decode`, sampler chains).

    >>> runner = Runner(model)
    >>> row = runner.decode_chunk(chunk)      # a prompt chunk alone; its last row's logits
    >>> rows = runner.decode_tokens(members)  # one token of each generating sequence
    >>> token = runner.sample(seq, row)

Everything here runs on the engine thread. Decisions are the scheduler's; this module only
knows how to put them through llama.cpp. A failed decode raises `DecodeFailed`.
"""

from __future__ import annotations

from ..events import TokenLogprob
from ..scheduler import Chunk, Sequence
from .model import Model
from .sampler import SamplerChain, token_logprobs


class DecodeFailed(RuntimeError):
    """`llama_decode` returned an error: the sequences in that batch are in an unknown state."""


class Runner:
    def __init__(self, model: Model) -> None:
        self.model = model

    def attach(self, seq: Sequence) -> None:
        """Give a new sequence its own sampler chain (its penalties and random state)."""
        seq.sampler = SamplerChain(seq.job.params, self.model.n_vocab, self.model.vocab,
                                   choice=seq.choice)

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

    def decode_tokens(self, members: list[Sequence]) -> None:
        """One `llama_decode` of each member's pending token; `seq.row` is its batch row."""
        batch = self.model.batch
        batch.clear()
        for seq in members:
            seq.row = batch.add(seq.pending, len(seq.slot.tokens), seq.slot.seq_id, True)
        self._decode()

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
