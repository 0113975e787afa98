"""Stored responses (OpenAI's Responses API, `store: true`): kept beside the sessions, on
the same backend, so that `previous_response_id` continues a conversation on any replica.

    store = MemoryResponseStore(max_responses=10_000, ttl=30 * 24 * 3600)
    await store.put(StoredResponse(response_id, owner, record))   # SessionStoreUnavailable
    record = await store.get(response_id, owner)                     # None: no such response
    await store.delete(response_id, owner)                           # False: nothing deleted

A record is one JSON object (the response, its input items and the conversation up to it),
written once and never changed. `owner` is a digest of the credential it was created with
(empty without an API key): a record read with another owner is as absent as a missing one,
so an id alone is not a capability. Retention: `ttl` seconds after creation (the `memory`
store also keeps at most `max_responses`, the oldest forgotten first; Redis expires its keys).
"""

from __future__ import annotations

import hmac
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["DEFAULT_MAX_RESPONSES", "DEFAULT_RESPONSE_TTL", "MemoryResponseStore",
           "ResponseStore", "StoredResponse"]

# OpenAI keeps a stored response 30 days.
DEFAULT_RESPONSE_TTL = 30 * 24 * 3600
DEFAULT_MAX_RESPONSES = 10_000


@dataclass(frozen=True)
class StoredResponse:
    response_id: str
    owner: str                  # a digest of the creating credential ("" without a key)
    record: dict[str, Any]      # JSON-able

    def encode(self) -> str:
        return json.dumps({"owner": self.owner, "record": self.record},
                          ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def decode(cls, response_id: str, text: str | bytes) -> StoredResponse | None:
        try:
            data = json.loads(text)
            return cls(response_id, str(data["owner"]), dict(data["record"]))
        except (ValueError, KeyError, TypeError):
            return None   # not ours, or damaged: as absent

    def owned_by(self, owner: str) -> bool:
        return hmac.compare_digest(self.owner.encode(), owner.encode())


class ResponseStore(Protocol):
    """Where stored responses live; every method raises `SessionStoreUnavailable` when the
    backend cannot be reached."""

    async def put(self, stored: StoredResponse) -> None: ...

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The response, if it exists, has not expired and belongs to `owner`."""
        ...

    async def delete(self, response_id: str, owner: str) -> bool:
        """True if `owner`'s response was there and is gone now."""
        ...


class MemoryResponseStore:
    """`ResponseStore` in this process: bounded by count and age, oldest forgotten first."""

    def __init__(self, *, max_responses: int = DEFAULT_MAX_RESPONSES,
                 ttl: int = DEFAULT_RESPONSE_TTL) -> None:
        if max_responses < 1 or ttl < 1:
            raise ValueError("max_responses and ttl must be positive")
        self.max_responses = max_responses
        self.ttl = ttl
        # id -> (when stored, JSON text: a copy nobody can mutate); oldest first.
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def put(self, stored: StoredResponse) -> None:
        now = time.monotonic()
        self._data[stored.response_id] = (now, stored.encode())
        self._data.move_to_end(stored.response_id)
        self._evict(now)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        self._evict(time.monotonic())
        entry = self._data.get(response_id)
        stored = StoredResponse.decode(response_id, entry[1]) if entry else None
        return stored if stored is not None and stored.owned_by(owner) else None

    async def delete(self, response_id: str, owner: str) -> bool:
        if await self.get(response_id, owner) is None:
            return False
        del self._data[response_id]
        return True

    def _evict(self, now: float) -> None:
        while self._data:
            stored_at = next(iter(self._data.values()))[0]
            if now - stored_at <= self.ttl and len(self._data) <= self.max_responses:
                return
            self._data.popitem(last=False)
