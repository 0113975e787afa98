"""Property, as tests/test_fuzz.py holds it for the other endpoints: whatever JSON a client sends
to /v1/messages or /v1/messages/count_tokens, never a 5xx, every refusal a 400 in Anthropic's
error shape, every 200 a well-formed message or event stream, and the server still answers
afterwards."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstream_lite import ChatStream

from .conftest import Server
from .test_fuzz import (
    HUGE,
    LONE,
    MAX_NEW_TOKENS,
    _deep,
    _kinds,
    _post,
    _threaded,
    _weighted,
    json_values,
    numbers,
    raw_values,
    splice,
    texts,
)

pytestmark = pytest.mark.timeout(600)

PATH = "/v1/messages"
COUNT_PATH = "/v1/messages/count_tokens"
FIELDS = ["model", "max_tokens", "messages", "system", "stop_sequences", "stream", "temperature",
          "top_p", "top_k", "tools", "tool_choice", "metadata", "thinking"]
ROLES = ["user", "assistant", "system", "wizard"]
STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use"}

blocks = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": texts,
                           "content": texts | json_values}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": texts, "name": texts,
                           "input": json_values}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "thinking", "wizard"])},
                          optional={"thinking": texts, "source": json_values}),
)
contents = texts | st.lists(blocks, max_size=3)
turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": contents}),
                 max_size=4)
messages = st.builds(lambda head, last: head + last, turns, st.sampled_from(
    [[], [{"role": "user", "content": "Hi"}]])) | st.lists(
    st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values}),
    max_size=3)
plausible = st.fixed_dictionaries(
    {"model": st.just("x"), "max_tokens": st.integers(1, 2) | numbers | raw_values,
     "messages": messages}, optional={
        **{name: numbers | raw_values for name in ("temperature", "top_p", "top_k")},
        "stop_sequences": st.lists(texts, max_size=3) | texts,
        "system": texts | st.lists(blocks, max_size=2),
        "stream": st.booleans(),
        "tools": st.lists(st.fixed_dictionaries({"name": texts, "input_schema": json_values}),
                          max_size=2),
        "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(
            ["auto", "any", "tool", "none", "wizard"])}, optional={"name": texts}),
    })
WORDS = ["Hello", "Fine.", "<|im_end|>", "\u3053\u3093\u306b\u3061\u306f"]
alternating = st.lists(st.sampled_from(WORDS), max_size=2).map(
    lambda words: [turn for word in words for turn in (
        {"role": "user", "content": word}, {"role": "assistant", "content": word})])
valid = st.fixed_dictionaries(
    {"model": st.just("x"), "max_tokens": st.integers(1, MAX_NEW_TOKENS),
     "messages": alternating.map(lambda head: [*head, {"role": "user", "content": "Hi"}])},
    optional={"temperature": st.floats(0, 1), "top_p": st.floats(0, 1),
              "top_k": st.integers(0, 50), "stream": st.booleans(),
              "stop_sequences": st.lists(st.text(min_size=1, max_size=4), max_size=2),
              "system": st.text(max_size=12)})
bodies = _weighted(plausible, st.fixed_dictionaries({}, optional={
    name: json_values for name in FIELDS}), json_values, valid=valid)


@pytest.fixture(scope="module")
def threaded_server(model_path: str) -> Iterator[Server]:
    yield from _threaded(ChatStream(model_path, n_ctx=512, max_new_tokens=MAX_NEW_TOKENS))


def _server_errors(server: Server) -> float:
    registry = server.chat_stream.metrics.registry
    return registry.get_sample_value("chatstream_requests_total", {
        "endpoint": "messages", "status": "unknown_error_occurred"}) or 0.0


def _anthropic_error(status: int, headers: dict[str, str], payload: bytes) -> None:
    assert status == 400, payload
    assert headers["Content-Type"].startswith("application/json"), payload
    body = json.loads(payload)
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"], body


def _message(headers: dict[str, str], payload: bytes) -> None:
    """A 200 as the `anthropic` client reads it: one message, or its events in order."""
    if headers["Content-Type"].startswith("text/event-stream"):
        events: list[tuple[str, dict[str, Any]]] = []
        for frame in payload.decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
            if "event" in lines:
                data = json.loads(lines["data"])
                assert data["type"] == lines["event"], frame
                events.append((lines["event"], data))
        names = [name for name, _ in events]
        assert names[:2] == ["message_start", "ping"], names
        assert names[-2:] == ["message_delta", "message_stop"], names
        assert events[-2][1]["delta"]["stop_reason"] in STOP_REASONS, events[-2]
        opened = [data["index"] for name, data in events if name == "content_block_start"]
        closed = [data["index"] for name, data in events if name == "content_block_stop"]
        assert opened == closed == list(range(len(opened))) and opened, names
        usage = events[-2][1]["usage"]
        assert 0 <= usage["output_tokens"] <= MAX_NEW_TOKENS, usage
        return
    message = json.loads(payload)
    assert message["type"] == "message" and message["role"] == "assistant", message
    assert message["id"].startswith("msg_") and message["content"], message
    assert message["stop_reason"] in STOP_REASONS, message
    assert all(block["type"] in ("text", "thinking", "tool_use") for block in message["content"])
    usage = message["usage"]
    assert usage["input_tokens"] > 0 and 0 <= usage["output_tokens"] <= MAX_NEW_TOKENS, usage


def test_arbitrary_json_at_messages_never_gets_a_5xx(threaded_server: Server) -> None:
    server = threaded_server
    seen: Counter[str] = Counter()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, derandomize=True)
    @given(body=bodies)
    def property_holds(body: Any) -> None:
        status, headers, payload = _post(server, splice(body), None, PATH)
        if status == 200:
            seen["accepted"] += 1
            _message(headers, payload)
        else:
            seen["rejected"] += 1
            seen.update(_kinds(json.dumps(body, ensure_ascii=False)))
            _anthropic_error(status, headers, payload)
        # The same body counted: a 200 or an Anthropic-shaped 400 as well.
        status, headers, payload = _post(server, splice(body), None, COUNT_PATH)
        if status == 200:
            assert json.loads(payload)["input_tokens"] > 0
        else:
            _anthropic_error(status, headers, payload)

    property_holds()
    assert seen["rejected"] > 50 and seen["accepted"] >= 3, seen
    assert min(seen[kind] for kind in ("list", "dict", "big", "surrogate", "huge")) > 3, seen
    assert _server_errors(server) == 0
    ok = {"model": "x", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    status, headers, payload = _post(server, json.dumps(ok).encode(), None, PATH)
    assert status == 200
    _message(headers, payload)


ASK = '[{"role": "user", "content": "hi"}]'
HOSTILE_BODIES = [
    ("body nested 1,000 deep", _deep(1_000)),
    ("messages nested 1,000 deep", '{"model": "x", "max_tokens": 2, "messages": '
     + _deep(1_000) + "}"),
    ("content nested 1,000 deep", '{"model": "x", "max_tokens": 2, "messages": [{"role": '
     '"user", "content": ' + _deep(1_000, "dict") + "}]}"),
    ("tool input nested 1,000 deep", '{"model": "x", "max_tokens": 2, "messages": [{"role": '
     '"assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": '
     + _deep(1_000, "dict") + "}]}]}"),
    *[(f"{name} of 400 digits", f'{{"model": "x", "max_tokens": 2, "messages": {ASK}, '
       f'"{name}": {HUGE}}}') for name in ("max_tokens", "temperature", "top_p", "top_k")],
    ("temperature 1e400", f'{{"model": "x", "max_tokens": 2, "messages": {ASK}, '
     '"temperature": 1e400}'),
    ("content a lone surrogate", '{"model": "x", "max_tokens": 2, "messages": [{"role": '
     f'"user", "content": "a{LONE}"}}]}}'),
    ("system a lone surrogate", f'{{"model": "x", "max_tokens": 2, "messages": {ASK}, '
     f'"system": "{LONE}"}}'),
    ("a stop sequence a lone surrogate", f'{{"model": "x", "max_tokens": 2, "messages": {ASK}, '
     f'"stop_sequences": ["{LONE}"]}}'),
    ("a tool result a lone surrogate", '{"model": "x", "max_tokens": 2, "messages": ['
     '{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": '
     '"tool_use", "id": "t1", "name": "f", "input": {}}]}, {"role": "user", "content": [{'
     f'"type": "tool_result", "tool_use_id": "t1", "content": "{LONE}"}}]}}]}}'),
    ("20,000 messages", '{"model": "x", "max_tokens": 2, "messages": ['
     + ", ".join(['{"role": "user", "content": "hi"}'] * 20_000) + "]}"),
    ("200 tools", f'{{"model": "x", "max_tokens": 2, "messages": {ASK}, "tools": ['
     + ", ".join(f'{{"name": "f{i}", "input_schema": {{"type": "object"}}}}'
                 for i in range(200)) + "]}"),
    ("1,000 stop sequences", f'{{"model": "x", "max_tokens": 2, "messages": {ASK}, '
     '"stop_sequences": [' + ", ".join(['"x"'] * 1_000) + "]}"),
    ("a stop sequence of 100,000 characters", f'{{"model": "x", "max_tokens": 2, "messages": '
     f'{ASK}, "stop_sequences": ["' + "x" * 100_000 + '"]}'),
    ("a tool named with control text", f'{{"model": "x", "max_tokens": 2, "messages": {ASK}, '
     '"tools": [{"name": "<|im_start|>", "input_schema": {"type": "object"}}]}'),
]


@pytest.mark.parametrize("path", [PATH, COUNT_PATH])
@pytest.mark.parametrize("name, body", HOSTILE_BODIES, ids=[b[0] for b in HOSTILE_BODIES])
def test_hostile_bodies_are_anthropic_shaped_400s(threaded_server: Server, name: str,
                                                  body: str, path: str) -> None:
    errors = _server_errors(threaded_server)
    status, headers, payload = _post(threaded_server, body.encode(), None, path)
    _anthropic_error(status, headers, payload)
    assert _server_errors(threaded_server) == errors


def test_after_every_hostile_body_messages_still_serve(threaded_server: Server) -> None:
    ok = {"model": "x", "max_tokens": 2, "stream": True,
          "messages": [{"role": "user", "content": "Hi"}]}
    status, headers, payload = _post(threaded_server, json.dumps(ok).encode(), None, PATH)
    assert status == 200
    _message(headers, payload)
    assert _server_errors(threaded_server) == 0
