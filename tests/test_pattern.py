"""A JSON Schema `pattern` as a deterministic grammar (engine/llama/pattern.py).

The automaton must accept exactly the strings the regular expression matches (checked
against Python's `re`, ASCII mode, on random strings), read each text one way only, and
stay bounded for the patterns that made llama.cpp's grammar engine exponential. No model,
and no llama_cpp but for the one test that writes a whole grammar (llama_cpp's converter).
"""

from __future__ import annotations

import json
import random
import re

import pytest

from chatstream_lite.engine.llama.pattern import MAX_DFA_STATES, automaton, pattern_rules

pytestmark = pytest.mark.timeout(60)

# (pattern, the alphabet its random test strings are drawn from)
CASES = [
    (r"^[A-Z]{2}\d{4}$", "AZq09-"),
    (r"^\d{3}-\d{4}$", "0159-a"),
    (r"^[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}$", "ab.@-%9Z"),
    (r"^(\d{1,3}\.){3}\d{1,3}$", "0129."),
    (r"^(.|..){3}$", "ab\""),
    (r"^(.?){6}$", "ab\\"),
    (r"^(?:ab|a)(?<tail>c|bcd)d*$", "abcd"),
    (r"^[^,]+(,[^,]+)*$", "a,b "),
    (r"^\w+( \w+){0,3}$", "ab_ 9-"),
    (r"^\S+\s?\S*$", "ab \t"),
    (r"^[\D]+$", "a1 "),
    (r"^a{2,}b{0,2}$", "ab"),
    (r"^(a|b)*a(a|b){3}$", "ab"),
    (r"^x\$y\.z\\$", "x$y.z\\"),
    (r"^[\]\-^]+$", "]-^a"),
    (r"ab", "abc"),                 # unanchored: anywhere in the string
    (r"^ab", "abc"),
    (r"ab$", "abc"),
    (r"^(a|)+$", "ab"),
    (r"^$", "a"),
    (r"^[^]$", "ab"),
    # Anchors belong to their alternative, as in ECMAScript: "starts with ab, or ends with c".
    (r"^ab|c$", "abc"),
    (r"^a|b|c$", "abc1"),
    (r"^(a|b)$|^1", "ab1"),
]


# Texts that match, for patterns random texts seldom match.
EXAMPLES = {r"^x\$y\.z\\$": ["x$y.z\\"], r"^\d{3}-\d{4}$": ["123-4567"],
            r"^[A-Z]{2}\d{4}$": ["AZ0199"], r"^(\d{1,3}\.){3}\d{1,3}$": ["1.22.0.9"],
            r"^[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}$": ["a.b@ab.ab"]}


def accepts(machine: tuple[list[list[tuple[tuple[tuple[int, int], ...], int]]], list[bool]],
            text: str) -> bool:
    moves, accepting = machine
    state = 0
    for char in text:
        code = ord(char)
        following = [target for chars, target in moves[state]
                     if any(low <= code <= high for low, high in chars)]
        assert len(following) <= 1, "a character with two ways to go"
        if not following:
            return False
        state = following[0]
    return accepting[state]


@pytest.mark.parametrize(("pattern", "alphabet"), CASES)
def test_the_automaton_accepts_what_the_regular_expression_matches(
        pattern: str, alphabet: str) -> None:
    machine = automaton(pattern)
    python = pattern.replace("[^]", "[\\s\\S]").replace("(?<tail>", "(?P<tail>")
    rng = random.Random(pattern)
    texts = {"", *alphabet, *EXAMPLES.get(pattern, ())}
    texts |= {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
              for _ in range(3000)}
    agreed = matched = 0
    for text in texts:
        expected = re.search(python, text, re.ASCII) is not None
        assert accepts(machine, text) == expected, (pattern, text)
        agreed += 1
        matched += expected
    assert agreed == len(texts) and matched > 0, f"no random text matched {pattern}"


@pytest.mark.parametrize("pattern", [r"^(.?){60}$", r"^(.|..){30}$", r"^(.|..|...){20}$",
                                     r"^(a{0,3}){50}$"])
def test_ambiguous_patterns_become_small_deterministic_grammars(pattern: str) -> None:
    # These held llama.cpp's engine thread for minutes: one way to read each text per stack,
    # and exponentially many stacks. As a DFA they are a chain of states.
    moves, _ = automaton(pattern)
    assert len(moves) <= 200
    for out in moves:
        chars = sorted(interval for piece, _ in out for interval in piece)
        assert all(a[1] < b[0] for a, b in zip(chars, chars[1:], strict=False)), \
            "two moves share a character"


@pytest.mark.parametrize(("pattern", "why"), [
    (r"^(?=a)b$", "lookarounds"),
    (r"^(a)\1$", "not supported"),
    (r"^\bx$", "not supported"),
    (r"^a{3,1}$", "least above its most"),
    (r"^(a", "unbalanced"),
    (r"^a)$", "unbalanced"),
    (r"^[z-a]$", "below its start"),
    (r"^[]$", "no JSON string"),
    (r"^\x01$", "no JSON string"),
    (r"^a^b$", "anchors"),
    (r"^.{0,5000}$", "too large"),
    (r"^(a|b)*a(a|b){12}$", f"more than {MAX_DFA_STATES}"),
    (r"^(.?){999}$", "too ambiguous"),
    ("^" + "(" * 5000 + "a" + ")" * 5000 + "$", "nests too deeply"),
])
def test_what_cannot_be_held_is_refused_with_its_reason(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        pattern_rules(pattern, "p")


@pytest.mark.model
def test_quotes_backslashes_and_newlines_are_written_as_their_json_escapes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from chatstream_lite.engine.llama import grammar  # imports llama_cpp
    from chatstream_lite.engine.llama.grammar import json_grammar

    monkeypatch.setattr(grammar, "ENGINE", "llama")

    grammar = json_grammar(json.dumps({"type": "string", "pattern": '^a"\\\\\\n$'}))
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    body = " ".join(rules.values())
    # `"` -> \" and `\` -> \\ and a newline -> \n, each as a GBNF literal of the escape.
    assert '"\\\\\\""' in body and '"\\\\\\\\"' in body and '"\\\\n"' in body, grammar
