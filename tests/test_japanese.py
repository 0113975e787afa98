"""Multi-byte text streams intact: every chunk of `/chat_stream`'s body decodes on its own
(no character split between two chunks), and the reply matches llama-cpp-python's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import GREEDY, RawStream, Server, llama_cpp_reference, serve

pytestmark = pytest.mark.timeout(120)

N_CTX = 2048


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    # A server of its own, so the request below meets a cold KV cache: prefix reuse after
    # other conversations would evaluate the prompt in other batch shapes, and greedy text
    # may then drift by float rounding (llama-server behaves the same way).
    async for running in serve(ChatStream(model_path, n_ctx=N_CTX, max_new_tokens=64)):
        yield running


async def _chunks(server: Server, body: dict[str, Any]) -> list[bytes]:
    """The chunks of the body exactly as the server framed them (HTTP/1.1 chunked)."""
    stream = await RawStream.post(server, body)
    try:
        await stream.read_headers()
        assert stream.status == 200
        chunks = []
        while chunk := await stream.read_chunk():
            chunks.append(chunk)
        return chunks
    finally:
        stream.close()


def _decode_each(chunks: list[bytes]) -> list[str]:
    """Each chunk on its own, strictly: a character split between two chunks raises here."""
    return [chunk.decode("utf-8") for chunk in chunks]


async def test_japanese_reply_is_intact_in_every_chunk_and_equals_llama_cpp_python(
        server: Server, model_path: str) -> None:
    question = "日本の首都はどこですか？日本語で答えてください。"
    chunks = await _chunks(server, {"user_input": question, "max_new_tokens": 48, **GREEDY})
    pieces = _decode_each(chunks)
    assert len(pieces) > 5, "the reply streams in pieces"
    ours = "".join(pieces)
    assert "\ufffd" not in ours

    expected = await asyncio.get_running_loop().run_in_executor(None, partial(
        llama_cpp_reference, model_path, question, n_ctx=N_CTX,
        n_threads=server.chat_stream.engine.threads, max_tokens=48))
    assert any(ord(c) > 0x3000 for c in expected), "the reference reply should contain Japanese"
    assert ours == expected


async def test_emoji_reply_is_intact_in_every_chunk(server: Server) -> None:
    # SmolLM2 spells each of these emoji in three tokens (b"\xf0\x9f", then one byte, then
    # one byte), so a server that wrote each token's bytes as they come would split them.
    chunks = await _chunks(server, {"user_input": "Write 🎉🎉🎉 and nothing else.",
                                    "max_new_tokens": 24, **GREEDY})
    pieces = _decode_each(chunks)
    assert len(pieces) > 3, "the reply streams in pieces"
    assert sum(ord(c) > 0xFFFF for c in "".join(pieces)) >= 3, "the reply should hold emoji"
