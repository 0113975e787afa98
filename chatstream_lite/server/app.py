"""The standalone server's application: every endpoint, the chat UI, JSON errors everywhere.

    app = create_app(ChatStream())      # what `python -m chatstream_lite` serves
    # POST /chat_stream, POST /clear_context, GET /health
    web.run_app(app)

Routes: `POST /chat_stream`, `POST /clear_context` (ChatStream's API), `POST
/v1/chat/completions`, `/v1/completions` and `GET /v1/models` (OpenAI's; also without `/v1`,
as llama-server serves them), `POST /v1/messages` and `/v1/messages/count_tokens`
(Anthropic's), `POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}` and
`GET /v1/responses/{id}/input_items` (OpenAI's Responses API), `GET /health` (200 while the engine
serves, "degraded" without the session store), `GET /ready` (the strict view: 503 while any
check fails), `GET /metrics`, and the browser chat UI at `GET /` (static files shipped in the
package, no build step, no CDN).

Every response carries `SECURITY_HEADERS`: a Content-Security-Policy that lets the page run
only its own script and style files (no inline code) and never be framed, and `nosniff`.
With an API key, `/metrics` needs it like the model's endpoints; `/health`, `/ready` and the
page stay open. `POST /clear_context`, like every other POST, must say it is JSON (415 otherwise):
see `chat_request.require_json`.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from ..errors import ChatStreamError, HTTPProblem
from .anthropic import AnthropicAPI
from .anthropic.framing import anthropic_error_response
from .chat_stream import Callback, ChatStream
from .openai import OpenAIAPI
from .responses import error_response, openai_error_response
from .responses_api import ResponsesAPI

__all__ = ["ANTHROPIC_PATH", "CONTENT_SECURITY_POLICY", "OPENAI_PREFIX", "SECURITY_HEADERS",
           "STATIC_DIR", "UNPREFIXED_OPENAI_PATHS", "create_app", "json_errors",
           "security_headers"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
OPENAI_PREFIX = "/v1"
ANTHROPIC_PATH = "/v1/messages"
# llama-server serves its OpenAI routes without /v1 too: clients whose base URL lacks it work.
UNPREFIXED_OPENAI_PATHS = ("/chat/completions", "/completions", "/models", "/embeddings")
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",              # frame-ancestors for browsers without CSP 2
    "Referrer-Policy": "no-referrer",
}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 4xx/5xx (404, 405, 413, ...) as JSON, like ours, instead of plain text;
    in OpenAI's shape under /v1, where OpenAI clients parse them."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        problem = HTTPProblem(
            exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason,
            {k: v for k, v in exc.headers.items() if k.lower() == "allow"})
        if request.path == ANTHROPIC_PATH or request.path.startswith(ANTHROPIC_PATH + "/"):
            return anthropic_error_response(problem)
        if request.path.startswith(OPENAI_PREFIX + "/") or request.path in UNPREFIXED_OPENAI_PATHS:
            return openai_error_response(problem)
        return error_response(problem)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: so streamed responses get them too; a handler's own win."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def create_app(chat_stream: ChatStream, callback: Callback | None = None) -> web.Application:
    """An application serving every endpoint over `chat_stream`; `callback(request, message)`
    is called once for every accepted `/chat_stream` request, as in
    `handle_chat_stream_request`."""
    # Bodies: our endpoints read at most max_body_size themselves (413 past it); aiohttp's
    # own limit, for anything else that reads a body, is set to the same on purpose.
    app = web.Application(middlewares=[json_errors],
                          client_max_size=chat_stream.config.limits.max_body_size)
    chat_stream.setup(app)
    app.on_response_prepare.append(security_headers)

    async def chat_stream_endpoint(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_chat_stream_request(request, callback=callback)

    async def clear_context_endpoint(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_clear_context_request(request)

    async def history_endpoint(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_history_request(request)

    async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
        try:
            chat_stream.api_key.check(request)
        except ChatStreamError as error:
            return error_response(error)
        return await chat_stream.metrics.handle(request)

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.router.add_post("/chat_stream", chat_stream_endpoint)
    app.router.add_post("/clear_context", clear_context_endpoint)
    app.router.add_get("/history", history_endpoint)
    OpenAIAPI(chat_stream).add_routes(app, OPENAI_PREFIX)
    OpenAIAPI(chat_stream).add_routes(app, "")        # /chat/completions, /completions, /models
    AnthropicAPI(chat_stream).add_routes(app, OPENAI_PREFIX)
    ResponsesAPI(chat_stream).add_routes(app, OPENAI_PREFIX)   # stored in the session store
    app.router.add_get("/health", chat_stream.health.handle)
    app.router.add_get("/ready", chat_stream.health.handle_ready)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR)
    return app
