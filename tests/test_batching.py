"""Continuous batching and KV prefix reuse give the same replies: real model, real HTTP.

Two servers on the same model: one with a single slot, one with four. Greedy replies are
compared whole, not just their first tokens: every sequence has a KV stream of its own and
each prompt chunk is decoded on its own, which keeps a job's logits bit-identical to running
it alone on every CPU measured (benchmarks/RESULTS.md, "Determinism across CPUs").

Reusing KV cells (a session's next turn, a prefix copied from another slot) equals a cold
start in the deterministic mode (`deterministic=True`: only cells decoded inside prompt
chunks are reused, flash attention off), on any build: a third server runs in it. Outside
it, reuse is checked for what it saves, not for equality (with llamafile's kernels, the stock
build, a reused reply parts from a cold start after some tens of tokens).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from chatstream_lite import ChatStream

from .conftest import (
    GREEDY,
    RawStream,
    Server,
    generate_alone,
    post_chat,
    serve,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

N_CTX = 2048
N_BATCH = 64        # small prompt chunks, so a long prompt takes many of them
PARALLEL = 4
TOKENS = 48
QUESTIONS = [
    "Write a short poem about the sea.",
    "Explain what a CPU does.",
    "List three fruits and their colours.",
    "Tell me a story about a brave mouse.",
]
# Asked nowhere else in this module: the servers hold no earlier turn that shares more than
# the template's system prompt with them, so no reply is built on a reused prefix (whose
# equality with a cold start is a separate guarantee, checked in the deterministic mode below).
FRESH_QUESTIONS = [
    "Describe a thunderstorm in three sentences.",
    "Why do cats purr?",
    "Give me two tips for learning to swim.",
    "What is the capital of France, and why is it famous?",
]
PREAMBLE = "Read this notice first. " + " ".join(f"Rule {i}: be kind to guest {i}." for i in range(12))
STAYERS = ["Name three planets.", "How do bees make honey?", "Write a haiku about snow."]


def _chat_stream(model_path: str, parallel: int, deterministic: bool = False) -> ChatStream:
    return ChatStream(model_path, n_ctx=N_CTX, n_batch=N_BATCH, max_new_tokens=TOKENS,
                      num_of_concurrent_executions=parallel, max_queue_size=4,
                      deterministic=deterministic)


@pytest_asyncio.fixture(scope="module")
async def single(model_path: str) -> AsyncIterator[Server]:
    async for running in serve(_chat_stream(model_path, 1)):
        yield running


@pytest_asyncio.fixture(scope="module")
async def parallel(model_path: str) -> AsyncIterator[Server]:
    async for running in serve(_chat_stream(model_path, PARALLEL)):
        yield running


@pytest_asyncio.fixture(scope="module")
async def exact(model_path: str) -> AsyncIterator[Server]:
    """Four slots in the deterministic mode."""
    async for running in serve(_chat_stream(model_path, PARALLEL, deterministic=True)):
        yield running


async def _ask(server: Server, question: str) -> str:
    """One greedy turn of a new session (its own cookie jar)."""
    async with server.client() as client:
        status, text = await post_chat(client, user_input=question, max_new_tokens=TOKENS, **GREEDY)
    assert status == 200 and text
    return text


async def test_a_reply_is_identical_with_one_or_four_slots(single: Server, parallel: Server) -> None:
    for question in QUESTIONS:
        assert await _ask(parallel, question) == await _ask(single, question)


async def test_concurrent_replies_equal_the_same_requests_run_alone(single: Server, parallel: Server) -> None:
    alone = [await _ask(single, question) for question in FRESH_QUESTIONS]
    stats = parallel.chat_stream.engine.stats
    tokens, steps = stats.completion_tokens, stats.generation_steps
    together = await asyncio.gather(*(_ask(parallel, question) for question in FRESH_QUESTIONS))
    assert together == alone
    per_step = (stats.completion_tokens - tokens) / (stats.generation_steps - steps)
    assert per_step > 2, f"the replies should have been decoded together ({per_step:.2f} tokens/step)"


async def test_a_client_leaving_mid_batch_leaves_the_other_replies_unchanged(single: Server, parallel: Server) -> None:
    stayers = STAYERS
    alone = [await _ask(single, question) for question in stayers]
    recorder = parallel.recorder
    before = len(recorder.calls)

    async def leave() -> bytes:
        stream = await RawStream.post(parallel, {"user_input": QUESTIONS[3], "max_new_tokens": TOKENS, **GREEDY})
        await stream.read_headers()
        first = await stream.read_chunk()
        stream.close()
        return first

    *together, first = await asyncio.gather(*(_ask(parallel, q) for q in stayers), leave())
    assert together == alone
    assert first
    await recorder.wait_for(before + 4)
    assert sorted(recorder.statuses[before:]) == ["client_disconnected_while_streaming"] + ["success"] * 3


async def test_next_turn_reuses_the_previous_turn(parallel: Server) -> None:
    stats = parallel.chat_stream.engine.stats
    async with parallel.client() as client:
        await post_chat(client, user_input="My name is Aiko and I like green tea.", max_new_tokens=TOKENS, **GREEDY)
        reused, prompt = stats.prompt_tokens_reused, stats.prompt_tokens
        before = len(parallel.recorder.calls)
        status, warm = await post_chat(client, user_input="What is my name?", max_new_tokens=TOKENS, **GREEDY)
        assert status == 200
        await parallel.recorder.wait_for(before + 1)
    assert parallel.recorder.calls[-1][1][-1]["content"] == warm
    # The first turn's prompt and reply are both reused: more than half of the new prompt.
    assert stats.prompt_tokens_reused - reused > 0.5 * (stats.prompt_tokens - prompt)


async def test_next_turn_in_the_deterministic_mode_equals_a_cold_start(
        exact: Server, model_path: str) -> None:
    stats = exact.chat_stream.engine.stats
    async with exact.client() as client:
        before_prompt = stats.prompt_tokens
        await post_chat(client, user_input="My name is Aiko and I like green tea.", max_new_tokens=TOKENS, **GREEDY)
        first_prompt = stats.prompt_tokens - before_prompt
        reused = stats.prompt_tokens_reused
        before = len(exact.recorder.calls)
        status, warm = await post_chat(client, user_input="What is my name?", max_new_tokens=TOKENS, **GREEDY)
        assert status == 200
        await exact.recorder.wait_for(before + 1)
    history = exact.recorder.calls[-1][1]
    # The first turn's prompt cells are reused; its reply (decoded a token at a time) is read
    # again as part of this prompt, as a cold start reads it.
    assert stats.prompt_tokens_reused - reused == first_prompt
    cold, cold_stats = await generate_alone(model_path, history[:-1], n_ctx=N_CTX,
                                            n_batch=N_BATCH, max_new_tokens=TOKENS,
                                            deterministic=True)
    assert cold_stats.prompt_tokens_reused == 0
    assert warm == history[-1]["content"] == cold


async def test_a_new_session_borrows_a_shared_prefix(parallel: Server) -> None:
    """A prefix another slot holds (here a long shared preamble) is copied, not evaluated."""
    stats = parallel.chat_stream.engine.stats
    async with parallel.client() as client:
        await post_chat(client, user_input=PREAMBLE + " Who wrote the rules?", max_new_tokens=8, **GREEDY)
    reused, prompt = stats.prompt_tokens_reused, stats.prompt_tokens
    async with parallel.client() as client:  # a new session: no slot of its own
        status, _ = await post_chat(client, user_input=PREAMBLE + " Name one rule.",
                                    max_new_tokens=TOKENS, **GREEDY)
        assert status == 200
    assert stats.prompt_tokens_reused - reused > 0.7 * (stats.prompt_tokens - prompt)


async def test_a_borrowed_prefix_in_the_deterministic_mode_equals_a_cold_start(
        exact: Server, model_path: str) -> None:
    stats = exact.chat_stream.engine.stats
    async with exact.client() as client:
        await post_chat(client, user_input=PREAMBLE + " Who wrote the rules?", max_new_tokens=8, **GREEDY)
    reused, prompt = stats.prompt_tokens_reused, stats.prompt_tokens
    before = len(exact.recorder.calls)
    async with exact.client() as client:  # a new session: no slot of its own
        status, warm = await post_chat(client, user_input=PREAMBLE + " Name one rule.",
                                       max_new_tokens=TOKENS, **GREEDY)
        assert status == 200
    await exact.recorder.wait_for(before + 1)
    assert stats.prompt_tokens_reused - reused > 0.7 * (stats.prompt_tokens - prompt)
    cold, cold_stats = await generate_alone(model_path, exact.recorder.calls[-1][1][:-1],
                                            n_ctx=N_CTX, n_batch=N_BATCH, max_new_tokens=TOKENS,
                                            deterministic=True)
    assert cold_stats.prompt_tokens_reused == 0
    assert warm == cold


async def test_regenerate_reuses_everything_up_to_the_last_user_message(parallel: Server) -> None:
    stats = parallel.chat_stream.engine.stats
    async with parallel.client() as client:
        await post_chat(client, user_input="Name a colour.", max_new_tokens=8, **GREEDY)
        reused, prompt = stats.prompt_tokens_reused, stats.prompt_tokens
        status, _ = await post_chat(client, regenerate=True, user_input="", max_new_tokens=8, temperature=1.0, seed=3)
        assert status == 200
    # All but the last prompt token, whose logits are needed to sample the new reply.
    assert stats.prompt_tokens_reused - reused == stats.prompt_tokens - prompt - 1


async def test_the_least_recently_used_session_loses_its_cache_first(parallel: Server) -> None:
    stats = parallel.chat_stream.engine.stats
    clients = [parallel.client() for _ in range(PARALLEL + 1)]
    try:
        first_turn = []
        for i, client in enumerate(clients):  # one more session than there are slots
            before = stats.prompt_tokens
            await post_chat(client, user_input=f"I am user {i} and I like number {i}.", max_new_tokens=8, **GREEDY)
            first_turn.append(stats.prompt_tokens - before)

        async def reused_by_next_turn(client_index: int) -> int:
            before = stats.prompt_tokens_reused
            await post_chat(clients[client_index], user_input="And then?", max_new_tokens=4, **GREEDY)
            return stats.prompt_tokens_reused - before

        # The newest session still has its cells; the oldest one's slot went to the newest.
        assert await reused_by_next_turn(PARALLEL) >= first_turn[PARALLEL]
        assert await reused_by_next_turn(0) < first_turn[0]
    finally:
        for client in clients:
            await client.close()


async def test_a_client_leaving_during_a_long_prompt_stops_its_evaluation(parallel: Server) -> None:
    stats = parallel.chat_stream.engine.stats
    recorder = parallel.recorder
    before = len(recorder.calls)
    evaluated, prompt, completion = stats.prompt_tokens_evaluated, stats.prompt_tokens, stats.completion_tokens
    long_input = " ".join(f"word{i}" for i in range(400))  # about 1,500 tokens: 23 chunks
    stream = await RawStream.post(parallel, {"user_input": long_input, "max_new_tokens": 8, **GREEDY})
    await stream.read_headers()   # sent when the job starts, before the prompt is read
    stream.close()
    await recorder.wait_for(before + 1)
    assert recorder.calls[-1][0] == "client_disconnected_before_streaming"
    total = stats.prompt_tokens - prompt
    read = stats.prompt_tokens_evaluated - evaluated
    assert total > 10 * N_BATCH
    assert read < total / 2, f"read {read} of {total} prompt tokens after the client left"
    assert stats.completion_tokens == completion
    await wait_until(lambda: parallel.chat_stream.runtime.admission.running == 0)
