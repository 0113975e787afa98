"""The optional API key: `Authorization: Bearer KEY` on the paths it protects.

    api_key = ApiKey("s3cret", protect=("/v1/",))     # ChatStream(api_key=..., api_key_paths=...)
    api_key.check(request)       # raises Unauthorized (401) when the path needs the key

Handlers call `check` first thing, inside the code that turns errors into responses, so a
refused key is rendered in the endpoint's own error shape and counted as a rejection. The
comparison is constant-time (`hmac.compare_digest`) so timing does not leak the key.
"""

from __future__ import annotations

import hmac
from typing import Sequence

from aiohttp import hdrs, web

from .errors import Unauthorized

DEFAULT_PROTECTED = ("/v1/",)


class ApiKey:
    def __init__(self, key: str | None, protect: Sequence[str] = DEFAULT_PROTECTED) -> None:
        if key is not None and not key:
            raise ValueError("the API key must not be empty")
        self._expected = f"Bearer {key}".encode() if key else None
        self.protect = tuple(protect)

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def protects(self, path: str) -> bool:
        return self._expected is not None and path.startswith(self.protect)

    def check(self, request: web.Request) -> None:
        if not self.protects(request.path):
            return
        assert self._expected is not None
        given = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._expected):
            raise Unauthorized(
                "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.")
