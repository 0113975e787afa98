"""What an engine reports about a job, in order: `Started`, `Piece`..., then `Finished` or `Failed`.

Events reach the event loop through `Job.deliver`; a job's last event is always exactly one
`Finished` or `Failed`. A job asking for several choices (`SamplingParams.n`) gets the pieces
of all of them, each marked with its choice, and still one `Finished` once every choice ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Event", "Failed", "Finished", "FinishReason", "is_last", "Piece", "Started",
           "TokenLogprob"]

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Started:
    """The engine took the job: its prompt is about to be read."""

    prompt_tokens: int
    dropped_messages: int


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (`SamplingParams.logprobs`),
    with the most likely alternatives at that step, best first."""

    token: bytes            # the token's bytes: possibly part of a UTF-8 character
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class Piece:
    """Text safe to send: never half a UTF-8 character, never part of a stop string.
    `logprobs`: the tokens the text came from, when asked for (a token whose text was held
    back goes with the piece that releases it; one eaten by a stop string is dropped)."""

    text: str
    choice: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    reached_model: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    choices: tuple[FinishReason, ...] = ()   # each choice's own reason, when n > 1
    # The stop string that ended a one-choice reply ("stop"), None for the end-of-generation
    # token: Anthropic's `stop_sequence` tells a client's own stop strings from an end of turn.
    stop_sequence: str | None = None


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Started | Piece | Finished | Failed


def is_last(event: Event) -> bool:
    return isinstance(event, (Finished, Failed))
