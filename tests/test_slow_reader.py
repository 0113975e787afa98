"""A client that stops reading never stalls the engine or the other streams."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import GREEDY, Server, post_chat, serve, wait_until

pytestmark = pytest.mark.timeout(300)


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=2048, max_new_tokens=150,
                             num_of_concurrent_executions=1, max_queue_size=4)
    async for running in serve(chat_stream):
        yield running


async def test_a_client_that_never_reads_does_not_hold_up_the_next_request(server: Server) -> None:
    engine = server.chat_stream.engine
    admission = server.chat_stream.runtime.admission
    # A tiny receive window, and this client never reads a byte of its reply.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps({"user_input": "Write a very long story about a dragon.",
                       "max_new_tokens": 150, **GREEDY}).encode()
    writer.write(b"POST /chat_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    try:
        await wait_until(lambda: admission.running == 1, timeout=60)
        started = engine.stats.jobs_started
        # With one generation at a time, this request can only run once the silent client's
        # job has left the engine: it must not wait for that client to read.
        async with server.client() as client:
            status, text = await asyncio.wait_for(
                post_chat(client, user_input="Hello", max_new_tokens=8, **GREEDY), 240)
        assert status == 200 and text
        assert engine.stats.jobs_started == started + 1
        assert not reader.at_eof() and not writer.is_closing(), "the silent client is still there"
    finally:
        writer.close()
    await wait_until(lambda: admission.running == 0 and admission.queued == 0, timeout=60)
