"""JSON grammars for constrained decoding (`response_format`), in llama.cpp's GBNF.

    >>> gbnf = json_grammar(None)                           # any JSON object
    >>> gbnf = json_grammar('{"type": "object", ...}')      # what a JSON Schema allows

The conversion is llama-cpp-python's port of llama.cpp's json-schema-to-grammar, the one
llama-server uses; keywords it does not know (`format`, say) are not enforced. It runs while
the request is parsed (in a worker thread, never on the event loop: a small schema can ask
for a large grammar), so a schema it cannot take is the request's 400, never a failure on
the engine thread. The grammar sampler itself is built per sequence (sampler.py).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from typing import Any, TypeGuard

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter

from .guidance import gbnf_grammar, lark_grammar, schema_grammar
from .pattern import Budget, pattern_rules

__all__ = ["ANY_CHAR", "BOUNDS", "COUNT_KEYWORDS", "EMPTY_RULE", "ENGINE", "JSON_CHAR",
           "JSON_EXCLUDED", "LITERAL_ESCAPE", "LITERAL_ESCAPES", "LITERAL_OR_CLASS",
           "MAX_GRAMMAR_CHARS", "MAX_GRAMMAR_DEPTH", "MAX_REPETITION", "PARENS",
           "RECENT_SCHEMAS", "RULE_NAME", "Grammars", "json_grammar"]

# llama.cpp parses a grammar recursively, one level per parenthesis, and the converter nests
# one level per repetition (`maxLength: 100000` nests 100,000 deep): a deep enough grammar
# would overflow the C stack of the engine thread. llama.cpp's parser now refuses more than
# 1,000 levels itself (measured: `maxLength` 1000 parses, 1001 does not), which would fail the
# request on the engine thread rather than as its 400; so the depth bound is exactly that.
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_GRAMMAR_DEPTH = 1000
ANY_CHAR = r'char ::= [^"\\] |'
# The converter writes out one rule per repetition a count asks for before the bounds above
# can be checked: `maxLength: 1e9` would build gigabytes of text for minutes. Counts above this
# are refused before converting (what it lets through converts in a few milliseconds; the
# size and depth bounds then refuse all but the small ones).
MAX_REPETITION = 65_536
COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
                  "maxProperties", "minContains", "maxContains")
BOUNDS = (("minLength", "maxLength"), ("minItems", "maxItems"),
          ("minProperties", "maxProperties"), ("minContains", "maxContains"),
          ("minimum", "maximum"))
# A GBNF literal or character class, escapes included: scanned in one pass, so a class's
# brackets inside a literal are not taken for a class.
LITERAL_OR_CLASS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')
PARENS = re.compile(r"[()]")
EMPTY_RULE = re.compile(r"^\S+ ::=[ (|)]*$", re.MULTILINE)   # a rule that allows nothing
RECENT_SCHEMAS = 64          # schemas (and their grammars, up to 256 KiB each) remembered
_recent: OrderedDict[str, str | ValueError] = OrderedDict()
_recent_lock = threading.Lock()     # json_grammar runs in the request workers' threads
JSON_EXCLUDED = r'"\\\x7F\x00-\x1F'           # what a JSON string never holds raw
JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'
# Which engine holds replies to a grammar: "llguidance" (guidance.py: faster per token and
# to compile, and it passes the schema fuzz test: benchmarks/RESULTS.md, "Constrained
# decoding: llama.cpp's grammar engine against llguidance") or "llama" (llama.cpp's GBNF
# sampler, with the conversion and bounds below, kept until it is deleted); read at each
# call, so that benchmarks.grammar can measure both in one process.
ENGINE = os.environ.get("CHATSTREAM_GRAMMAR_ENGINE", "llguidance")


class Grammars:
    """What `ModelInfo.json_grammar` is: called with JSON Schema text (None: any JSON object)
    it returns the grammar that holds a reply to it; `gbnf` and `lark` take grammar text a
    request sends. Each raises `ValueError` for what it cannot take (the request's 400).
    The grammar is in the language of ENGINE's sampler."""

    @property
    def language(self) -> str:
        """"llguidance" or "gbnf": what the grammars made here are written in."""
        return "llguidance" if ENGINE == "llguidance" else "gbnf"

    def __call__(self, schema: str | None) -> str:
        if ENGINE == "llguidance":
            return schema_grammar(schema)
        return _remembered_gbnf(schema)

    def gbnf(self, text: str) -> str:
        """llama.cpp's GBNF (llama-server's `grammar`), its root rule `root`."""
        if ENGINE == "llguidance":
            return gbnf_grammar(text)
        if len(text) > MAX_GRAMMAR_CHARS or _depth(text) > MAX_GRAMMAR_DEPTH:
            raise ValueError("the grammar is too large or nests too deeply")
        _check_parses(text)
        return text

    def lark(self, text: str) -> str:
        """llguidance's Lark (tool formats' lazy grammars); only under llguidance."""
        if ENGINE != "llguidance":
            raise ValueError("Lark grammars need the llguidance engine")
        return lark_grammar(text)


json_grammar = Grammars()


def _remembered_gbnf(schema: str | None) -> str:
    """GBNF that accepts exactly the JSON text `schema` allows, or any JSON object when it
    is None.

    The last schemas asked for are remembered, refusals included: agents send the same
    tools with every request, and a hostile client the same costly schema."""
    if schema is None:
        return JSON_GBNF
    with _recent_lock:
        known = _recent.get(schema)
        if known is not None:
            _recent.move_to_end(schema)
    if known is None:
        try:
            known = _json_grammar(schema)
        except ValueError as error:
            known = error
        with _recent_lock:
            _recent[schema] = known
            while len(_recent) > RECENT_SCHEMAS:
                _recent.popitem(last=False)
    if isinstance(known, ValueError):
        raise ValueError(str(known))
    return known


def _json_grammar(schema: str) -> str:
    _check_counts(schema)
    try:
        grammar = _convert(schema)
    except RecursionError:
        raise ValueError("the schema nests too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError,
            NotImplementedError) as error:   # the converter's ways of saying "cannot"
        raise ValueError(str(error) or type(error).__name__) from None
    # The converter's string character is any but `"` and `\`, raw control characters
    # included, which strict JSON parsers refuse (a raw newline in a string, say); llama.cpp's
    # own converter and JSON_GBNF exclude them.
    grammar = _json_safe_classes(grammar.replace(ANY_CHAR, JSON_CHAR))
    if len(grammar) > MAX_GRAMMAR_CHARS or _depth(grammar) > MAX_GRAMMAR_DEPTH:
        raise ValueError("the schema's grammar is too large (lower maxLength, maxItems or "
                         "the nesting)")
    if EMPTY_RULE.search(grammar):
        # llama.cpp would refuse it too, but only after printing the whole grammar to stderr.
        raise ValueError("the schema allows no value (an empty 'enum', 'anyOf' or 'type' "
                         "list)")
    _check_parses(grammar)
    return grammar


# How llama.cpp's own converter writes a literal into GBNF (json-schema-to-grammar.cpp); the
# Python port escapes only the first three, not the backslash (see `_Converter`).
RULE_NAME = re.compile(r"[^a-zA-Z0-9-]+")      # what GBNF rule names may not hold
LITERAL_ESCAPE = re.compile(r'[\r\n"\\]')
LITERAL_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}


