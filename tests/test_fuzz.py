"""Property: whatever JSON a client sends, never a 5xx, no history changed by a rejected
request, and the server still answers a normal request afterwards."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstream_lite import ChatStream
from chatstream_lite.engine import ChatTemplate

from .conftest import Server, build_full_app, json_prefix, start_server

pytestmark = pytest.mark.timeout(600)

FIELDS = ["user_input", "regenerate", "max_new_tokens", "temperature", "top_p", "top_k",
          "repeat_penalty", "seed"]
NUMERIC = ["max_new_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "seed"]
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
NESTING = 32                        # the server's limit (chat_request.MAX_JSON_DEPTH)
MAX_NEW_TOKENS = 2                  # the fuzzed servers' replies: short, as the model is slow
SCHEMA_NEW_TOKENS = 24              # long enough to reach a grammar's dead ends
# What counts as a stall (session 7's held the engine for minutes). Not less: in the fixed
# draw, the 24-token reply held to an array of one constant with a NUL, a backslash and a
# quote took 45 s on a loaded 2-core machine, and three others took 25-35 s.
SCHEMA_STALL = 150.0

# Lone surrogates are valid JSON (as escapes: json.dumps writes "\\ud800") but not Unicode
# text: nothing may encode them as UTF-8 on the way to the tokenizer.
texts = st.text(max_size=12) | st.builds(
    lambda head, surrogate, tail: head + surrogate + tail,
    st.text(max_size=4), st.sampled_from(SURROGATES), st.text(max_size=4))
huge_integers = st.integers(10**399, 10**400 - 1) | st.integers(-(10**400) + 1, -(10**399))
numbers = st.integers() | st.floats() | huge_integers

# Stand-ins for what json.dumps cannot or will not write: replaced in the raw body by
# `splice` with JSON nested 1,000+ deep (arrays or objects) or a float literal that
# overflows to infinity.
DEEP = re.compile(r'"@@(list|dict|big)(\d*)@@"')
raw_values = st.builds(lambda kind, depth: f"@@{kind}{depth}@@",
                       st.sampled_from(["list", "dict"]), st.integers(1_000, 3_000)
                       ) | st.just("@@big@@")


def splice(body: Any) -> bytes:
    """`body` as JSON text, with each raw-value stand-in replaced by what it stands for."""
    def raw(match: re.Match[str]) -> str:
        kind, depth = match.group(1), int(match.group(2) or 0)
        if kind == "big":
            return "1e400"
        if kind == "list":
            return "[" * depth + "0" + "]" * depth
        return '{"a": ' * depth + "0" + "}" * depth
    return DEEP.sub(raw, json.dumps(body)).encode()


json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts | raw_values,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(texts, children, max_size=3),
    max_leaves=8,
)
def _weighted(*hostile: st.SearchStrategy[Any], valid: st.SearchStrategy[Any]
              ) -> st.SearchStrategy[Any]:
    """Mostly `hostile` bodies; one in ten `valid` (an accepted request runs the model,
    which is what makes an example slow)."""
    return st.sampled_from([*hostile, *hostile, *hostile, valid]).flatmap(lambda s: s)


# In range, for the requests that should be accepted.
VALID = {"max_new_tokens": st.integers(1, 2), "temperature": st.floats(0, 2),
         "top_p": st.floats(0, 1), "top_k": st.integers(0, 50),
         "repeat_penalty": st.floats(0.5, 2), "seed": st.integers(0, 2**31)}
valid_texts = st.text(min_size=1, max_size=12).filter(str.strip)
# Mostly objects with the real field names, so validation is exercised field by field; a
# text with one hostile number; and valid requests, accepted between the rejected ones so
# that the history they change is checked too.
plausible = st.fixed_dictionaries({"user_input": texts}, optional={
    name: numbers | raw_values for name in NUMERIC})
valid = st.fixed_dictionaries({"user_input": valid_texts}, optional=VALID)
bodies = _weighted(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5),
                  plausible, json_values, valid=valid)

OPENAI_FIELDS = ["messages", "stream", "max_tokens", "temperature", "top_p", "top_k",
                 "repeat_penalty", "seed", "stop", "n", "stream_options", "model", "tools"]
ROLES = ["system", "developer", "user", "assistant", "tool", "wizard"]
contents = texts | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                            max_size=2)
# Role sequences: system after user, two users in a row, assistant last, unknown roles...,
# often ending with a user's message, as a valid conversation must.
turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": contents}),
                 max_size=4)
messages = st.builds(lambda head, last: head + last, turns, st.sampled_from(
    [[], [{"role": "user", "content": "Hi"}]])) | st.lists(
    st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values}),
    max_size=3)
plausible_openai = st.fixed_dictionaries({"messages": messages}, optional={
    **{name: numbers | raw_values for name in ("max_tokens", "temperature", "top_p", "top_k",
                                               "repeat_penalty", "seed")},
    "stop": texts | st.lists(texts, max_size=3),
    "stream": st.booleans(),
})
valid_openai = st.fixed_dictionaries({"messages": turns.map(
    lambda head: [*head, {"role": "user", "content": "Hi"}])}, optional={
    **{name: VALID["max_new_tokens" if name == "max_tokens" else name]
       for name in ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "seed")},
    "stop": valid_texts | st.lists(valid_texts, max_size=3),
    "stream": st.booleans(),
})
openai_bodies = _weighted(plausible_openai, st.fixed_dictionaries({}, optional={
    name: json_values for name in OPENAI_FIELDS}), json_values, valid=valid_openai)


@pytest.fixture(scope="module")
def threaded_server(model_path: str) -> Iterator[Server]:
    """A real server on its own loop in a thread: hypothesis drives it synchronously."""
    yield from _threaded(ChatStream(model_path, n_ctx=512, max_new_tokens=MAX_NEW_TOKENS))


@pytest.fixture(scope="module")
def schema_server(model_path: str) -> Iterator[Server]:
    """Replies long enough to reach a grammar's dead ends and costly states."""
    yield from _threaded(ChatStream(model_path, n_ctx=512, max_new_tokens=SCHEMA_NEW_TOKENS))


