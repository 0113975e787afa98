"""OpenAI API parity (issue 12): what OpenAI clients and agent frameworks send, answered as
llama-server and Ollama answer it, driven by the official `openai` client on the real model."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from chatstream_lite import ChatStream

from .conftest import (
    Gate,
    Server,
    build_full_app,
    json_object_prefix,
    json_prefix,
    serve,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

N_CTX = 1024
MAX_NEW_TOKENS = 40
REPLY = 24                 # tokens of the replies that need not be long
ALIAS = "gpt-4o-mini"
# Greedy replies are compared within one request only: a prompt found in the KV cache is read
# in other batches, which moves the logits enough to change a tiny model's greedy text.
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "user", "content": "Write a long poem about the sea."}]


@pytest_asyncio.fixture(scope="module")
async def server(model_path: str) -> AsyncIterator[Server]:
    chat_stream = ChatStream(model_path, n_ctx=N_CTX, max_new_tokens=MAX_NEW_TOKENS,
                             num_of_concurrent_executions=2, served_model_name=ALIAS)
    async for running in serve(chat_stream, build_full_app):
        yield running



async def _stream_text(client: AsyncOpenAI, **kwargs: Any) -> tuple[str, str | None]:
    """A streamed reply's text and its finish reason."""
    stream = await client.chat.completions.create(model="x", stream=True, **kwargs)
    text, reason = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    return text, reason


