"""What ChatStream needs from an engine: the interface `Engine` and `MockEngine` both offer.

    engine: EngineProtocol = MockEngine(...) if mock else Engine(config)
    job = engine.submit(messages, params)      # QueueFull / ServiceUnavailable, synchronously
    async for event in job.events(): ...       # Started, Piece..., Finished | Failed
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Hashable, Protocol

from .engine import EngineStats, Event, ModelInfo, SamplingParams
from .prompt import Message


class JobProtocol(Protocol):
    def cancel(self) -> None: ...

    def events(self) -> AsyncIterator[Event]: ...


class EngineProtocol(Protocol):
    model_info: ModelInfo | None
    stats: EngineStats
    fault_hook: Callable[[int], None] | None

    async def start(self) -> ModelInfo: ...

    async def close(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def failure(self) -> BaseException | None:
        """Why the engine died while serving, if it did (it stays dead: restart the server)."""

    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...

    def submit(self, messages: list[Message], params: SamplingParams, *,
               cache_key: Hashable | None = None) -> JobProtocol: ...
