"""The `/chat_stream` request body: parsed and checked before anything else happens.

    {"user_input": "Hello", "regenerate": false, "max_new_tokens": 64, "temperature": 0.2}

Every problem is a `BadRequest` (400) or `PayloadTooLarge` (413) with a message that says
which field is wrong and why; unknown fields are ignored so that newer clients keep working.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from aiohttp import hdrs, web

from .engine import SamplingParams
from .errors import (
    BadRequest,
    ClientClosedRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from .settings import DEFAULTS, SEED_LIMIT

DEFAULT_MAX_BODY_SIZE = 1024 * 1024
# Seconds a request body may take to arrive after its head (30: a 1 MiB body needs that long
# only below ~35 KB/s, and a client that stalls longer is more likely an attack than a user).
DEFAULT_BODY_TIMEOUT = DEFAULTS.body_timeout
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


def parse_chat_request(body: bytes, defaults: SamplingParams) -> ChatRequest:
    """Check a `/chat_stream` body; `defaults.max_new_tokens` is also the per-request cap."""
    data = parse_json_object(body)
    regenerate = data.get("regenerate", False)
    if not isinstance(regenerate, bool):
        raise BadRequest("'regenerate' must be true or false.")
    user_input = data.get("user_input")
    if regenerate:
        user_input = ""  # ignored: the last user message is answered again
    elif not isinstance(user_input, str):
        raise BadRequest("'user_input' is required and must be a string.")
    elif not user_input.strip():
        raise BadRequest("'user_input' must not be empty.")
    return ChatRequest(user_input, regenerate, sampling_params(data, defaults))


def sampling_params(data: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    """The generation parameters a request may set, each checked against its range."""
    cap = defaults.max_new_tokens
    changes: dict[str, Any] = {}
    if (v := data.get("max_new_tokens")) is not None:
        changes["max_new_tokens"] = integer_field("max_new_tokens", v, 1, cap)
    if (v := data.get("temperature")) is not None:
        changes["temperature"] = number_field("temperature", v, 0.0, 2.0)
    if (v := data.get("top_p")) is not None:
        changes["top_p"] = number_field("top_p", v, 0.0, 1.0)
    if (v := data.get("top_k")) is not None:
        changes["top_k"] = integer_field("top_k", v, 0, 1_000_000)
    if (v := data.get("repeat_penalty")) is not None:
        changes["repeat_penalty"] = number_field("repeat_penalty", v, 0.0, 10.0)
    for name in ("frequency_penalty", "presence_penalty"):
        if (v := data.get(name)) is not None:
            changes[name] = number_field(name, v, -2.0, 2.0)    # OpenAI's range
    if (v := data.get("seed")) is not None:
        changes["seed"] = integer_field("seed", v, 0, SEED_LIMIT - 1)
    return replace(defaults, **changes)


def integer_field(name: str, value: Any, low: int, high: int) -> int:
    """`value` if it is an integer from `low` to `high` (not a bool), else `BadRequest`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def number_field(name: str, value: Any, low: float, high: float) -> float:
    """`value` as a float if it is a finite number from `low` to `high`, else `BadRequest`."""
    # Range first: an int compares with floats exactly, while math.isfinite(10**400) raises.
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not low <= value <= high
        or not math.isfinite(value)
    ):
        raise BadRequest(f"'{name}' must be a number from {low} to {high}.", param=name)
    return float(value)
