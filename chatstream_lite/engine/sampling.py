"""The generation settings of one request (the sampler chain itself lives with the model)."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import DEFAULTS


@dataclass(frozen=True)
class SamplingParams:
    """How one reply is sampled and how long it may be.

        >>> SamplingParams(max_new_tokens=64, temperature=0.0)   # greedy
    """

    max_new_tokens: int = DEFAULTS.max_new_tokens
    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p
    top_k: int = DEFAULTS.top_k
    repeat_penalty: float = DEFAULTS.repeat_penalty
    seed: int | None = DEFAULTS.seed
    stop: tuple[str, ...] = ()
