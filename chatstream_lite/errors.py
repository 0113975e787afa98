"""Our exceptions, and the one place that turns them into HTTP responses.

Every failure a client can cause or meet before its stream starts is a `ChatStreamError`
with an HTTP status and a stable machine-readable `code`; `error_response()` renders it as
JSON. Nothing else in the package builds error responses by hand.
"""

from __future__ import annotations

from aiohttp import web


class ChatStreamError(Exception):
    """Base class: an error with an HTTP status and a stable `code` for clients."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ChatStreamError):
    status = 400
    code = "bad_request"


class PromptTooLong(BadRequest):
    code = "prompt_too_long"


class PayloadTooLarge(ChatStreamError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ChatStreamError):
    status = 415
    code = "unsupported_media_type"


class SessionBusy(ChatStreamError):
    """The session already has a request in flight (one request per session at a time)."""

    status = 409
    code = "session_busy"


class QueueFull(ChatStreamError):
    """Every running slot and every waiting place is taken."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(ChatStreamError):
    """The engine is not ready (still loading, stopped or dead)."""

    status = 503
    code = "service_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class SessionStoreUnavailable(ServiceUnavailable):
    """The session store (Redis) cannot be reached; requests that need a session wait for it.

    Nothing is lost by the refusal, and the server recovers by itself when the store is back.
    """

    code = "session_store_unavailable"


class GenerationFailed(ChatStreamError):
    """The model failed before the first piece of the reply was sent."""

    status = 500
    code = "generation_failed"


def error_response(error: ChatStreamError) -> web.Response:
    """Render `error` as `{"error": code, "message": ...}` with its status and headers."""
    return web.json_response(
        {"error": error.code, "message": error.message},
        status=error.status,
        headers=error.headers(),
    )
