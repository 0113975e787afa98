"""Multi-byte text streams intact and matches llama-cpp-python's own chat completion."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import GREEDY, Server, llama_cpp_reference, serve

pytestmark = pytest.mark.timeout(120)

N_CTX = 2048


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    # A server of its own, so the request below meets a cold KV cache: prefix reuse after
    # other conversations would evaluate the prompt in other batch shapes, and greedy text
    # may then drift by float rounding (llama-server behaves the same way).
    async for running in serve(ChatStream(model_path, n_ctx=N_CTX, max_new_tokens=64)):
        yield running


async def test_japanese_reply_is_intact_and_equals_llama_cpp_python(server: Server, model_path: str) -> None:
    question = "日本の首都はどこですか？日本語で答えてください。"
    async with server.client() as client:
        async with client.post("/chat_stream", json={"user_input": question, "max_new_tokens": 48, **GREEDY}) as response:
            raw = b"".join([chunk async for chunk in response.content.iter_any()])
    ours = raw.decode("utf-8")  # strict: a split character would raise here
    assert "\ufffd" not in ours

    expected = await asyncio.get_running_loop().run_in_executor(None, partial(
        llama_cpp_reference, model_path, question, n_ctx=N_CTX,
        n_threads=server.chat_stream.engine.threads, max_tokens=48))
    assert any(ord(c) > 0x3000 for c in expected), "the reference reply should contain Japanese"
    assert ours == expected
