"""What an engine reports about a job, in order: `Started`, `Piece`..., then `Finished` or `Failed`.

Events reach the event loop through `Job.deliver`; a job's last event is always exactly one
`Finished` or `Failed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Started:
    """The engine took the job: its prompt is about to be read."""

    prompt_tokens: int
    dropped_messages: int


@dataclass(frozen=True)
class Piece:
    """Text safe to send: never half a UTF-8 character, never part of a stop string."""

    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    reached_model: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Started | Piece | Finished | Failed


def is_last(event: Event) -> bool:
    return isinstance(event, (Finished, Failed))
