"""`n` choices and `logprobs` (issue 12), through the official `openai` client on the real model.

`n` choices share the prompt: it is read once and its KV cells are copied to the other
choices' sequences (the engine's counters show it); greedy choices are therefore identical.
Log-probabilities are the model's own (log-softmax of the raw logits), so with greedy
sampling and no penalties the chosen token is always the most likely one.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from chatstream_lite import ChatStream

from .conftest import Server, build_full_app, serve

pytestmark = pytest.mark.timeout(120)

CHOICES = 3                # the server's parallel sequences
REPLY = 16
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=1024, max_new_tokens=40,
                             num_of_concurrent_executions=CHOICES)
    async for running in serve(chat_stream, build_full_app):
        yield running



def fresh_question() -> list[dict[str, str]]:
    """A prompt no slot holds yet, so that every token of it is either read or copied."""
    return [{"role": "user", "content": f"Tell me about ships. (request {uuid.uuid4().hex})"}]


def evaluated(server: Server) -> int:
    return server.chat_stream.runtime.engine.stats.prompt_tokens_evaluated


async def test_n_choices_read_the_prompt_once_and_greedy_ones_agree(
        server: Server, client: AsyncOpenAI) -> None:
    before = evaluated(server)
    reply = await client.chat.completions.create(
        model="x", messages=fresh_question(), max_tokens=REPLY, n=CHOICES, **GREEDY)
    assert [c.index for c in reply.choices] == list(range(CHOICES))
    texts = [c.message.content for c in reply.choices]
    assert texts[0] and texts == [texts[0]] * CHOICES, texts   # copied cells, same logits
    assert reply.usage is not None and reply.usage.completion_tokens == CHOICES * REPLY
    assert all(c.finish_reason == "length" for c in reply.choices)
    # The prompt was read once, not once per choice.
    assert evaluated(server) - before == reply.usage.prompt_tokens


async def test_sampled_choices_differ_and_stream_by_index(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="x", messages=fresh_question(), max_tokens=REPLY, n=CHOICES, temperature=1.0,
        seed=7, stream=True)
    texts = [""] * CHOICES
    reasons: list[str | None] = [None] * CHOICES
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert all(texts) and all(reasons), (texts, reasons)
    assert len(set(texts)) > 1, texts      # each choice has its own seed


async def test_chat_logprobs_are_finite_ordered_and_match_the_reply(
        client: AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="x", messages=fresh_question(), max_tokens=REPLY, logprobs=True,
        top_logprobs=3, **GREEDY)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == REPLY                         # cut by length: no stop string ate any
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert sum(math.exp(lp) for lp in alternatives) <= 1 + 1e-6
        # Greedy without penalties picks the model's most likely token.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(alternatives[0])
        assert bytes(entry.bytes or []) .decode("utf-8", "replace") == entry.token


async def test_streamed_logprobs_come_with_their_pieces(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="x", messages=fresh_question(), max_tokens=REPLY, logprobs=True, stream=True,
        **GREEDY)
    text, tokens = "", []
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                tokens += chunk.choices[0].logprobs.content or []
    assert len(tokens) == REPLY and "".join(t.token for t in tokens) == text
    assert all(math.isfinite(t.logprob) and t.top_logprobs == [] for t in tokens)


async def test_text_completion_logprobs_in_the_legacy_shape(client: AsyncOpenAI) -> None:
    reply = await client.completions.create(
        model="x", prompt="The sea is", max_tokens=8, logprobs=2, temperature=0)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i])
                                    for i in range(len(logprobs.tokens))]
    assert logprobs.top_logprobs is not None
    assert all(len(top) == 2 for top in logprobs.top_logprobs)


@pytest.mark.parametrize("body", [
    {"n": CHOICES + 1}, {"n": 0}, {"n": True}, {"logprobs": "yes"},
    {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21},
    {"logprobs": True, "top_logprobs": -1},
])
async def test_bad_n_and_logprobs_are_400s(client: AsyncOpenAI, body: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model="x", messages=fresh_question(), max_tokens=4, extra_body=body)
    assert refused.value.status_code == 400


async def test_the_mock_engine_refuses_what_it_cannot_do() -> None:
    # --mock has no logits and one sequence: a 400 naming the parameter, not a fake answer.
    async for mock in serve(ChatStream(mock=True, mock_delay=0), build_full_app):
        async with AsyncOpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0) as c:
            for body, param in [({"n": 2}, "n"), ({"logprobs": True}, "logprobs")]:
                with pytest.raises(openai.BadRequestError) as refused:
                    await c.chat.completions.create(
                        model="x", messages=fresh_question(), max_tokens=4, extra_body=body)
                assert refused.value.body is not None
                assert refused.value.body.get("param") == param   # type: ignore[union-attr]