# -- priority 1: what clients send by default ------------------------------------------------
async def test_response_format_text_is_accepted_streaming_and_not(client: AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(
        model="x", messages=QUESTION, max_tokens=8, response_format={"type": "text"}, **GREEDY)
    text, _ = await _stream_text(client, messages=QUESTION, max_tokens=8,
                                 response_format={"type": "text"}, **GREEDY)
    assert whole.choices[0].message.content and text


async def test_max_tokens_above_the_cap_is_clamped_and_cut_with_length(
        client: AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(
        model="x", messages=LONG, max_tokens=4096, **GREEDY)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == MAX_NEW_TOKENS
    text, reason = await _stream_text(client, messages=LONG, max_completion_tokens=100_000,
                                      **GREEDY)
    assert reason == "length" and text


async def test_a_system_message_after_a_user_turn_reaches_the_template(
        client: AsyncOpenAI) -> None:
    history: list[Any] = [{"role": "user", "content": "Hi!"},
                          {"role": "assistant", "content": "Hello! How can I help?"}]
    ask = {"role": "user", "content": "What is the capital of France?"}
    plain = await client.chat.completions.create(
        model="x", messages=[*history, ask], max_tokens=4, **GREEDY)
    steered = await client.chat.completions.create(
        model="x", messages=[*history, {"role": "system", "content": "Answer in one word."},
                             ask], max_tokens=4, **GREEDY)
    assert plain.usage is not None and steered.usage is not None
    # The system turn was rendered in place: its words and its role markers are in the prompt.
    assert steered.usage.prompt_tokens > plain.usage.prompt_tokens + 5
    assert steered.choices[0].message.content


async def test_the_served_model_name_is_the_id_everywhere_with_a_fingerprint(
        client: AsyncOpenAI) -> None:
    assert [m.id async for m in client.models.list()] == [ALIAS]
    whole = await client.chat.completions.create(model=ALIAS, messages=QUESTION, max_tokens=2)
    assert whole.model == ALIAS
    assert whole.system_fingerprint and whole.system_fingerprint.startswith("fp_")
    stream = await client.chat.completions.create(model=ALIAS, messages=QUESTION, max_tokens=2,
                                                  stream=True)
    chunks = [chunk async for chunk in stream]
    assert {(c.model, c.system_fingerprint) for c in chunks} == {
        (ALIAS, whole.system_fingerprint)}


async def test_other_response_formats_and_prefill_under_a_grammar_are_400s(
        client: AsyncOpenAI) -> None:
    # A last assistant message is continued (test_openai_tools.py), but not under a grammar:
    # the reply would have to start a JSON value in the middle of the prefix.
    cases: list[tuple[dict[str, Any], str]] = [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"messages": [*QUESTION, {"role": "assistant", "content": "The"}],
          "response_format": {"type": "json_object"}}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**{"model": "x", "messages": QUESTION, **extra})
        assert caught.value.response.json()["error"]["param"] == param, extra


# -- priority 2: penalties and logit_bias in the sampler chain -------------------------------
REPEAT = [{"role": "user", "content": "Say the word hello twenty times."}]


def _tokens(server: Server, *words: str) -> list[int]:
    info = server.chat_stream.engine.model_info
    assert info is not None
    return [t for w in words for t in info.tokenizer.tokenize(w, special=False)]


async def test_a_token_banned_with_logit_bias_never_appears(
        server: Server, client: AsyncOpenAI) -> None:
    baseline = await client.chat.completions.create(
        model="x", messages=REPEAT, max_tokens=16, **GREEDY)
    assert "hello" in (baseline.choices[0].message.content or "")
    banned = {str(t): -100 for t in _tokens(server, "hello", " hello", "Hello", " Hello")}
    whole = await client.chat.completions.create(
        model="x", messages=REPEAT, max_tokens=16, logit_bias=banned, **GREEDY)
    text, _ = await _stream_text(client, messages=REPEAT, max_tokens=16, logit_bias=banned,
                                 **GREEDY)
    for reply in (whole.choices[0].message.content or "", text):
        assert reply and "hello" not in reply and "Hello" not in reply, reply


async def test_a_token_favoured_with_logit_bias_is_all_there_is(
        server: Server, client: AsyncOpenAI) -> None:
    [banana] = _tokens(server, " banana")
    whole = await client.chat.completions.create(
        model="x", messages=QUESTION, max_tokens=8, logit_bias={str(banana): 100}, **GREEDY)
    assert whole.choices[0].message.content == " banana" * 8


async def test_frequency_and_presence_penalties_change_greedy_output(
        client: AsyncOpenAI) -> None:
    async def hellos(**extra: Any) -> int:
        reply = await client.chat.completions.create(
            model="x", messages=REPEAT, max_tokens=REPLY, **GREEDY, **extra)
        return (reply.choices[0].message.content or "").lower().count("hello")

    plain = await hellos()
    assert plain >= 8, "without penalties the model repeats itself"
    assert await hellos(frequency_penalty=2.0) <= plain // 2
    assert await hellos(presence_penalty=2.0) <= plain // 2
    text, _ = await _stream_text(client, messages=REPEAT, max_tokens=REPLY,
                                 frequency_penalty=2.0, **GREEDY)
    assert text.lower().count("hello") <= plain // 2


async def test_bad_penalties_and_biases_are_400s(client: AsyncOpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {"hello": 5}}, "logit_bias"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),   # beyond the vocabulary
        ({"logit_bias": {"1" * 5000: 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**{"model": "x", "messages": QUESTION, **extra})
        assert caught.value.response.json()["error"]["param"] == param, extra


async def test_chat_stream_takes_the_penalties_too(server: Server) -> None:
    async with server.client() as session:
        counts = []
        for penalty in (0.0, 2.0):
            async with session.post("/chat_stream", json={
                    "user_input": REPEAT[0]["content"], "temperature": 0, "repeat_penalty": 1.0,
                    "frequency_penalty": penalty, "max_new_tokens": REPLY}) as response:
                assert response.status == 200
                counts.append((await response.text()).lower().count("hello"))
            async with session.post("/clear_context", json={}) as response:
                assert response.status == 200
    assert counts[0] >= 8 and counts[1] <= counts[0] // 2, counts


# -- priority 3: replies held to JSON by a grammar -------------------------------------------
CITY = {"type": "object", "additionalProperties": False,
        "required": ["city", "country", "population"],
        "properties": {"city": {"type": "string", "maxLength": 20},
                       "country": {"type": "string", "maxLength": 20},
                       "population": {"type": "integer"}}}
DESCRIBE = [{"role": "user", "content": "Describe Paris as JSON."}]
CITY_FORMAT: Any = {"type": "json_schema",
                    "json_schema": {"name": "city", "schema": CITY, "strict": True}}


async def test_json_object_replies_parse_streaming_and_not(client: AsyncOpenAI) -> None:
    """`json_object` bounds nothing, so whether a reply ends before the server's cap is the
    model's (and the CPU's: seen both ways): a finished reply is an object, a cut one the
    start of one."""
    whole = await client.chat.completions.create(
        model="x", messages=DESCRIBE, response_format={"type": "json_object"}, **GREEDY)
    text, reason = await _stream_text(client, messages=DESCRIBE, temperature=1.0, seed=7,
                                      response_format={"type": "json_object"})
    for reply, finish in ((whole.choices[0].message.content or "", whole.choices[0].finish_reason),
                          (text, reason)):
        if finish == "stop":
            assert isinstance(json.loads(reply), dict), reply
        else:
            assert finish == "length" and json_object_prefix(reply), (finish, reply)


async def test_json_schema_replies_validate_streaming_and_not(client: AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(
        model="x", messages=DESCRIBE, response_format=CITY_FORMAT, **GREEDY)
    text, reason = await _stream_text(client, messages=DESCRIBE, temperature=1.0, seed=3,
                                      response_format=CITY_FORMAT)
    assert whole.choices[0].finish_reason == reason == "stop"
    for reply in (whole.choices[0].message.content or "", text):
        jsonschema.validate(json.loads(reply), CITY)


async def test_a_grammar_binds_its_own_sequence_not_its_batched_neighbour(
        server: Server, client: AsyncOpenAI) -> None:
    admission, engine = server.chat_stream.runtime.admission, server.chat_stream.engine
    # The engine thread is held at the first token until both requests have their slots, so
    # they are decoded in one batch however slowly the constrained one is prepared.
    gate = Gate()
    engine.faults.before_token = gate
    try:
        constrained_reply = asyncio.create_task(client.chat.completions.create(
            model="x", messages=DESCRIBE, response_format=CITY_FORMAT, **GREEDY))
        free_reply = asyncio.create_task(client.chat.completions.create(
            model="x", messages=DESCRIBE, max_tokens=REPLY, **GREEDY))
        await gate.wait_reached()
        await wait_until(lambda: admission.running == 2, timeout=60)
    finally:
        gate.open()
        engine.faults.before_token = None
    constrained, free = await constrained_reply, await free_reply
    jsonschema.validate(json.loads(constrained.choices[0].message.content or ""), CITY)
    assert not (free.choices[0].message.content or "").lstrip().startswith("{")


async def test_schemas_the_grammar_cannot_hold_are_400s(client: AsyncOpenAI) -> None:
    cases: list[tuple[Any, str]] = [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
         "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
         "response_format.json_schema"),
        # A 100-byte body that would have the converter write out 10^12 rules.
        ({"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string", "maxLength": 10**12}}},
         "response_format.json_schema.schema"),
        # Patterns no grammar holds (a backreference, a lookahead, a word boundary), one no
        # string matches (an empty range), and empty alternatives. The first were 500s from
        # the engine thread; the empty range killed the server (see below).
        *((_pattern_format(pattern), "response_format.json_schema.schema")
          for pattern in (r"^(a)\1$", r"^(?=a)b$", r"^\bx$", r"^[z-a]$", r"^x[z-a]$")),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}},
         "response_format.json_schema.schema"),
        # A backreference in a branch no reply can take (minItems above maxItems): llguidance
        # compiles a branch only when a reply reaches it, so this was served (the schema
        # fuzz test's draw found it), the same pattern elsewhere refused.
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": [
            {"type": "object"}, {"type": "array", "minItems": 1, "maxItems": 0, "items": {
                "type": "string", "pattern": r"^(a|\1)$"}}]}}},
         "response_format.json_schema.schema"),
        # Bounds no value meets: found before the model is asked.
        *(({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
           "response_format.json_schema.schema")
          for schema in ({"type": "string", "minLength": 5, "maxLength": 2},
                         {"type": "array", "items": {}, "minItems": 3, "maxItems": 1},
                         {"type": "integer", "minimum": 5, "maximum": 2})),
    ]
    for response_format, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="x", messages=QUESTION,
                                                 response_format=response_format)
        assert caught.value.response.json()["error"]["param"] == param, response_format
    # A long bound is no cost on llguidance (one lexer state, not a rule per character): it
    # was a 400 on llama.cpp's grammar, whose parser refused 1,000 levels of nesting.
    served = await client.chat.completions.create(
        model="x", messages=QUESTION, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "string", "maxLength": 100_000}}})
    assert json_prefix(served.choices[0].message.content or "")


