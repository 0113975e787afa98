"""Our exceptions, and the one place that turns them into HTTP responses.

Every failure a client can cause or meet before its stream starts is a `ChatStreamError`
with an HTTP status and a stable machine-readable `code`; `error_response()` renders it as
ChatStream's JSON, `openai_error_response()` in the shape OpenAI clients parse. Nothing else
in the package builds error responses by hand.
"""

from __future__ import annotations

from aiohttp import web


class ChatStreamError(Exception):
    """Base class: an error with an HTTP status and a stable `code` for clients."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param      # the request field at fault, when there is one

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ChatStreamError):
    status = 400
    code = "bad_request"


class PromptTooLong(BadRequest):
    code = "prompt_too_long"


class ContextLengthExceeded(BadRequest):
    """A stateless (OpenAI) request whose messages do not fit: the client must trim them."""

    code = "context_length_exceeded"


class Unauthorized(ChatStreamError):
    status = 401
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(ChatStreamError):
    status = 413
    code = "payload_too_large"


class ClientClosedRequest(ChatStreamError):
    """The client left before its whole request arrived: nothing was started, and the
    answer (nginx's 499) is for the metrics and logs, since nobody is left to read it."""
    status = 499
    code = "client_closed_request"


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


class QueueTimeout(ServiceUnavailable):
    """A request waited in the queue longer than `max_queue_wait`: refused like a full queue,
    before it reached the model (the client may retry, or try another replica)."""

    code = "queue_timeout"


class HTTPProblem(ChatStreamError):
    """An error aiohttp itself raised (404, 405, 413, ...), carried into our JSON shapes."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return self._headers
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