def _threaded(chat_stream: ChatStream) -> Iterator[Server]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start_server(chat_stream, build_full_app),
                                              loop).result(60)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _post(server: Server, body: bytes, cookie: str | None, path: str = "/chat_stream",
          timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _stored(server: Server, session_id: str) -> Any:
    storage = server.chat_stream.session_store.storage
    entry = storage._data.get(session_id)  # type: ignore[attr-defined]
    return json.loads(entry[1])["session"] if entry else None


def _kinds(text: str) -> set[str]:
    """Which of the hostile inputs a generated body holds (to check they were generated)."""
    kinds = {kind for kind in ("list", "dict", "big") if f"@@{kind}" in text}
    if re.search("[\ud800-\udfff]", text):
        kinds.add("surrogate")
    if re.search(r"\d{399}", text):
        kinds.add("huge")
    return kinds


def _server_errors(server: Server) -> float:
    """Accepted requests that ended in `unknown_error_occurred`, on both endpoints."""
    registry = server.chat_stream.metrics.registry
    return sum(registry.get_sample_value("chatstream_requests_total", {
        "endpoint": endpoint, "status": "unknown_error_occurred"}) or 0.0
        for endpoint in ("chat_stream", "chat_completions"))


def _wait_for_calls(server: Server, count: int) -> None:
    """The callback runs on the server's loop right after the body's last chunk."""
    deadline = time.monotonic() + 10
    while len(server.recorder.calls) < count:
        assert time.monotonic() < deadline, "no callback for an accepted request"
        time.sleep(0.005)


def _assert_json_error(headers: dict[str, str], payload: bytes) -> Any:
    assert headers["Content-Type"].startswith("application/json"), payload
    return json.loads(payload)["error"]


FINISH_REASONS = {"stop", "length", "tool_calls"}


def _assert_usage(usage: Any, limit: int) -> None:
    counts = [usage[name] for name in ("prompt_tokens", "completion_tokens", "total_tokens")]
    assert all(type(count) is int for count in counts), usage
    prompt, completion, total = counts
    assert prompt > 0 and 0 <= completion <= limit and total == prompt + completion, usage


def _chat_completion(headers: dict[str, str], payload: bytes, limit: int) -> dict[str, Any]:
    """A 200 of /v1/chat/completions as OpenAI's clients read it: one `chat.completion`, or
    (`stream: true`) its `chat.completion.chunk` events ending in `[DONE]`. `limit`: the most
    tokens the server may generate. Returns the one choice, a stream's text joined into it."""
    if headers["Content-Type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in payload.decode().splitlines()
                  if line.startswith("data: ")]
        assert events[-1] == "[DONE]", payload[-500:]
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks and all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
        assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"], chunks[0]
        for chunk in chunks:
            if chunk.get("usage"):                       # stream_options.include_usage
                assert chunk["choices"] == [] and chunk is chunks[-1], chunks
                _assert_usage(chunk["usage"], limit)
        choices = [choice for chunk in chunks for choice in chunk["choices"]]
        assert choices and all(choice["index"] == 0 for choice in choices), chunks
        reasons = [choice["finish_reason"] for choice in choices]
        assert reasons[-1] in FINISH_REASONS and set(reasons[:-1]) == {None}, reasons
        assert choices[0]["delta"]["role"] == "assistant", choices[0]
        text = "".join(choice["delta"].get("content") or "" for choice in choices)
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": reasons[-1]}
    assert headers["Content-Type"].startswith("application/json"), headers
    completion = json.loads(payload)
    assert completion["object"] == "chat.completion", completion
    assert isinstance(completion["id"], str) and completion["id"], completion
    assert type(completion["created"]) is int and isinstance(completion["model"], str)
    [choice] = completion["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in FINISH_REASONS, choice
    message = choice["message"]
    assert message["role"] == "assistant", message
    assert isinstance(message["content"], str) or (
        message["content"] is None and message.get("tool_calls")), message
    _assert_usage(completion["usage"], limit)
    return dict(choice)


def test_arbitrary_json_never_gets_a_5xx_nor_changes_history(threaded_server: Server) -> None:
    server = threaded_server
    status, headers, _ = _post(server, json.dumps({"user_input": "hello"}).encode(), None)
    assert status == 200
    session_id = headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    cookie = f"CHATSTREAM_SESSION={session_id}"
    _wait_for_calls(server, 1)
    seen: Counter[str] = Counter()

    # derandomize: the kinds-were-generated check below counts random draws, and a run
    # that drew only three dict stand-ins in 150 failed `.ci/run` here (session 7).
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, derandomize=True)
    @given(body=bodies)
    def property_holds(body: Any) -> None:
        before = _stored(server, session_id)
        calls = len(server.recorder.calls)
        status, headers, payload = _post(server, splice(body), cookie)
        # Accepted, or refused as a bad request: nothing here is too large, busy or a 5xx.
        assert status in (200, 400), (status, body, payload)
        if status == 200:
            seen["accepted"] += 1
            _wait_for_calls(server, calls + 1)
            assert server.recorder.calls[-1][0] == "success", body
            if len(server.recorder.calls[-1][1]) > 6:  # the history; short prompts are fast
                assert _post(server, b"{}", cookie, "/clear_context")[0] == 200
            return
        seen["rejected"] += 1
        seen.update(_kinds(json.dumps(body, ensure_ascii=False)))
        assert _assert_json_error(headers, payload)
        assert _stored(server, session_id) == before, "a rejected request changed the history"
        assert len(server.recorder.calls) == calls, "a rejected request got a callback"

    property_holds()
    assert seen["rejected"] > 50 and seen["accepted"] >= 3, seen
    assert min(seen[kind] for kind in ("list", "dict", "big", "surrogate", "huge")) > 3, seen
    assert _server_errors(server) == 0
    calls = len(server.recorder.calls)
    status, _, payload = _post(server, json.dumps({"user_input": "still there?"}).encode(), cookie)
    # Answered: a 2-token reply may be empty (the model may end at once), so the callback
    # says it, not the text.
    assert status == 200
    _wait_for_calls(server, calls + 1)
    assert server.recorder.calls[-1][0] == "success"


def test_arbitrary_json_at_the_openai_route_never_gets_a_5xx(threaded_server: Server) -> None:
    server = threaded_server
    seen: Counter[str] = Counter()

    # derandomize: the kinds-were-generated check below counts random draws, and a run
    # that drew only three dict stand-ins in 150 failed `.ci/run` here (session 7).
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, derandomize=True)
    @given(body=openai_bodies)
    def property_holds(body: Any) -> None:
        status, headers, payload = _post(server, splice(body), None, "/v1/chat/completions")
        assert status in (200, 400), (status, body, payload)
        if status == 200:
            seen["accepted"] += 1
            _chat_completion(headers, payload, limit=MAX_NEW_TOKENS)
            return
        seen["rejected"] += 1
        seen.update(_kinds(json.dumps(body, ensure_ascii=False)))
        error = _assert_json_error(headers, payload)
        assert set(error) == {"message", "type", "param", "code"} and error["message"]

    property_holds()
    assert seen["rejected"] > 50 and seen["accepted"] >= 3, seen
    assert min(seen[kind] for kind in ("list", "dict", "big", "surrogate", "huge")) > 3, seen
    assert _server_errors(server) == 0
    ok = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, _, payload = _post(server, json.dumps(ok).encode(), None, "/v1/chat/completions")
    assert status == 200 and json.loads(payload)["choices"][0]["message"]["role"] == "assistant"