# Values JSON writes with a backslash: a quote, a backslash, a newline, a NUL. The converter
# put their JSON text into GBNF literals unescaped, where llama.cpp reads `\n` as a raw newline
# (invalid JSON), `\\` as one backslash (another value) and `\"` as the literal's end.
ESCAPED = 'say "hi"\\path\nnext\u0000end'


async def test_constants_and_names_with_escaped_characters_come_back_equal(
        client: AsyncOpenAI) -> None:
    schemas: list[tuple[Any, Any]] = [
        ({"const": ESCAPED}, [ESCAPED]),
        ({"enum": [ESCAPED, "plain"]}, [ESCAPED, "plain"]),
        ({"type": "object", "required": [ESCAPED], "additionalProperties": False,
          "properties": {ESCAPED: {"const": 1}}}, [{ESCAPED: 1}]),
    ]
    for schema, allowed in schemas:
        whole = await client.chat.completions.create(
            model="x", messages=DESCRIBE, max_tokens=40, **GREEDY,
            response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                    "schema": schema}})
        assert whole.choices[0].finish_reason == "stop", whole
        assert json.loads(whole.choices[0].message.content or "") in allowed, schema


def _pattern_format(pattern: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": pattern}}}


# Patterns as the JSON Schema spec reads them, held by a deterministic grammar: `\d` and
# classes with `\w` (refused before: llama.cpp's parser has no such escapes), and patterns
# llama.cpp's grammar engine could read in exponentially many ways (`(.?){60}`: one request
# held the engine thread for minutes, every stream frozen).
PATTERNS = [r"^\d{3}-\d{4}$", r"^[\w ]{4,30}$", r"^(.?){60}$", r"^(.|..){12}$"]


async def test_patterns_hold_replies_and_ambiguous_ones_cost_no_more(
        client: AsyncOpenAI) -> None:
    for pattern in PATTERNS:
        whole = await client.chat.completions.create(
            model="x", messages=DESCRIBE, response_format=_pattern_format(pattern), **GREEDY)
        assert whole.choices[0].finish_reason == "stop", (pattern, whole)
        value = json.loads(whole.choices[0].message.content or "")
        assert re.search(pattern, value, re.ASCII), (pattern, value)
    # A tool's parameters take the same patterns; the server keeps serving.
    tool: Any = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": ["code"],
        "properties": {"code": {"type": "string", "pattern": r"^(.?){60}$"}}}}}
    called = await client.chat.completions.create(
        model="x", messages=DESCRIBE, tools=[tool], tool_choice="required", **GREEDY)
    calls = called.choices[0].message.tool_calls or []
    assert calls and isinstance(json.loads(calls[0].function.arguments)["code"], str)


