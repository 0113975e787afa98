"""/chat_stream end to end: real model, real HTTP clients, real disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from chatstream_lite import ChatStream, StreamStatus

from .conftest import GREEDY, Gate, RawStream, Server, post_chat, serve, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=2048, max_new_tokens=200, max_queue_size=4)
    async for running in serve(chat_stream):
        yield running


@pytest.fixture(autouse=True)
def no_hook(server: Server) -> None:
    server.chat_stream.engine.faults.before_token = None


async def test_reply_streams_and_success_callback_sees_the_stored_history(server: Server) -> None:
    before = len(server.recorder.calls)
    async with server.client() as client:
        async with client.post("/chat_stream", json={"user_input": "Say hello.", "max_new_tokens": 24, **GREEDY}) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert response.headers.get("Transfer-Encoding") == "chunked"
            chunks = [chunk async for chunk in response.content.iter_any()]
            body = b"".join(chunks).decode("utf-8")
    await server.recorder.wait_for(before + 1)
    status, history = server.recorder.calls[-1]
    assert status == "success" and status == StreamStatus.SUCCESS
    assert body.strip()
    assert history[-2:] == [{"role": "user", "content": "Say hello."},
                            {"role": "assistant", "content": body}]


async def test_multi_turn_history_and_prompt_inside_callback(server: Server) -> None:
    async with server.client() as client:
        for text in ("My name is Aiko.", "What is my name?"):
            status, _ = await post_chat(client, user_input=text, max_new_tokens=16, **GREEDY)
            assert status == 200
        before = len(server.recorder.calls)
        status, last = await post_chat(client, user_input="Thanks!", max_new_tokens=8, **GREEDY)
        await server.recorder.wait_for(before + 1)
    history = server.recorder.calls[-1][1]
    users = [m["content"] for m in history if m["role"] == "user"]
    assert users == ["My name is Aiko.", "What is my name?", "Thanks!"]
    assert [m["role"] for m in history if m["role"] != "system"] == ["user", "assistant"] * 3
    # What the seed's callback prints: the whole conversation in the model's own template
    # (SmolLM2's ChatML), ending with the reply just sent.
    prompt = server.recorder.prompts[-1]
    assert "<|im_start|>user\nMy name is Aiko.<|im_end|>" in prompt
    assert "<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n" + last in prompt


async def test_regenerate_replaces_the_last_reply(server: Server) -> None:
    async with server.client() as client:
        status, first = await post_chat(client, user_input="Tell me a colour.", max_new_tokens=12, temperature=1.5, seed=1)
        assert status == 200
        before = len(server.recorder.calls)
        status, second = await post_chat(client, regenerate=True, user_input="ignored", max_new_tokens=12, temperature=1.5, seed=2)
        assert status == 200
        await server.recorder.wait_for(before + 1)
    history = server.recorder.calls[-1][1]
    turns = [m for m in history if m["role"] != "system"]
    assert turns == [{"role": "user", "content": "Tell me a colour."},
                     {"role": "assistant", "content": second}]


async def test_regenerate_on_an_empty_history_is_400(server: Server) -> None:
    async with server.client() as client:
        async with client.post("/chat_stream", json={"user_input": "", "regenerate": True}) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "bad_request"


async def test_clear_context_forgets_the_history(server: Server) -> None:
    async with server.client() as client:
        await post_chat(client, user_input="Remember: blue.", max_new_tokens=8, **GREEDY)
        async with client.post("/clear_context", json={}) as response:
            assert response.status == 200
        before = len(server.recorder.calls)
        await post_chat(client, user_input="Hello", max_new_tokens=8, **GREEDY)
        await server.recorder.wait_for(before + 1)
    turns = [m for m in server.recorder.calls[-1][1] if m["role"] != "system"]
    assert [m["content"] for m in turns if m["role"] == "user"] == ["Hello"]


async def test_intercepted_body_is_honoured(server: Server) -> None:
    async with server.client() as client:
        before = len(server.recorder.calls)
        status, body = await post_chat(client, "/intercept", user_input="Intercepted hello", max_new_tokens=8, **GREEDY)
        assert status == 200 and body
        await server.recorder.wait_for(before + 1)
    turns = [m for m in server.recorder.calls[-1][1] if m["role"] != "system"]
    assert turns[0] == {"role": "user", "content": "Intercepted hello"}


async def test_two_cookie_jars_never_see_each_others_history(server: Server) -> None:
    async with server.client() as alice, server.client() as bob:
        await post_chat(alice, user_input="Alice's secret is 42.", max_new_tokens=8, **GREEDY)
        before = len(server.recorder.calls)
        await post_chat(bob, user_input="Bob here.", max_new_tokens=8, **GREEDY)
        await server.recorder.wait_for(before + 1)
        bob_history = server.recorder.calls[-1][1]
        alice_cookie = alice.cookie_jar.filter_cookies(URL(server.url))["CHATSTREAM_SESSION"].value
        bob_cookie = bob.cookie_jar.filter_cookies(URL(server.url))["CHATSTREAM_SESSION"].value
    assert alice_cookie != bob_cookie and len(alice_cookie) >= 43
    assert all("Alice" not in m["content"] for m in bob_history)


async def test_session_cookie_is_httponly_and_samesite_lax(server: Server) -> None:
    async with server.client() as client:
        async with client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 4}) as response:
            await response.read()
            cookie_header = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie_header and "SameSite=Lax" in cookie_header


async def test_second_concurrent_request_on_one_session_is_409(server: Server) -> None:
    gate = Gate()
    async with server.client() as client:
        await post_chat(client, user_input="Hi", max_new_tokens=4)  # establish the session
        server.chat_stream.engine.faults.before_token = gate  # hold the next generation at its first token
        before = len(server.recorder.calls)
        first = asyncio.create_task(post_chat(client, user_input="Count to five.", max_new_tokens=16, **GREEDY))
        await gate.wait_reached()
        status, body = await post_chat(client, user_input="Me too", max_new_tokens=4)
        gate.open()
        first_status, first_body = await first
        await server.recorder.wait_for(before + 1)
    assert status == 409 and '"session_busy"' in body
    assert first_status == 200
    history = server.recorder.calls[-1][1]
    assert [m["content"] for m in history if m["role"] == "user"] == ["Hi", "Count to five."]


async def test_client_closing_after_first_chunk_is_disconnected_while_streaming(server: Server) -> None:
    before = len(server.recorder.calls)
    started = server.chat_stream.engine.stats.completion_tokens
    stream = await RawStream.post(server, {"user_input": "Write a long story about a dragon.", "max_new_tokens": 200, **GREEDY})
    await stream.read_headers()
    assert stream.status == 200
    first = await stream.read_chunk()
    assert first
    stream.close()
    await server.recorder.wait_for(before + 1)
    status, history = server.recorder.calls[-1]
    assert status == "client_disconnected_while_streaming"
    partial = history[-1]
    assert partial["role"] == "assistant" and partial["content"].startswith(first.decode())
    generated = server.chat_stream.engine.stats.completion_tokens - started
    assert generated < 200, "generation must stop when the client leaves"


async def test_client_closing_while_queued_never_reaches_the_model(server: Server) -> None:
    engine = server.chat_stream.engine
    admission = server.chat_stream.runtime.admission
    gate = Gate()
    engine.faults.before_token = gate
    before = len(server.recorder.calls)
    async with server.client() as client:
        running = asyncio.create_task(post_chat(client, user_input="Hello", max_new_tokens=8, **GREEDY))
        await gate.wait_reached()
        started_before = engine.stats.jobs_started
        queued = await RawStream.post(server, {"user_input": "I will leave", "max_new_tokens": 8})
        await wait_until(lambda: admission.queued == 1)
        queued.close()
        await server.recorder.wait_for(before + 1)
        assert server.recorder.calls[-1][0] == "client_disconnected_before_streaming"
        assert admission.queued == 0
        gate.open()
        assert (await running)[0] == 200
        await server.recorder.wait_for(before + 2)
    assert engine.stats.jobs_started == started_before, "the queued job must never reach the model"
    assert server.recorder.calls[-1][0] == "success"


async def test_model_fault_is_unknown_error_and_the_next_request_succeeds(server: Server) -> None:
    def explode(index: int) -> None:
        if index == 3:
            raise RuntimeError("injected model fault")

    async with server.client() as client:
        await post_chat(client, user_input="First turn", max_new_tokens=4, **GREEDY)
        server.chat_stream.engine.faults.before_token = explode
        before = len(server.recorder.calls)
        async with client.post("/chat_stream", json={"user_input": "This one breaks", "max_new_tokens": 32, **GREEDY}) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # the connection is dropped mid-body
        await server.recorder.wait_for(before + 1)
        status, history = server.recorder.calls[-1]
        assert status == "unknown_error_occurred"
        assert [m["content"] for m in history if m["role"] == "user"] == ["First turn"]
        server.chat_stream.engine.faults.before_token = None
        status_code, body = await post_chat(client, user_input="And now?", max_new_tokens=8, **GREEDY)
        assert status_code == 200 and body
        await server.recorder.wait_for(before + 2)
    assert server.recorder.calls[-1][0] == "success"


async def test_a_fault_before_the_first_piece_cuts_the_body_and_reports_unknown_error(
        server: Server) -> None:
    def explode(index: int) -> None:
        raise RuntimeError("injected model fault")

    server.chat_stream.engine.faults.before_token = explode
    before = len(server.recorder.calls)
    async with server.client() as client:
        async with client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 8}) as response:
            # Headers went out when the prompt was accepted; the body is cut off.
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    await server.recorder.wait_for(before + 1)
    assert server.recorder.calls[-1][0] == "unknown_error_occurred"
