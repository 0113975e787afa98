"""Cross-origin access: off unless origins are named (`--cors-origin`).

    setup_cors(app, ["https://chat.example.com"])

Headers are added in `on_response_prepare`, so they reach streamed responses too (a
middleware would see a StreamResponse only after its headers were sent). With CORS on, every
response says `Vary: Origin`, the refused and the origin-less ones too: they differ by
`Origin`, and a cache in between must not hand one origin's answer to another. Preflight
`OPTIONS` requests from an allowed origin are answered here; others get nothing extra, and
the browser blocks the call.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

__all__ = ["ALLOWED_METHODS", "CORS_ORIGINS_KEY", "PREFLIGHT_MAX_AGE", "setup_cors"]

ALLOWED_METHODS = "GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE = 600

CORS_ORIGINS_KEY = web.AppKey("chatstream_lite.cors_origins", frozenset)


def setup_cors(app: web.Application, origins: Iterable[str]) -> None:
    allowed = frozenset(o.rstrip("/") for o in origins if o)
    if not allowed:
        return
    app[CORS_ORIGINS_KEY] = allowed
    app.middlewares.append(_preflight)
    app.on_response_prepare.append(_add_headers)


def _allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get(hdrs.ORIGIN)
    return origin if origin and origin in request.app[CORS_ORIGINS_KEY] else None


@web.middleware
async def _preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    if (request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers):
        if _allowed_origin(request) is None:
            return web.json_response({"error": "forbidden", "message": "Origin not allowed."},
                                     status=403)
        return web.Response(status=204, headers={
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOWED_METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS:
                request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "Content-Type"),
            hdrs.ACCESS_CONTROL_MAX_AGE: str(PREFLIGHT_MAX_AGE),
        })
    return await handler(request)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    if "origin" not in ",".join(response.headers.getall(hdrs.VARY, ())).lower():
        response.headers.add(hdrs.VARY, "Origin")
    origin = _allowed_origin(request)
    if origin is not None:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
