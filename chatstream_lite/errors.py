"""Our exceptions: one small hierarchy, each with its HTTP status and a stable `code`.

Every failure a client can cause or meet before its stream starts is a `ChatStreamError`
with an HTTP status and a stable machine-readable `code`. This module knows nothing of HTTP
servers (the engine layer raises these too); `server/responses.py` is the one place that
renders them, as ChatStream's JSON or in the shape OpenAI clients parse. `StartupError` is
apart: a reason the server cannot start, said in one log line.
"""

from __future__ import annotations

__all__ = ["BadRequest", "ChatStreamError", "ClientClosedRequest", "ContextLengthExceeded",
           "GenerationFailed", "HTTPProblem", "PayloadTooLarge", "PromptTooLong",
           "QueueFull", "QueueTimeout", "RequestTimeout", "SchemaUnsatisfiable",
           "ServiceUnavailable", "SessionBusy", "SessionStoreUnavailable",
           "StartupError", "TemplateRefused", "Unauthorized", "UnsupportedMediaType"]


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


class TemplateRefused(BadRequest):
    """The model's chat template cannot render the conversation (roles out of order, say):
    the template's own message goes back to the client."""

    code = "template_refused"


class SchemaUnsatisfiable(BadRequest):
    """The reply's grammar (from `response_format` or a tool's parameters) reached a point
    where it allows no token at all: no reply can meet the schema (an empty pattern class,
    say). Found while sampling, so mid-stream it ends the stream as an error event."""

    code = "schema_unsatisfiable"


class Unauthorized(ChatStreamError):
    status = 401
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(ChatStreamError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(ChatStreamError):
    status = 408
    code = "request_timeout"


class ClientClosedRequest(ChatStreamError):
    """The client left before its request was started (while its body arrived, or while it
    was prepared): nothing reached the model, and the answer (nginx's 499) is for the
    metrics and logs, since nobody is left to read it."""
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


class StartupError(Exception):
    """A reason the server cannot start that its message says in full: logged as one line,
    without a stack (the model's kernels fault on this CPU, say). Not an HTTP error: while
    it stands, requests get `ServiceUnavailable`."""