# JSON Schemas of what the converter enforces, with hostile corners: patterns built from
# ECMAScript pieces (ambiguous repetitions, classes, escapes, anchors), constants holding
# quotes, backslashes and control characters, bounds in any order.
PATTERN_ATOMS = ["a", "b", "1", ".", "[a-c]", "[^,]", "[z-a]", "\\d", "\\w", "\\s", "\\.",
                 '"', "\\\\", "\\n", "[\\d-]", "\\x01", "(?:a|bb)", "\\1", "(?=a)", "()"]
PATTERN_QUANTIFIERS = ["", "", "?", "*", "+", "{2}", "{0,3}", "{1,40}", "{3,1}", "{0,60}"]
pattern_units = st.recursive(
    st.tuples(st.sampled_from(PATTERN_ATOMS), st.sampled_from(PATTERN_QUANTIFIERS)).map(
        "".join),
    lambda inner: st.tuples(st.lists(inner, min_size=1, max_size=3).map("".join),
                            st.sampled_from(["|", ""]), st.lists(inner, max_size=2).map("".join),
                            st.sampled_from(PATTERN_QUANTIFIERS)).map(
        lambda t: f"({t[0]}{t[1]}{t[2]}){t[3]}"),
    max_leaves=6)
patterns = st.tuples(st.sampled_from(["^", ""]), st.lists(pattern_units, max_size=4).map(
    "".join), st.sampled_from(["$", ""])).map("".join)
