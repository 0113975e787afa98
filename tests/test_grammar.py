"""JSON Schema to grammar: what a hostile schema can cost before the grammar exists.

The conversion runs in the request's parsing, off the engine thread; these check that no
schema makes it unbounded (no model is needed).
"""

from __future__ import annotations

import json

import pytest

from chatstream_lite.engine.llama.grammar import MAX_REPETITION, json_grammar

pytestmark = pytest.mark.timeout(20)


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
