"""chatstream_lite: a streaming chat server and library on aiohttp and llama.cpp.

    from chatstream_lite import ChatStream
    chat_stream = ChatStream()              # the embedded default model
    chat_stream.setup(app)
    app.router.add_post("/chat_stream", lambda r: chat_stream.handle_chat_stream_request(r))

The public names below are imported on first use, so that importing one layer
(`chatstream_lite.engine`, say) does not import the others (aiohttp, llama_cpp).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

if TYPE_CHECKING:
    from .engine import Engine, SamplingParams
    from .engine.mock import MockEngine
    from .errors import ChatStreamError
    from .model_file import ModelNotFound, default_model_path
    from .prompt import ChatPrompt, ChatTemplate
    from .server.app import create_app
    from .server.chat_stream import ChatStream
    from .server.health import CheckResult
    from .server.openai import OpenAIAPI
    from .sessions import MemorySessionStore, MemoryStorage, RedisSessionStore, SessionStore
    from .status import StreamStatus

_WHERE = {
    "ChatPrompt": ".prompt",
    "ChatStream": ".server.chat_stream",
    "ChatStreamError": ".errors",
    "ChatTemplate": ".prompt",
    "CheckResult": ".server.health",
    "Engine": ".engine",
    "MemorySessionStore": ".sessions",
    "MemoryStorage": ".sessions",
    "MockEngine": ".engine.mock",
    "ModelNotFound": ".model_file",
    "OpenAIAPI": ".server.openai",
    "RedisSessionStore": ".sessions",
    "SamplingParams": ".engine",
    "SessionStore": ".sessions",
    "StreamStatus": ".status",
    "create_app": ".server.app",
    "default_model_path": ".model_file",
}

__all__ = [
    "ChatPrompt", "ChatStream", "ChatStreamError", "ChatTemplate", "CheckResult", "Engine",
    "MemorySessionStore", "MemoryStorage", "MockEngine", "ModelNotFound", "OpenAIAPI",
    "RedisSessionStore", "SamplingParams", "SessionStore", "StreamStatus", "create_app",
    "default_model_path",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'chatstream_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