tricky_text = st.text(alphabet=st.sampled_from(['a', '"', "\\", "\n", "\x00", "\x1f", "\u2028",
                                                "é", "[", "]", "^"]), max_size=6)
counts = st.integers(-2, 70)
leaf_schemas = st.one_of(
    st.builds(lambda p: {"type": "string", "pattern": p}, patterns),
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": hi}, counts, counts),
    st.sampled_from([{"type": "integer"}, {"type": "number"}, {"type": "boolean"},
                     {"type": "null"}]),
    st.builds(lambda v: {"const": v}, tricky_text),
    st.builds(lambda vs: {"enum": vs}, st.lists(tricky_text, max_size=3)),
)
schemas = st.recursive(leaf_schemas, lambda inner: st.one_of(
    st.builds(lambda props: {"type": "object", "additionalProperties": False,
                             "required": list(props), "properties": props},
              st.dictionaries(tricky_text, inner, max_size=3)),
    st.builds(lambda item, lo, hi: {"type": "array", "items": item, "minItems": lo,
                                    "maxItems": hi}, inner, st.integers(0, 3), st.integers(0, 3)),
    st.builds(lambda options: {"anyOf": options}, st.lists(inner, min_size=1, max_size=2)),
), max_leaves=5)


@pytest.mark.timeout(1200)   # 120 real replies of up to 24 grammar-held tokens: 8 min loaded
def test_arbitrary_schemas_never_get_a_5xx_stall_or_an_invalid_reply(
        schema_server: Server) -> None:
    # Before session 7 one 60-byte schema aborted the process, another held the engine
    # thread for minutes, and constants with escapes came back as other text.
    server = schema_server
    seen: Counter[str] = Counter()

    # derandomize: the counts checked below are of one fixed draw of 120 schemas, not of
    # whatever a run happens to draw.
    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, derandomize=True)
    @given(schema=schemas)
    def property_holds(schema: Any) -> None:
        body = {"messages": [{"role": "user", "content": "Answer in JSON."}], "temperature": 0,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": schema}}}
        status, headers, payload = _post(server, json.dumps(body).encode(), None,
                                         "/v1/chat/completions", timeout=SCHEMA_STALL)
        assert status in (200, 400), (status, schema, payload)
        if status != 200:
            seen["rejected"] += 1
            error = _assert_json_error(headers, payload)
            assert error["type"] == "invalid_request_error" and error["message"], error
            return
        choice = _chat_completion(headers, payload, limit=SCHEMA_NEW_TOKENS)
        seen[choice["finish_reason"]] += 1
        content = choice["message"]["content"]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(content), schema)
        else:   # cut by max_tokens: the grammar held every token, so it is a JSON value begun
            assert choice["finish_reason"] == "length" and json_prefix(content), (schema, content)

    property_holds()
    # This draw: 41 refused, 64 replies that stopped, 15 cut by max_tokens (SmolLM2, x86).
    assert seen["rejected"] >= 20 and seen["stop"] >= 30 and seen["length"] >= 5, seen
    assert _server_errors(server) == 0
    ok = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, _, payload = _post(server, json.dumps(ok).encode(), None, "/v1/chat/completions")
    assert status == 200


