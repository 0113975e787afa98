"""The one place that turns our errors into HTTP responses (`errors.py` knows no HTTP).

    return error_response(error)           # {"error": code, "message": ...}
    return openai_error_response(error)    # {"error": {"message", "type", "param", "code"}}
"""

from __future__ import annotations

from aiohttp import web

from ..errors import ChatStreamError

__all__ = ["error_response", "openai_error_response"]


def error_response(error: ChatStreamError) -> web.Response:
    """Render `error` as `{"error": code, "message": ...}` with its status and headers."""
    return web.json_response(
        {"error": error.code, "message": error.message},
        status=error.status,
        headers=error.headers(),
    )


# OpenAI's error `type` by status, as llama.cpp's server also names them.
_OPENAI_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "unavailable_error",
}


def openai_error_response(error: ChatStreamError) -> web.Response:
    """Render `error` as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""
    kind = _OPENAI_TYPES.get(error.status) or (
        "server_error" if error.status >= 500 else "invalid_request_error")
    return web.json_response(
        {"error": {"message": error.message, "type": kind, "param": error.param,
                   "code": error.code}},
        status=error.status,
        headers=error.headers(),
    )
