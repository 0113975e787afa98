"""The raw measurements: one `Record` per streamed reply, token counts, percentiles, RSS.

Every system's reply is timed the same way on the client side (`time.perf_counter`), and
its tokens are counted the same way afterwards: by tokenizing the text it sent with the
model's own vocabulary. Greedy replies are the same text everywhere, so they count the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp


@dataclass
class Record:
    """The timeline of one streamed reply, in `time.perf_counter` seconds."""

    sent: float = field(default_factory=time.perf_counter)
    first: float | None = None      # the first non-empty piece of text arrived
    last: float | None = None       # the last non-empty piece arrived
    done: float | None = None       # the stream ended (or the client closed it)
    text: str = ""
    error: str | None = None
    tokens: int = 0                 # filled by `Tokenizer.count_records`

    def add(self, piece: str) -> None:
        if not piece:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.text += piece

    def finish(self, error: str | None = None) -> Record:
        self.done = time.perf_counter()
        self.error = error
        return self

    @property
    def ok(self) -> bool:
        return self.error is None and self.first is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def stream_rate(self) -> float | None:
        """Tokens/s of this stream between its first and its last piece."""
        if not self.ok or self.last is None or self.tokens < 2 or self.last <= self.first:  # type: ignore[operator]
            return None
        return (self.tokens - 1) / (self.last - self.first)  # type: ignore[operator]

    def to_json(self, origin: float, with_text: bool = False) -> dict[str, Any]:
        """Times relative to `origin`, so records from two processes can be compared."""
        data = asdict(self)
        for key in ("sent", "first", "last", "done"):
            if data[key] is not None:
                data[key] = round(data[key] - origin, 6)
        if not with_text:
            data.pop("text")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(**data)


class Tokenizer:
    """The model's vocabulary only (no weights), to count the tokens of a reply."""

    def __init__(self, model_path: str | Path) -> None:
        self._llm = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def count_records(self, records: Sequence[Record]) -> None:
        for record in records:
            record.tokens = self.count(record.text)

    def close(self) -> None:
        self._llm.close()


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    data = sorted(v for v in values if v is not None and math.isfinite(v))
    if not data:
        return None
    rank = (len(data) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return data[low] + (data[high] - data[low]) * (rank - low)


def mean(values: Sequence[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return sum(data) / len(data) if data else None


# -- memory of a process (Linux /proc; psutil elsewhere when installed) ---------------------
def _proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def rss_mb(pid: int) -> float | None:
    """Resident set size of `pid` now, in MiB."""
    kb = _proc_status_kb(pid, "VmRSS")
    if kb is not None:
        return kb / 1024
    try:
        import psutil  # the `bench` extra; only needed where /proc is missing
        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - no way to measure is reported as "n/a"
        return None


def peak_rss_mb(pid: int) -> float | None:
    """The highest resident set size `pid` has had (VmHWM), in MiB."""
    kb = _proc_status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024
