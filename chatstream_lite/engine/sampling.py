"""The generation settings of one request (the sampler chain itself lives with the model)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULTS

__all__ = ["SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """How one reply is sampled and how long it may be.

        >>> SamplingParams(max_new_tokens=64, temperature=0.0)   # greedy
    """

    max_new_tokens: int = DEFAULTS.limits.max_new_tokens
    temperature: float = DEFAULTS.generation.temperature
    top_p: float = DEFAULTS.generation.top_p
    top_k: int = DEFAULTS.generation.top_k
    repeat_penalty: float = DEFAULTS.generation.repeat_penalty
    seed: int | None = DEFAULTS.generation.seed
    stop: tuple[str, ...] = ()
    # OpenAI's penalties (0: off): per occurrence of a token in the reply so far, and once
    # for having occurred at all; llama.cpp's penalties sampler applies both.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    # llama.cpp's samplers OpenAI has no name for (llama-server's `min_p`, `typical_p`,
    # `repeat_last_n`), at llama-cpp-python's defaults: with temperature 0 they do not matter.
    min_p: float = 0.05
    typical_p: float = 1.0           # 1.0 switches the typical sampler off
    repeat_last_n: int = 64          # tokens the penalties look back at (0: none)
    # The grammar the reply must follow, in llguidance's serialized form (`ModelInfo.json_grammar`
    # makes one from a JSON Schema, GBNF or Lark); this sequence's alone, so the others in
    # its batch are unaffected.
    grammar: str | None = None
    # Report each token's log-probability with this many alternatives (None: do not).
    logprobs: int | None = None
    # Replies to sample from the one prompt: it is read once, its KV cells copied to the
    # other choices' sequences (each with its own sampler; a seed counts up per choice).
    n: int = 1
