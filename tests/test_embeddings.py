"""/v1/embeddings (issue 27): the official `openai` client on the real model (vectors of the
model's width, identical inputs identical vectors, different inputs different ones, base64
and float alike), hostile inputs refused with 400s, streams running beside embeddings, and
the embeddings batch plan with fakes."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from chatstream_lite import ChatStream
from chatstream_lite.engine.embeddings import EmbedJob, normalized, plan_batch

from .conftest import Server, build_full_app, sample, scrape, serve

pytestmark = pytest.mark.timeout(300)

N_CTX = 1024
N_BATCH = 256                  # also the longest input the server embeds
SMOLLM2_WIDTH = 576            # SmolLM2-135M's n_embd


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=N_CTX, n_batch=N_BATCH, max_new_tokens=32,
                             num_of_concurrent_executions=2)
    async for running in serve(chat_stream, build_full_app):
        yield running



def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))   # both L2-normalized


async def test_vectors_have_the_models_width_and_follow_their_input(client: AsyncOpenAI) -> None:
    texts = ["The cat sat on the mat.", "The cat sat on the mat.",
             "Quarterly revenue grew by four percent."]
    result = await client.embeddings.create(model="any", input=texts, encoding_format="float")
    assert result.object == "list" and [d.index for d in result.data] == [0, 1, 2]
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == SMOLLM2_WIDTH for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    assert vectors[0] == vectors[1]                       # identical inputs, identical vectors
    assert vectors[0] != vectors[2] and _cosine(vectors[0], vectors[2]) < 0.999
    assert result.usage.prompt_tokens == result.usage.total_tokens > 10
    # Alone or batched with others, the same text gives the same vector.
    alone = await client.embeddings.create(model="any", input=texts[2], encoding_format="float")
    assert max(abs(x - y) for x, y in zip(alone.data[0].embedding, vectors[2],
                                         strict=True)) < 1e-4


async def test_base64_is_the_same_vector_as_float(client: AsyncOpenAI, server: Server) -> None:
    floats = await client.embeddings.create(model="any", input="Hello", encoding_format="float")
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/embeddings", json={
                "model": "x", "input": "Hello", "encoding_format": "base64"}) as response:
            assert response.status == 200
            packed = base64.b64decode((await response.json())["data"][0]["embedding"])
    decoded = list(struct.unpack(f"<{len(packed) // 4}f", packed))
    assert decoded == pytest.approx(floats.data[0].embedding, abs=1e-6)
    # The client's own default (base64 where numpy is installed) decodes to the same.
    default = await client.embeddings.create(model="any", input="Hello")
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)


async def test_token_id_inputs_are_embedded(client: AsyncOpenAI) -> None:
    one = await client.embeddings.create(model="any", input=[1, 2, 3, 4],
                                         encoding_format="float")
    many = await client.embeddings.create(model="any", input=[[1, 2, 3, 4], [5, 6]],
                                          encoding_format="float")
    assert len(one.data) == 1 and len(many.data) == 2
    assert one.data[0].embedding == pytest.approx(many.data[0].embedding, abs=1e-4)
    assert one.usage.prompt_tokens == 4 and many.usage.prompt_tokens == 6


async def test_dimensions_at_the_models_width_asks_for_nothing(client: AsyncOpenAI) -> None:
    result = await client.embeddings.create(model="any", input="Hi", dimensions=SMOLLM2_WIDTH,
                                            encoding_format="float")
    assert len(result.data[0].embedding) == SMOLLM2_WIDTH
    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model="any", input="Hi", dimensions=64)
    assert caught.value.body["param"] == "dimensions"  # type: ignore[index]


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": ["a", ""]}, "input"),
    ({"input": []}, "input"),
    ({"input": [[]]}, "input[0]"),
    ({"input": ["x"] * 2049}, "input"),
    ({"input": [2**40]}, "input"),
    ({"input": [[1, 2], [-1]]}, "input[1]"),
    ({"input": [49152]}, "input"),
    ({"input": "word " * 400}, "input"),
    ({"input": list(range(1, N_BATCH + 2))}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "truncate": True}, "truncate"),
    ({"input": "a" * 200_001}, "input"),
])
async def test_hostile_inputs_are_400s_naming_the_param(
        server: Server, client: AsyncOpenAI, body: dict[str, Any], param: str) -> None:
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/embeddings", json={"model": "x", **body}) as response:
            assert response.status == 400, await response.text()
            error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param), error
    assert (await client.embeddings.create(model="any", input="still here")).data


async def test_over_the_input_limit_is_context_length_exceeded(server: Server) -> None:
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/embeddings", json={
                "input": "word " * 400}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "context_length_exceeded"


async def test_a_stream_beside_embeddings_runs_to_its_end(server: Server,
                                                          client: AsyncOpenAI) -> None:
    before = await scrape(server)

    async def stream() -> str:
        parts = [chunk.choices[0].delta.content or "" async for chunk in
                 await client.chat.completions.create(
                     model="any", max_tokens=24, stream=True, temperature=0,
                     messages=[{"role": "user", "content": "Count from 1 to 20."}])
                 if chunk.choices]
        return "".join(parts)

    async def embed() -> int:
        done = 0
        for _ in range(4):
            result = await client.embeddings.create(model="any", input=["a b c"] * 16,
                                                    encoding_format="float")
            done += len(result.data)
        return done

    text, embedded = await asyncio.gather(stream(), embed())
    assert text.strip() and embedded == 64
    after = await scrape(server)
    grew = sample(after, "chatstream_requests_total", endpoint="embeddings", status="success") \
        - sample(before, "chatstream_requests_total", endpoint="embeddings", status="success")
    assert grew == 4


# -- without the model ---------------------------------------------------------------------------
def _job(*sizes: int) -> EmbedJob:
    return EmbedJob([[1] * size for size in sizes], on_done=lambda outcome: None)


def test_a_batch_takes_whole_inputs_oldest_job_first_within_its_tokens() -> None:
    first, second = _job(100, 100, 100), _job(50)
    pending = deque([first, second])
    rows = plan_batch(pending, capacity=256, max_seqs=8)
    assert [(job is first, index) for job, index in rows] == [(True, 0), (True, 1)]
    rows = plan_batch(pending, capacity=256, max_seqs=8)
    assert [(job is first, index) for job, index in rows] == [(True, 2), (False, 0)]
    assert plan_batch(pending, capacity=256, max_seqs=8) == []


def test_an_input_longer_than_a_smaller_budget_is_read_alone_not_stuck() -> None:
    # Beside running streams a batch gets a smaller budget than an input may hold: the
    # input is still read (whole, alone), never left waiting forever.
    long, short = _job(300), _job(10)
    pending = deque([long, short])
    assert [(job is long, index) for job, index in plan_batch(pending, 128, 8)] == [(True, 0)]
    assert [(job is short, index) for job, index in plan_batch(pending, 128, 8)] == [(True, 0)]


def test_a_batch_holds_at_most_max_seqs_inputs_and_skips_cancelled_jobs() -> None:
    gone, kept = _job(1, 1, 1), _job(*[1] * 10)
    gone.cancel()
    rows = plan_batch(deque([gone, kept]), capacity=256, max_seqs=4)
    assert [index for job, index in rows] == [0, 1, 2, 3] and all(job is kept for job, _ in rows)


def test_normalized_vectors_have_unit_length() -> None:
    assert normalized([3.0, 4.0]) == [0.6, 0.8]
    assert normalized([0.0, 0.0]) == [0.0, 0.0]


async def test_the_mock_engine_answers_embeddings_through_the_same_route() -> None:
    chat_stream = ChatStream(mock=True)
    async for running in serve(chat_stream, build_full_app):
        async with AsyncOpenAI(base_url=running.url + "/v1", api_key="u",
                               max_retries=0) as mock_client:
            result = await mock_client.embeddings.create(model="any", input=["a", "a", "b"],
                                                         encoding_format="float")
    vectors = [d.embedding for d in result.data]
    assert vectors[0] == vectors[1] != vectors[2] and len(vectors[0]) == 64


# -- fuzz ----------------------------------------------------------------------------------------
def test_arbitrary_json_at_embeddings_never_gets_a_5xx(model_path: str) -> None:
    import json
    from collections import Counter

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from .test_fuzz import (
        _kinds,
        _post,
        _threaded,
        _weighted,
        huge_integers,
        json_values,
        raw_values,
        splice,
        texts,
    )

    token_ids = st.integers(-5, 50_000) | huge_integers
    inputs = texts | st.lists(texts, max_size=4) | st.lists(token_ids, max_size=4) | \
        st.lists(st.lists(token_ids, max_size=3), max_size=3) | json_values
    plausible = st.fixed_dictionaries({"input": inputs}, optional={
        "encoding_format": st.sampled_from(["float", "base64", "int8"]) | json_values,
        "dimensions": st.integers(-1, 1000) | raw_values, "model": texts})
    valid = st.fixed_dictionaries({"input": st.lists(st.text(min_size=1, max_size=12),
                                                     min_size=1, max_size=3)},
                                  optional={"encoding_format": st.sampled_from(["float",
                                                                                "base64"])})
    bodies = _weighted(plausible, st.fixed_dictionaries({}, optional={
        name: json_values for name in ("input", "encoding_format", "dimensions", "user")}),
        json_values, valid=valid)
    seen: Counter[str] = Counter()
    running = _threaded(ChatStream(model_path, n_ctx=512, max_new_tokens=2))
    server = next(running)
    try:
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=True)
        @given(body=bodies)
        def property_holds(body: Any) -> None:
            status, headers, payload = _post(server, splice(body), None, "/v1/embeddings")
            assert status in (200, 400), (status, body, payload)
            answer = json.loads(payload)
            if status == 200:
                seen["accepted"] += 1
                assert answer["object"] == "list" and answer["data"], answer
                for item in answer["data"]:
                    vector = item["embedding"]
                    assert (len(base64.b64decode(vector)) == 4 * SMOLLM2_WIDTH
                            if isinstance(vector, str) else len(vector) == SMOLLM2_WIDTH)
                return
            seen["rejected"] += 1
            seen.update(_kinds(json.dumps(body, ensure_ascii=False)))
            assert set(answer["error"]) == {"message", "type", "param", "code"}, answer

        property_holds()
    finally:
        running.close()
    assert seen["rejected"] > 50 and seen["accepted"] >= 3, seen
