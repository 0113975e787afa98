"""The standalone server's application: ChatStream's endpoints plus JSON errors everywhere.

    app = create_app(ChatStream())      # what `python -m chatstream_lite` serves
    # POST /chat_stream, POST /clear_context, GET /health
    web.run_app(app)
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from .chat_stream import ChatStream


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 4xx/5xx (404, 405, 413, ...) as JSON, like ours, instead of plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return web.json_response(
            {"error": code, "message": exc.text or exc.reason},
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )


def create_app(chat_stream: ChatStream) -> web.Application:
    """An application serving `POST /chat_stream`, `POST /clear_context` and `GET /health`."""
    app = web.Application(middlewares=[json_errors])
    chat_stream.setup(app)

    async def chat_stream_endpoint(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_chat_stream_request(request)

    async def clear_context_endpoint(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_clear_context_request(request)

    async def health_endpoint(request: web.Request) -> web.Response:
        # 503 while anything a chat request needs is down, so a load balancer skips us.
        checks = {
            "engine": chat_stream.engine.ready,
            "session_store": await chat_stream.session_store.healthy(),
        }
        healthy = all(checks.values())
        return web.json_response(
            {"status": "ok" if healthy else "unavailable", "checks": checks,
             "session_store": chat_stream.session_store.kind},
            status=200 if healthy else 503,
        )

    app.router.add_post("/chat_stream", chat_stream_endpoint)
    app.router.add_post("/clear_context", clear_context_endpoint)
    app.router.add_get("/health", health_endpoint)
    return app