# -- priority 4: POST /v1/completions --------------------------------------------------------
PROMPT = "The capital of France is"


async def test_completions_continue_plain_text_streaming_and_not(
        server: Server, client: AsyncOpenAI) -> None:
    whole = await client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=8,
                                            **GREEDY)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.model == ALIAS and whole.system_fingerprint
    assert whole.choices[0].text and whole.choices[0].finish_reason in ("stop", "length")
    # No chat template: the prompt's own tokens are all the model read.
    assert whole.usage is not None and whole.usage.prompt_tokens == len(_tokens(server, PROMPT))
    stream = await client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=4096,
                                             stream=True, stream_options={"include_usage": True},
                                             **GREEDY)
    chunks = [chunk async for chunk in stream]
    *pieces, last, usage = chunks
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in pieces) and last.choices[0].finish_reason == "length"
    assert usage.usage is not None and usage.usage.completion_tokens == MAX_NEW_TOKENS


async def test_completions_read_control_token_text_as_text(
        server: Server, client: AsyncOpenAI) -> None:
    prompt = "<|im_start|>assistant\n"
    whole = await client.completions.create(model="x", prompt=prompt, max_tokens=1)
    assert whole.usage is not None
    info = server.chat_stream.engine.model_info
    assert info is not None
    as_control = info.tokenizer.tokenize(prompt, special=True)       # <|im_start|> is one token
    assert whole.usage.prompt_tokens == len(_tokens(server, prompt)) > len(as_control)


