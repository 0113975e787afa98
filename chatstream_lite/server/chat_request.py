"""Request bodies from the wire: read within limits, parsed as hostile JSON, and the
`/chat_stream` body as its model.

    body = await read_body(request, limit, timeout)    # 415, 413, 408, 499
    data = parse_json_object(body)                     # NaN, lone surrogates, deep nesting: 400
    chat = parse_chat_request(body, defaults)          # {"user_input": "Hello", ...}

Every problem is a `BadRequest` (400) or `PayloadTooLarge` (413) with a message that says
which field is wrong and why; `/chat_stream` ignores unknown fields so that newer clients
keep working. The OpenAI routes' bodies are openai/protocol.py's.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from aiohttp import hdrs, web
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..config import DEFAULTS
from ..engine import SamplingParams
from ..errors import (
    BadRequest,
    ClientClosedRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from .request_model import SamplingFields, validate

__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_BODY_SIZE", "LARGE_BODY", "MAX_JSON_DEPTH",
           "ChatRequest", "ChatStreamBody", "parse_chat_request", "parse_json_object",
           "parse_off_loop", "read_body", "require_json"]

DEFAULT_MAX_BODY_SIZE = DEFAULTS.limits.max_body_size
# Seconds a request body may take to arrive after its head (30: a 1 MiB body needs that long
# only below ~35 KB/s, and a client that stalls longer is more likely an attack than a user).
DEFAULT_BODY_TIMEOUT = DEFAULTS.limits.body_timeout
# Our bodies nest three levels (messages -> message -> content parts); far more is an attack.
MAX_JSON_DEPTH = 32
# Bodies above this are parsed in a worker thread: checking 20,000 messages takes a few
# hundred milliseconds of Python, which on the event loop would stall every running stream
# (benchmarks/big_requests.py). The GIL still passes between them every few milliseconds.
LARGE_BODY = 64 * 1024
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

T = TypeVar("T")


async def parse_off_loop(parse: Callable[..., T], body: bytes, *args: Any,
                         always: bool = False) -> T:
    """`parse(body, *args)`, in a worker thread when the body is large, or `always` (a parse
    whose cost does not follow the body's size: a small JSON Schema can ask for a grammar
    that takes milliseconds to seconds to build)."""
    if always or len(body) > LARGE_BODY:
        return await asyncio.to_thread(parse, body, *args)
    return parse(body, *args)


@dataclass(frozen=True)
class ChatRequest:
    user_input: str
    regenerate: bool
    params: SamplingParams


async def read_body(request: web.Request, limit: int,
                    timeout: float | None = DEFAULT_BODY_TIMEOUT) -> bytes:
    """The raw body, refusing other content types than JSON (415), bodies over `limit`
    bytes (413) and bodies that take longer than `timeout` seconds to arrive (408).

    Without the deadline a client that sends a head and then trickles (or withholds) its
    body holds a connection and a handler for good: the connection cap counts it as busy,
    so a few hundred of them would turn every newcomer away."""
    require_json(request)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is over the {limit}-byte limit.")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"The request body is over the {limit}-byte limit.")
                chunks.append(chunk)
    except ConnectionResetError:  # aiohttp's "Connection lost": else a traceback per client
        raise ClientClosedRequest(
            "The client closed the connection before its body arrived.") from None
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout:g} s.") from None
    return b"".join(chunks)


def require_json(request: web.Request) -> None:
    """`UnsupportedMediaType` (415) unless the request says it is JSON, a missing header too.

    A page on another origin cannot send a JSON content type without a CORS preflight, which
    only `--cors-origin` origins pass: so a cross-site form or `fetch` cannot write turns into
    a user's history with the user's cookie (SameSite=Lax lets same-site pages, such as
    another port of localhost, send it).
    """
    if hdrs.CONTENT_TYPE not in request.headers:
        raise UnsupportedMediaType("Content-Type must be application/json; it is missing.")
    if not _is_json(request.content_type):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type!r}."
        )


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """`body` as a JSON object; NaN, Infinity, invalid UTF-8, lone surrogates and nesting
    deeper than `MAX_JSON_DEPTH` are refused."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"The body is not valid UTF-8 (byte {error.start}).") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as error:
        raise BadRequest(f"The body is not valid JSON: {error}") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise BadRequest(f"The body is nested too deeply (at most {MAX_JSON_DEPTH} levels)."
                         ) from None
    if not isinstance(data, dict):
        raise BadRequest(f"The body must be a JSON object, not {type(data).__name__}.")
    if _depth(data) > MAX_JSON_DEPTH:
        raise BadRequest(f"The body is nested too deeply (at most {MAX_JSON_DEPTH} levels).")
    try:  # the bytes are UTF-8, so only an escape such as "\ud800" can be a lone surrogate
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("The body is not valid Unicode text: it holds a lone surrogate "
                         "(a \\ud800-\\udfff escape that is not part of a pair).") from None
    return data


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and objects, without recursion (what a handler might
    do with a 900-level value, `repr` included, would recurse)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in item
                             if isinstance(child, (list, dict)))
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


class ChatStreamBody(SamplingFields):
    """`POST /chat_stream`'s body; unknown fields are ignored, as ChatStream did."""

    user_input: Any = None            # checked below: ignored when regenerating
    regenerate: bool = False
    max_new_tokens: int | None = Field(None, ge=1)

    @field_validator("max_new_tokens")
    @classmethod
    def _within_the_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = (info.context or {}).get("cap")
        if value is not None and cap is not None and value > cap:
            raise ValueError(f"'max_new_tokens' must be an integer from 1 to {cap}.")
        return value

    @model_validator(mode="after")
    def _has_input(self) -> ChatStreamBody:
        if self.regenerate:
            return self     # the last user message is answered again
        if not isinstance(self.user_input, str):
            raise ValueError("'user_input' is required and must be a string.")
        if not self.user_input.strip():
            raise ValueError("'user_input' must not be empty.")
        return self


def parse_chat_request(body: bytes, defaults: SamplingParams) -> ChatRequest:
    """Check a `/chat_stream` body; `defaults.max_new_tokens` is also the per-request cap."""
    data = validate(ChatStreamBody, parse_json_object(body), {"cap": defaults.max_new_tokens})
    params = data.sampling(defaults)
    if data.max_new_tokens is not None:
        params = replace(params, max_new_tokens=data.max_new_tokens)
    return ChatRequest("" if data.regenerate else data.user_input, data.regenerate, params)
