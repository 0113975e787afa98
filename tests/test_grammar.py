"""JSON Schema to grammar: what a hostile schema can cost before the grammar exists.

The conversion runs in the request's parsing, off the engine thread; these check that no
schema makes it unbounded (no model is needed, but llama_cpp's converter is: the model tier).
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.timeout(20), pytest.mark.model]

# grammar.py imports llama_cpp: where it is blocked (the fast tier) the module is skipped.
grammar_module = pytest.importorskip("chatstream_lite.engine.llama.grammar")
json_grammar, MAX_REPETITION = grammar_module.json_grammar, grammar_module.MAX_REPETITION


@pytest.fixture(autouse=True)
def llama_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """These bounds are those of llama.cpp's grammar path (kept for comparison until it is
    deleted: benchmarks/RESULTS.md, "llama.cpp's grammar engine against llguidance")."""
    monkeypatch.setattr(grammar_module, "ENGINE", "llama")


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 10**12},
    {"type": "string", "minLength": 10**12},
    {"type": "array", "items": {"type": "integer"}, "minItems": 10**12},
    {"type": "object", "properties": {"a": {"type": "array", "maxItems": 1e300}}},
    {"type": "string", "minLength": -5},
])
def test_a_huge_repetition_count_is_refused_before_converting(schema: dict[str, object]) -> None:
    # Converted as asked, the first would write out 10^12 nested rules: hours and terabytes.
    with pytest.raises(ValueError, match=f"between 0 and {MAX_REPETITION}"):
        json_grammar(json.dumps(schema))


def test_ordinary_counts_still_convert() -> None:
    grammar = json_grammar(json.dumps({
        "type": "object", "required": ["story", "tags"], "properties": {
            "story": {"type": "string", "minLength": 400, "maxLength": 800},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}}}))
    assert "root ::=" in grammar
    # A count the converter takes but whose grammar is too deep is refused after it.
    with pytest.raises(ValueError, match="too large"):
        json_grammar(json.dumps({"type": "string", "maxLength": MAX_REPETITION}))


@pytest.mark.parametrize("schema", [{"enum": []}, {"anyOf": []}, {"type": []},
                                    {"type": "object", "properties": {"a": {"enum": []}},
                                     "required": ["a"]}])
def test_a_schema_that_allows_no_value_is_refused_before_llama_cpp_reads_it(
        schema: dict[str, object], capfd: pytest.CaptureFixture[str]) -> None:
    # The converter writes an empty rule; llama.cpp's parser refuses it, but first prints the
    # whole grammar to stderr: a client could fill the log with each request.
    with pytest.raises(ValueError, match="allows no value"):
        json_grammar(json.dumps(schema))
    assert capfd.readouterr().err == ""


def test_a_schema_asked_again_is_converted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Agents send the same tools (and a client the same hostile schema) with every request;
    # a pattern at the work bound costs ~0.5 s of a worker each time it is converted.
    calls: list[str] = []
    convert = grammar_module._convert

    def counted(schema: str) -> str:
        calls.append(schema)
        return convert(schema)

    monkeypatch.setattr(grammar_module, "_convert", counted)
    good = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                       "description": "asked twice"})
    bad = json.dumps({"type": "string", "pattern": "^(.?){999}$", "description": "twice"})
    assert json_grammar(good) is json_grammar(good)
    for _ in range(2):
        with pytest.raises(ValueError, match="too ambiguous"):
            json_grammar(bad)
    assert calls == [good, bad]


def test_many_patterns_in_one_schema_share_one_bound() -> None:
    # Each pattern alone is under the bound; 2,000 of them (a 100 KB body) would have
    # kept a worker busy for minutes, and 50 long ones make a grammar over the size bound.
    many = {"type": "object", "properties": {
        f"p{i}": {"type": "string", "pattern": "^(.?){60}$"} for i in range(2000)}}
    with pytest.raises(ValueError, match="too many"):
        json_grammar(json.dumps(many))
    long = {"type": "object", "properties": {
        f"p{i}": {"type": "string", "pattern": "^.{0,900}$"} for i in range(50)}}
    with pytest.raises(ValueError, match="too large"):
        json_grammar(json.dumps(long))


def test_a_property_named_empty_keeps_the_object_as_the_root() -> None:
    # Found by the schema fuzz test: the reply was the property's integer, not the object.
    grammar = json_grammar(json.dumps({"type": "object", "required": [""],
                                       "properties": {"": {"type": "integer"}}}))
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    assert rules["root"].startswith('"{"'), grammar
