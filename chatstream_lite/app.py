"""The standalone server's application: every endpoint, the chat UI, JSON errors everywhere.

    app = create_app(ChatStream())      # what `python -m chatstream_lite` serves
    # POST /chat_stream, POST /clear_context, GET /health
    web.run_app(app)

Routes: `POST /chat_stream`, `POST /clear_context` (ChatStream's API), `POST
/v1/chat/completions` and `GET /v1/models` (OpenAI's), `GET /health`, `GET /metrics`, and the
browser chat UI at `GET /` (static files shipped in the package, no build step, no CDN).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from .server.chat_stream import Callback, ChatStream
from .errors import HTTPProblem
from .server.responses import error_response, openai_error_response
from .server.openai_api import OpenAIAPI

STATIC_DIR = Path(__file__).resolve().parent / "static"
OPENAI_PREFIX = "/v1"


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
        if request.path.startswith(OPENAI_PREFIX + "/"):
            return openai_error_response(problem)
        return error_response(problem)


def create_app(chat_stream: ChatStream, callback: Callback | None = None) -> web.Application:
    """An application serving every endpoint over `chat_stream`; `callback(request, message)`
    is called once for every accepted `/chat_stream` request, as in
    `handle_chat_stream_request`."""
    # Bodies: our endpoints read at most max_body_size themselves (413 past it); aiohttp's
    # own limit, for anything else that reads a body, is set to the same on purpose.
    app = web.Application(middlewares=[json_errors], client_max_size=chat_stream.max_body_size)
    chat_stream.setup(app)

    async def chat_stream_endpoint(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_chat_stream_request(request, callback=callback)

    async def clear_context_endpoint(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_clear_context_request(request)

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.router.add_post("/chat_stream", chat_stream_endpoint)
    app.router.add_post("/clear_context", clear_context_endpoint)
    OpenAIAPI(chat_stream).add_routes(app, OPENAI_PREFIX)
    app.router.add_get("/health", chat_stream.health.handle)
    app.router.add_get("/metrics", chat_stream.metrics.handle)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR)
    return app
