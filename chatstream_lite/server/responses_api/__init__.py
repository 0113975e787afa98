"""OpenAI's Responses API, in one package: `/v1/responses` and its stored responses.

    ResponsesAPI(chat_stream).add_routes(app)      # or ResponsesAPI(runtime, responses=store)

    routes.py     ResponsesAPI: the handlers; the owner check of stored responses
    protocol.py   the request body (openai-python's field names), said as chat completions
    framing.py    the `response` object and its streamed events

A sibling of server/openai/: tools, grammars and the tool history are chat completions'
(openai/tools.py, tool_formats.py), reused, not forked; stored responses live in the
session store's response store (sessions/responses.py), in memory or in Redis.
"""

from __future__ import annotations

from .routes import ResponsesAPI

__all__ = ["ResponsesAPI"]