class _Converter(SchemaConverter):
    r"""llama-cpp-python's converter with literals escaped as llama.cpp's own converter escapes
    them. Its literals are JSON text (`json.dumps` of a `const`, an `enum` value or a property
    name), whose escapes begin with a backslash; left as it was, GBNF read `\n` as a raw
    newline (a reply no JSON parser takes), `\\` as one backslash (another value) and `\"` as
    the literal's end (a grammar that does not parse)."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self.budget = Budget()          # every pattern of the schema spends from this one
        self.pattern_chars = 0
        self.root_visited = False

    def visit(self, schema: Any, name: str) -> str:
        # The port names a property's rule after its path, and the root's is "": a property
        # named "" of the root object was visited as the root itself, its rule written over
        # the root's (the reply was that property's value, not the object).
        if name == "" and self.root_visited:
            name = "empty-name"
        self.root_visited = True
        rule: str = super().visit(schema, name)
        return rule

    def _format_literal(self, literal: str) -> str:
        return '"' + LITERAL_ESCAPE.sub(lambda m: LITERAL_ESCAPES[m.group(0)], literal) + '"'

    def _visit_pattern(self, pattern: str, name: str) -> str:
        """A `pattern` as a deterministic grammar (pattern.py), instead of the port's near
        literal copy, which llama.cpp could read in exponentially many ways."""
        base = RULE_NAME.sub("-", name or "root") + "-pattern"
        prefix, n = base, 1
        while any(rule.startswith(prefix + "-") for rule in self._rules):
            n += 1
            prefix = f"{base}{n}"
        compiled = pattern_rules(pattern, prefix, self.budget)
        self._rules.update(compiled.rules)
        self.pattern_chars += sum(len(rule) + len(body) for rule, body in compiled.rules.items())
        if self.pattern_chars > MAX_GRAMMAR_CHARS:
            raise ValueError("the schema's patterns make too large a grammar")
        rule: str = self._add_rule(name, f'"\\"" {compiled.root} "\\"" space')
        return rule


def _convert(schema: str) -> str:
    """`llama_cpp.llama_grammar.json_schema_to_gbnf`, with `_Converter`."""
    converter = _Converter()
    converter.visit(converter.resolve_refs(json.loads(schema), "stdin"), "")
    grammar: str = converter.format_grammar()
    return grammar


def _json_safe_classes(grammar: str) -> str:
    """Every "any character but ..." class (`[^...]`) also refuses `"`, `\\` and the control
    characters.

    Every negated class in the converter's output stands inside a JSON string (the key
    exclusions of `additionalProperties`, the string character; patterns are compiled by
    pattern.py into positive classes), where a raw `"` would end the string early and a raw
    control character is not JSON; so each gets the exclusions the JSON string character
    has. Classes inside quoted literals (a `const` that reads `[^a]`) are left as they are.
    """
    return LITERAL_OR_CLASS.sub(_json_safe_class, grammar)


def _json_safe_class(match: re.Match[str]) -> str:
    text = match.group(0)
    if text.startswith("[^") and JSON_EXCLUDED not in text:
        return text[:-1] + JSON_EXCLUDED + "]"
    return text                                 # a literal, or a class that names its chars


def _check_parses(grammar: str) -> None:
    """Have llama.cpp's own parser read `grammar` here, off the engine thread.

    Found only when the sequence's sampler is built, a grammar llama.cpp refuses was a failed
    reply (500) from the engine thread; the converter's patterns did that (`[\\w]`, `\\1`,
    `a**`) before pattern.py. No vocabulary is needed to parse (only to read token
    references, which JSON grammars do not have), so this touches no model: 6 ms for 22 KB.
    """
    try:
        text = grammar.encode("utf-8")
    except UnicodeEncodeError:                # a lone surrogate in a pattern or a name
        raise ValueError("the schema holds text that is not valid Unicode") from None
    sampler = llama_cpp.llama_sampler_init_grammar(None, text, b"root")
    if not sampler:
        raise ValueError("llama.cpp cannot parse the grammar the schema converts to")
    llama_cpp.llama_sampler_free(sampler)


def _check_counts(schema: str) -> None:
    """Refuse a repetition count the converter would spend unbounded time and memory on, and
    bounds no value can meet (a least above a most: the grammar would allow nothing)."""
    try:
        stack: list[Any] = [json.loads(schema)]
    except ValueError:
        return                                      # the converter says what is wrong
    while stack:                                    # no recursion: any nesting is fine here
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in COUNT_KEYWORDS and _number(value) \
                        and not 0 <= value <= MAX_REPETITION:
                    raise ValueError(f"'{key}' must be between 0 and {MAX_REPETITION}, "
                                     f"not {value}")
                stack.append(value)
            for least, most in BOUNDS:
                low, high = node.get(least), node.get(most)
                if _number(low) and _number(high) and low > high:
                    raise ValueError(f"'{least}' ({low}) is above '{most}' ({high}): no "
                                     "value can meet the schema")
        elif isinstance(node, list):
            stack.extend(node)


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _depth(grammar: str) -> int:
    """How deeply `grammar` nests parentheses, outside its string literals and classes."""
    depth = deepest = 0
    for paren in PARENS.findall(LITERAL_OR_CLASS.sub("", grammar)):
        depth += 1 if paren == "(" else -1
        deepest = max(deepest, depth)
    return deepest
