"""Anthropic's wire format, in one package: `POST /v1/messages` and `/v1/messages/count_tokens`.

    AnthropicAPI(runtime).add_routes(app)        # or AnthropicAPI(chat_stream): same runtime

    routes.py     AnthropicAPI: the handlers over the shared runtime and request path
    protocol.py   the request bodies (pydantic), written in OpenAI's terms for the engine
    framing.py    the reply as a `message` object or as Anthropic's stream of events

Tools, prefill and the sampling ranges are the chat completions' own (server/openai/), read
from this format's shapes: one set of rules for both.
"""

from __future__ import annotations

from .routes import AnthropicAPI

__all__ = ["AnthropicAPI"]