def _deep(depth: int, kind: str = "list") -> str:
    return splice(f"@@{kind}{depth}@@").decode()


HUGE = "9" * 400
LONE = "\\ud800"      # as the raw body carries it: a JSON escape
# (name, raw /chat_stream body): each must be a 400 with a JSON body, changing nothing.
HOSTILE_CHAT_BODIES = [
    ("body nested 1,000 deep (arrays)", _deep(1_000)),
    ("body nested 5,000 deep (objects)", _deep(5_000, "dict")),
    ("body nested 33 deep", '{"user_input": "hi", "x": ' + _deep(32) + "}"),
    ("user_input nested 1,000 deep", '{"user_input": ' + _deep(1_000) + "}"),
    ("an unknown field nested 1,000 deep", '{"user_input": "hi", "x": ' + _deep(1_000, "dict") + "}"),
    *[(f"{name} of 400 digits", f'{{"user_input": "hi", "{name}": {HUGE}}}') for name in NUMERIC],
    *[(f"{name} of -400 digits", f'{{"user_input": "hi", "{name}": -{HUGE}}}') for name in NUMERIC],
    ("temperature 1e400", '{"user_input": "hi", "temperature": 1e400}'),
    ("user_input a lone high surrogate", f'{{"user_input": "hi {LONE} there"}}'),
    ("user_input a lone low surrogate", '{"user_input": "\\udfff"}'),
]
HOSTILE_OPENAI_BODIES = [
    ("body nested 1,000 deep", _deep(1_000)),
    ("messages nested 1,000 deep", '{"messages": ' + _deep(1_000) + "}"),
    ("content nested 1,000 deep",
     '{"messages": [{"role": "user", "content": ' + _deep(1_000, "dict") + "}]}"),
    ("stop nested 1,000 deep",
     '{"messages": [{"role": "user", "content": "hi"}], "stop": ' + _deep(1_000) + "}"),
    *[(f"{name} of 400 digits",
       f'{{"messages": [{{"role": "user", "content": "hi"}}], "{name}": {HUGE}}}')
      for name in ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                   "repeat_penalty", "seed")],
    ("user content a lone surrogate", f'{{"messages": [{{"role": "user", "content": "a{LONE}"}}]}}'),
    ("content part a lone surrogate", '{"messages": [{"role": "user", "content": '
     f'[{{"type": "text", "text": "{LONE}"}}]}}]}}'),
    ("system content a lone surrogate", f'{{"messages": [{{"role": "system", "content": "{LONE}"}}, '
     '{"role": "user", "content": "hi"}]}'),
    ("assistant content a lone surrogate", '{"messages": [{"role": "user", "content": "hi"}, '
     f'{{"role": "assistant", "content": "{LONE}"}}, {{"role": "user", "content": "and?"}}]}}'),
    ("stop a lone surrogate", f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": "{LONE}"}}'),
    ("stop list a lone surrogate",
     f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": ["ok", "{LONE}"]}}'),
    # (A system message after a user turn is accepted since issue 12 where the template can
    # render it: tests/test_openai_parity.py.)
    # (A last assistant message is continued since issue 12: tests/test_openai_tools.py.)
    ("a tool result answering no call", '{"messages": [{"role": "user", "content": "hi"}, '
     '{"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}'),
    ("an unknown role", '{"messages": [{"role": "wizard", "content": "hi"}]}'),
]


@pytest.fixture(scope="module")
def hostile_session(threaded_server: Server) -> str:
    """A session with one turn, which the hostile bodies below must leave as it is."""
    server = threaded_server
    calls = len(server.recorder.calls)
    status, headers, _ = _post(server, json.dumps({"user_input": "First"}).encode(), None)
    assert status == 200
    _wait_for_calls(server, calls + 1)
    return headers["Set-Cookie"].split(";")[0]


@pytest.mark.parametrize("name, body", HOSTILE_CHAT_BODIES,
                         ids=[b[0] for b in HOSTILE_CHAT_BODIES])
def test_hostile_chat_stream_bodies_are_json_400s_that_change_nothing(
        threaded_server: Server, hostile_session: str, name: str, body: str) -> None:
    server = threaded_server
    session_id = hostile_session.split("=", 1)[1]
    before = _stored(server, session_id)
    calls, errors = len(server.recorder.calls), _server_errors(server)
    status, headers, payload = _post(server, body.encode(), hostile_session)
    assert status == 400, (name, payload)
    error = _assert_json_error(headers, payload)
    assert error == "bad_request" and json.loads(payload)["message"], name
    assert _stored(server, session_id) == before
    assert len(server.recorder.calls) == calls and _server_errors(server) == errors


@pytest.mark.parametrize("name, body", HOSTILE_OPENAI_BODIES,
                         ids=[b[0] for b in HOSTILE_OPENAI_BODIES])
def test_hostile_openai_bodies_are_openai_shaped_400s(threaded_server: Server, name: str,
                                                       body: str) -> None:
    server = threaded_server
    errors = _server_errors(server)
    status, headers, payload = _post(server, body.encode(), None, "/v1/chat/completions")
    assert status == 400, (name, payload)
    error = _assert_json_error(headers, payload)
    assert error["type"] == "invalid_request_error" and error["message"], name
    assert _server_errors(server) == errors


def test_after_every_hostile_body_both_endpoints_still_serve(threaded_server: Server,
                                                             hostile_session: str) -> None:
    server = threaded_server
    calls = len(server.recorder.calls)
    status, _, payload = _post(server, json.dumps({"user_input": "Second"}).encode(),
                               hostile_session)
    assert status == 200 and payload
    _wait_for_calls(server, calls + 1)
    status, history = server.recorder.calls[-1]
    assert status == "success"
    assert [m["content"] for m in history if m["role"] == "user"] == ["First", "Second"]
    ok = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, _, payload = _post(server, json.dumps(ok).encode(), None, "/v1/chat/completions")
    assert status == 200 and json.loads(payload)["choices"][0]["message"]["content"] is not None
    assert _server_errors(server) == 0


BAD_OPENAI_BODIES = [
    ("messages missing", {"max_tokens": 2}),
    ("messages not a list", {"messages": "hi"}),
    ("messages empty", {"messages": []}),
    ("a message not an object", {"messages": ["hi"]}),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("role a list", {"messages": [{"role": ["user"], "content": "hi"}]}),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}),
    ("content missing", {"messages": [{"role": "user"}]}),
    ("n above one", {"messages": [{"role": "user", "content": "hi"}], "n": 3}),
    ("stream not a bool", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}),
    ("max_tokens negative", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
]


