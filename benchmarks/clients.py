"""Real HTTP clients, one chat user each: ChatStream's `/chat_stream` and OpenAI-style SSE.

A `User` is one chat session (its own cookie jar, its own connection); `send()` streams one
reply into a `Record`, and with `close_after=N` closes the connection as soon as N tokens
have arrived, like a user closing the tab. A `Target` makes users and says how many tokens
the server generated for the last disconnected request (`TokenSource`), where it can tell.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from .measure import Record, Tokenizer
from .workload import REPEAT_PENALTY, TEMPERATURE


class User(Protocol):
    async def send(self, text: str, max_tokens: int, close_after: int | None = None) -> Record: ...

    async def close(self) -> None: ...


class TokenSource(Protocol):
    """Where a target learns how many tokens the server generated for one request."""

    async def marker(self) -> Any: ...

    async def generated_since(self, marker: Any) -> tuple[int | None, str]: ...


class Target(Protocol):
    tokens: TokenSource

    def user(self, system: str | None = None) -> User: ...

    async def close(self) -> None: ...


def _greedy(max_tokens_field: str, max_tokens: int) -> dict[str, Any]:
    return {max_tokens_field: max_tokens, "temperature": TEMPERATURE,
            "repeat_penalty": REPEAT_PENALTY}


class _HttpUser:
    """What both HTTP users share: a session with its own cookie jar and the stream loop."""

    def __init__(self, base_url: str, timeout: float, tokenizer: Tokenizer) -> None:
        self._session = aiohttp.ClientSession(
            base_url, cookie_jar=aiohttp.CookieJar(unsafe=True),
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10),
        )
        self._tokenizer = tokenizer

    async def _stream(self, path: str, body: dict[str, Any], close_after: int | None,
                      pieces: Callable[[aiohttp.ClientResponse], Any],
                      record: Record | None = None) -> Record:
        record = record or Record()
        try:
            async with self._session.post(path, json=body) as response:
                if response.status != 200:
                    text = (await response.text())[:200]
                    return record.finish(f"HTTP {response.status}: {text}")
                async for piece in pieces(response):
                    record.add(piece)
                    if close_after is not None and self._tokenizer.count(record.text) >= close_after:
                        response.close()  # drops the TCP connection: a real disconnect
                        return record.finish()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
            return record.finish(f"{type(error).__name__}: {error}")
        return record.finish()

    async def close(self) -> None:
        await self._session.close()


class ChatStreamUser(_HttpUser):
    """A ChatStream client: the server keeps the history in the session (cookie).

    `/chat_stream` has one server-wide system prompt, so a user's own long system prompt
    opens its first message instead; the model reads about as many tokens either way.
    """

    def __init__(self, base_url: str, timeout: float, tokenizer: Tokenizer,
                 system: str | None = None) -> None:
        super().__init__(base_url, timeout, tokenizer)
        self._preamble = system

    async def send(self, text: str, max_tokens: int, close_after: int | None = None,
                   record: Record | None = None) -> Record:
        """`record`: one the caller made, to watch the reply while it streams."""
        if self._preamble:
            text, self._preamble = f"{self._preamble}\n\n{text}", None
        body = {"user_input": text, **_greedy("max_new_tokens", max_tokens)}
        return await self._stream("/chat_stream", body, close_after, _text_pieces, record)

    async def clear(self) -> int:
        """Forget this user's history on the server (`POST /clear_context`)."""
        async with self._session.post("/clear_context", json={}) as response:
            await response.read()
            return response.status


class OpenAIUser(_HttpUser):
    """An OpenAI chat-completions client: it keeps the history and sends all of it."""

    def __init__(self, base_url: str, timeout: float, tokenizer: Tokenizer,
                 system: str | None = None, path: str = "/v1/chat/completions") -> None:
        super().__init__(base_url, timeout, tokenizer)
        self._path = path
        self._messages: list[dict[str, str]] = (
            [{"role": "system", "content": system}] if system else [])

    async def send(self, text: str, max_tokens: int, close_after: int | None = None) -> Record:
        messages = [*self._messages, {"role": "user", "content": text}]
        body = {"messages": messages, "stream": True, **_greedy("max_tokens", max_tokens)}
        record = await self._stream(self._path, body, close_after, _sse_pieces)
        if record.ok:
            self._messages = [*messages, {"role": "assistant", "content": record.text}]
        return record


async def _text_pieces(response: aiohttp.ClientResponse) -> Any:
    decoder = codecs.getincrementaldecoder("utf-8")()
    async for chunk in response.content.iter_any():
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


async def _sse_pieces(response: aiohttp.ClientResponse) -> Any:
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:
            raise ValueError(f"server error event: {str(event['error'])[:200]}")
        for choice in event.get("choices") or []:
            yield (choice.get("delta") or {}).get("content") or ""


async def route_status(base_url: str, path: str) -> int:
    """The status of a one-token, non-streaming POST to `path` (404: no such route)."""
    body = {"messages": [{"role": "user", "content": "Hi"}], **_greedy("max_tokens", 1)}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session, \
            session.post(base_url + path, json=body) as response:
        await response.read()
        return response.status


# -- how many tokens did the server generate for a disconnected request? --------------------
_DISCONNECT_LINE = re.compile(r"status=(client_disconnected\w*)\b.*?\btokens=(\d+)")


@dataclass
class LogTokens:
    """chatstream_lite logs one line per request with its status and `tokens=`."""

    log_path: Path
    wait: float = 15.0

    async def marker(self) -> int:
        return self.log_path.stat().st_size

    async def generated_since(self, marker: int) -> tuple[int | None, str]:
        for _ in range(int(self.wait / 0.05)):
            with self.log_path.open("rb") as log:
                log.seek(marker)
                for line in log.read().decode("utf-8", "replace").splitlines():
                    found = _DISCONNECT_LINE.search(line)
                    if found:
                        return int(found.group(2)), f"server log ({found.group(1)})"
            await asyncio.sleep(0.05)
        return None, "no disconnect line in the server log"


@dataclass
class MetricsTokens:
    """llama-server's Prometheus counter `tokens_predicted_total` (cancelled slots included)."""

    base_url: str
    wait: float = 15.0

    async def _metrics(self) -> dict[str, float]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.get(self.base_url + "/metrics") as response:
            text = await response.text()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name.split(":")[-1]] = float(value)
        return values

    async def marker(self) -> float:
        return (await self._metrics()).get("tokens_predicted_total", 0.0)

    async def generated_since(self, marker: float) -> tuple[int | None, str]:
        for _ in range(int(self.wait / 0.05)):
            metrics = await self._metrics()
            if metrics.get("requests_processing", 0) == 0:
                return int(metrics.get("tokens_predicted_total", 0) - marker), "/metrics"
            await asyncio.sleep(0.05)
        return None, "the slot was still busy"


@dataclass
class NoTokens:
    reason: str

    async def marker(self) -> None:
        return None

    async def generated_since(self, marker: None) -> tuple[int | None, str]:
        return None, self.reason


@dataclass
class HttpTarget:
    """A server on a loopback port, spoken to as `/chat_stream` or as OpenAI chat."""

    base_url: str
    kind: str                      # "chat_stream" or "openai"
    tokenizer: Tokenizer
    tokens: TokenSource
    timeout: float = 300.0

    def user(self, system: str | None = None) -> User:
        if self.kind == "chat_stream":
            return ChatStreamUser(self.base_url, self.timeout, self.tokenizer, system)
        return OpenAIUser(self.base_url, self.timeout, self.tokenizer, system)

    async def close(self) -> None:
        return None
