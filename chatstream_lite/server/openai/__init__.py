"""OpenAI's wire format, in one package: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

    OpenAIAPI(runtime).add_routes(app)          # or OpenAIAPI(chat_stream): the same runtime

    routes.py        OpenAIAPI: the handlers; a validated request becomes an admitted job
    framing.py       the reply as one JSON body or as Server-Sent Events chunks
    tools.py         OpenAI's tools: the request's tools, the calls in a reply, their framings
    tool_formats.py  how a chat template shows tools to the model and how its reply is read

The engine never imports anything here: a new wire format is a sibling package.
"""

from __future__ import annotations

from .routes import OpenAIAPI

__all__ = ["OpenAIAPI"]
