"""chatstream_lite: a streaming chat server and library on aiohttp and llama.cpp.

    from chatstream_lite import ChatStream
    chat_stream = ChatStream()              # the embedded default model
    chat_stream.setup(app)
    app.router.add_post("/chat_stream", lambda r: chat_stream.handle_chat_stream_request(r))
"""

from .app import create_app
from .chat_stream import ChatStream
from .engine import SamplingParams
from .errors import ChatStreamError
from .health import CheckResult
from .model_file import ModelNotFound, default_model_path
from .openai_api import OpenAIAPI
from .prompt import ChatPrompt, ChatTemplate
from .redis_sessions import RedisSessionStore
from .sessions import MemorySessionStore, MemoryStorage, SessionStore
from .status import StreamStatus

__all__ = [
    "ChatPrompt",
    "ChatStream",
    "ChatStreamError",
    "ChatTemplate",
    "CheckResult",
    "MemorySessionStore",
    "MemoryStorage",
    "ModelNotFound",
    "OpenAIAPI",
    "RedisSessionStore",
    "SamplingParams",
    "SessionStore",
    "StreamStatus",
    "create_app",
    "default_model_path",
]
__version__ = "0.1.0"
