"""Property: whatever JSON a client sends, never a 5xx, no history changed by a rejected
request, and the server still answers a normal request afterwards."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstream_lite import ChatStream

from .conftest import Server, build_full_app, start_server

pytestmark = pytest.mark.timeout(600)

FIELDS = ["user_input", "regenerate", "max_new_tokens", "temperature", "top_p", "top_k",
          "repeat_penalty", "seed"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
# Mostly objects with the real field names, so validation is exercised field by field.
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5) | json_values

OPENAI_FIELDS = ["messages", "stream", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
                 "stream_options", "model", "tools"]
messages = st.lists(
    st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["system", "user", "assistant", "tool", "wizard"]) | json_values,
        "content": st.text(max_size=10) | json_values,
    }),
    max_size=3,
)
openai_bodies = st.fixed_dictionaries({}, optional={
    **{name: json_values for name in OPENAI_FIELDS},
    "messages": messages | json_values,
}) | json_values


@pytest.fixture(scope="module")
def threaded_server(model_path: str) -> Iterator[Server]:
    """A real server on its own loop in a thread: hypothesis drives it synchronously."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    chat_stream = ChatStream(model_path, n_ctx=512, max_new_tokens=2)
    server = asyncio.run_coroutine_threadsafe(start_server(chat_stream, build_full_app),
                                              loop).result(60)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _post(server: Server, body: bytes, cookie: str | None, path: str = "/chat_stream"
          ) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
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


def test_arbitrary_json_never_gets_a_5xx_nor_changes_history(threaded_server: Server) -> None:
    server = threaded_server
    status, headers, _ = _post(server, json.dumps({"user_input": "hello"}).encode(), None)
    assert status == 200
    session_id = headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    cookie = f"CHATSTREAM_SESSION={session_id}"
    seen = {"rejected": 0, "accepted": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(body=bodies)
    def property_holds(body: Any) -> None:
        before = _stored(server, session_id)
        status, headers, payload = _post(server, json.dumps(body).encode(), cookie)
        assert status < 500, (body, payload)
        if status == 200:
            seen["accepted"] += 1
            return
        seen["rejected"] += 1
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(payload)["error"]
        assert _stored(server, session_id) == before, "a rejected request changed the history"

    property_holds()
    assert seen["rejected"] > 50
    status, _, payload = _post(server, json.dumps({"user_input": "still there?"}).encode(), cookie)
    assert status == 200 and payload


def test_arbitrary_json_at_the_openai_route_never_gets_a_5xx(threaded_server: Server) -> None:
    server = threaded_server
    seen = {"rejected": 0, "accepted": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(body=openai_bodies)
    def property_holds(body: Any) -> None:
        status, headers, payload = _post(server, json.dumps(body).encode(), None,
                                         "/v1/chat/completions")
        assert status < 500, (body, payload)
        if status == 200:
            seen["accepted"] += 1
            return
        seen["rejected"] += 1
        assert headers["Content-Type"].startswith("application/json")
        error = json.loads(payload)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]

    property_holds()
    assert seen["rejected"] > 50
    ok = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, _, payload = _post(server, json.dumps(ok).encode(), None, "/v1/chat/completions")
    assert status == 200 and json.loads(payload)["choices"][0]["message"]["role"] == "assistant"


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
