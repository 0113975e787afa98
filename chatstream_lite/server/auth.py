"""The optional API key: `Authorization: Bearer KEY` (or Anthropic's `x-api-key: KEY`) on
everything that reaches the model or shows the server's state.

    api_key = ApiKey("s3cret")                  # ChatStream(api_key=..., api_key_paths=...)
    api_key = ApiKey("s3cret", OPEN_CHAT_API_KEY_PATHS)    # --api-key-open-chat
    api_key.check(request)       # raises Unauthorized (401) when the path needs the key

Every handler that reaches the model or shows state (`/chat_stream`, `/clear_context`,
`/history`, `/v1/*`, `/metrics`) calls `check` first thing, inside the code that turns errors into
responses, so a refused key is rendered in the endpoint's own error shape and counted as a
rejection. `/health` and the chat page (`GET /`, `/static/`) never call it: they stay open.
By default a key guards every path those handlers are routed at (`DEFAULT_API_KEY_PATHS`:
every path), so an app that mounts them elsewhere is guarded too; `protect` narrows it to
some path prefixes, e.g. `OPEN_CHAT_API_KEY_PATHS` to let the browser page's chat routes
through.

Either header is accepted on every guarded path, as llama-server does: the `anthropic` client
sends `x-api-key`, the `openai` client `Authorization`. The comparisons are constant-time
(`hmac.compare_digest`) so timing does not leak the key.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from aiohttp import hdrs, web

from ..config import DEFAULT_API_KEY_PATHS
from ..errors import Unauthorized

__all__ = ["X_API_KEY", "ApiKey"]

X_API_KEY = "x-api-key"      # Anthropic's header


class ApiKey:
    def __init__(self, key: str | None, protect: Sequence[str] = DEFAULT_API_KEY_PATHS) -> None:
        if key is not None and not key:
            raise ValueError("the API key must not be empty")
        self._expected = f"Bearer {key}".encode() if key else None
        self._key = key.encode() if key else None
        self.protect = tuple(protect)

    def protects(self, path: str) -> bool:
        return self._expected is not None and path.startswith(self.protect)

    def check(self, request: web.Request) -> None:
        if not self.protects(request.path):
            return
        assert self._expected is not None
        assert self._key is not None
        given = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "surrogateescape")
        given_key = request.headers.get(X_API_KEY, "").encode("utf-8", "surrogateescape")
        # Both compared, whichever is sent: no timing tells which header was tried.
        bearer_ok = hmac.compare_digest(given, self._expected)
        key_ok = hmac.compare_digest(given_key, self._key)
        if not (bearer_ok or key_ok):
            raise Unauthorized(
                "Missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                "(or 'x-api-key: <key>').")
