"""The generation settings of one request (the sampler chain itself lives with the model)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How one reply is sampled and how long it may be.

        >>> SamplingParams(max_new_tokens=64, temperature=0.0)   # greedy
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None
    stop: tuple[str, ...] = ()