@pytest.mark.parametrize("name, body", BAD_OPENAI_BODIES, ids=[b[0] for b in BAD_OPENAI_BODIES])
def test_bad_openai_bodies_are_openai_shaped_400s(threaded_server: Server, name: str,
                                                  body: dict[str, Any]) -> None:
    status, headers, payload = _post(threaded_server, json.dumps(body).encode(), None,
                                     "/v1/chat/completions")
    assert status == 400, name
    error = json.loads(payload)["error"]
    assert error["type"] == "invalid_request_error" and error["message"], name


# Mistral-style: refuses any conversation whose roles do not alternate user/assistant.
ALTERNATING_ONLY = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)


@pytest.mark.parametrize("roles", [["user", "user"], ["system", "user"],
                                   ["user", "assistant", "user", "user"]])
def test_a_chat_template_that_refuses_the_conversation_is_a_400_with_its_message(
        threaded_server: Server, roles: list[str]) -> None:
    """What a GGUF with such a template does: its message reaches the client, as a 400."""
    engine = threaded_server.chat_stream.engine
    info = engine.model_info
    assert info is not None
    strict = ChatTemplate(ALTERNATING_ONLY, bos_token=info.chat_template.bos_token,
                          eos_token=info.chat_template.eos_token)
    engine.model_info = replace(info, chat_template=strict)
    try:
        errors = _server_errors(threaded_server)
        refused = {"messages": [{"role": r, "content": "hi"} for r in roles], "max_tokens": 2}
        status, headers, payload = _post(threaded_server, json.dumps(refused).encode(), None,
                                         "/v1/chat/completions")
        assert status == 400, payload
        error = _assert_json_error(headers, payload)
        assert error["type"] == "invalid_request_error" and error["code"] == "template_refused"
        assert "roles must alternate" in error["message"]
        assert _server_errors(threaded_server) == errors
        fine = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        status, _, payload = _post(threaded_server, json.dumps(fine).encode(), None,
                                   "/v1/chat/completions")
        assert status == 200, payload
    finally:
        engine.model_info = info