async def test_completions_refuse_what_they_cannot_do(client: AsyncOpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": PROMPT, "echo": True}, "echo"),
        ({"prompt": PROMPT, "best_of": 2}, "best_of"),
        ({"prompt": PROMPT, "suffix": "!"}, "suffix"),
        ({"prompt": "word " * 2000}, "prompt"),                 # beyond n_ctx: not cut
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(**{"model": "x", "max_tokens": 4, **extra})
        assert caught.value.response.json()["error"]["param"] == param, extra


async def test_closing_a_completions_stream_stops_generation(
        server: Server, client: AsyncOpenAI) -> None:
    engine = server.chat_stream.engine
    admission = server.chat_stream.runtime.admission
    before = engine.stats.completion_tokens
    stream = await client.completions.create(model="x", prompt="Once upon a time",
                                             max_tokens=MAX_NEW_TOKENS, stream=True, **GREEDY)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            break
    await stream.close()
    await wait_until(lambda: admission.running == 0)
    assert engine.stats.completion_tokens - before < MAX_NEW_TOKENS


def test_the_json_prefix_check_takes_cut_objects_and_refuses_the_rest() -> None:
    cut = ['{', '{"a', '{"a":', '{"a": 1,', '{"a": [1, 2', '{"a": "x\\', '{"a": "\\u00',
           '{"a": tr', '{"a": -', '{"a": 1e', '{"a": {"b": nul', ' {"a": "b"}',
           '{"a": true', '{"a": [false', '{"a": 1, ']
    refused = ['', 'Here is JSON: {', '{]', '{"a": 1}}', '{"a" 1', '[1', '{"a": xyz',
               '{"a": tr ', '{"a": 1. ', '{"a": NaN', '{"a": Infinity}']
    assert [text for text in cut if not json_object_prefix(text)] == []
    assert [text for text in refused if json_object_prefix(text)] == []


def test_the_json_prefix_check_takes_the_start_of_any_json_value() -> None:
    cut = ['', ' ', '"', '"ab\\', '"\\u12', '-', '-1.', '1e+', 'tru', 'true', 'nul', '[',
           '[1, {"a": [', '12', '"x"', '[true, fals', '{"a": 1}']
    refused = ['x', 'NaN', 'Infinity', '01', '"a" "b"', '1,', 'tr ', '[1,]', '{"a": 1}x', '}',
               '-.', 'True', '1 2']
    assert [text for text in cut if not json_prefix(text)] == []
    assert [text for text in refused if json_prefix(text)] == []


# -- llama-server's request extensions: grammar, json_schema, its samplers -------------------
YES_NO = 'root ::= answer "."\nanswer ::= "Yes" | "No"'


async def test_a_gbnf_grammar_in_extra_body_holds_chat_and_completions(
        client: AsyncOpenAI) -> None:
    chat = await client.chat.completions.create(
        model="x", messages=QUESTION, temperature=0, extra_body={"grammar": YES_NO})
    text = await client.completions.create(model="x", prompt="Is Paris in France?",
                                           max_tokens=8, temperature=0,
                                           extra_body={"grammar": YES_NO})
    assert chat.choices[0].message.content in ("Yes.", "No.")
    assert chat.choices[0].finish_reason == "stop"
    assert text.choices[0].text in ("Yes.", "No.") and text.choices[0].finish_reason == "stop"
    # Left recursion: llama.cpp's own GBNF engine refuses it; llguidance serves it.
    recursive = await client.chat.completions.create(
        model="x", messages=QUESTION, max_tokens=6, temperature=0,
        extra_body={"grammar": 'root ::= "a" | root "b"'})
    assert re.fullmatch("ab*", recursive.choices[0].message.content or ""), recursive


async def test_a_top_level_json_schema_in_extra_body_validates(client: AsyncOpenAI) -> None:
    chat = await client.chat.completions.create(
        model="x", messages=DESCRIBE, temperature=0, extra_body={"json_schema": CITY})
    text = await client.completions.create(
        model="x", prompt="Paris as JSON: ", max_tokens=MAX_NEW_TOKENS, temperature=0,
        extra_body={"json_schema": CITY})
    assert chat.choices[0].finish_reason == text.choices[0].finish_reason == "stop"
    for reply in (chat.choices[0].message.content or "", text.choices[0].text):
        jsonschema.validate(json.loads(reply), CITY)


async def test_hostile_grammars_are_400s_naming_grammar_and_the_server_goes_on(
        client: AsyncOpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"grammar": "root ::= missing"}, "grammar"),
        ({"grammar": 'root ::= "a'}, "grammar"),
        ({"grammar": "root ::= " + "(" * 5000 + '"a"' + ")" * 5000}, "grammar"),
        ({"grammar": 12}, "grammar"),
        ({"grammar": "root ::= \"a\"", "json_schema": CITY}, "grammar"),
        ({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}},
         "grammar"),
        ({"json_schema": {"type": "string", "pattern": "^(a)\\1$"}}, "json_schema"),
        ({"json_schema": [1]}, "json_schema"),
    ]
    for extra, param in cases:
        body = dict(extra)
        response_format = body.pop("response_format", None)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="x", messages=QUESTION, max_tokens=2, extra_body=body,
                **({"response_format": response_format} if response_format else {}))
        assert caught.value.response.json()["error"]["param"] == param, extra
    ok = await client.chat.completions.create(model="x", messages=QUESTION, max_tokens=2)
    assert ok.choices[0].message.role == "assistant"


async def test_llama_servers_sampling_options_are_taken_and_checked(
        client: AsyncOpenAI) -> None:
    options = {"min_p": 0.1, "typical_p": 0.9, "repeat_last_n": -1, "n_probs": 2,
               "cache_prompt": True}
    reply = await client.chat.completions.create(
        model="x", messages=QUESTION, max_tokens=4, temperature=0.8, seed=1,
        extra_body=options)
    text = await client.completions.create(model="x", prompt="Once upon a time",
                                           max_tokens=4, temperature=0.8, seed=1,
                                           extra_body=options)
    assert reply.choices[0].message.content and text.choices[0].text
    # n_probs is llama-server's top_logprobs: the alternatives come in OpenAI's shape.
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert all(len(entry.top_logprobs) == 2 for entry in logprobs.content)
    for name, value in (("min_p", 1.5), ("typical_p", -0.1), ("repeat_last_n", -2),
                        ("n_probs", 1000), ("cache_prompt", "yes"), ("min_p", "0.1")):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="x", messages=QUESTION, max_tokens=2,
                                                 extra_body={name: value})
        assert caught.value.response.json()["error"]["param"] == name, (name, value)
