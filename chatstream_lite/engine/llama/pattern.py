"""A JSON Schema `pattern` as a deterministic grammar: regular expression -> DFA -> GBNF.

    >>> rules = pattern_rules("^[A-Z]{2}\\d{4}$", "code")
    >>> rules.root                      # 'code-0'; rules.rules: {rule name: GBNF body}

Why not the converter's own translation: it copies the regular expression into GBNF almost
as written, and llama.cpp's grammar engine keeps one stack per way a text can be read. A
pattern that can read a text in many ways (`(.?){60}`, `(.|..){30}`: 60 bytes of JSON) made
the engine's pass over the vocabulary exponential: one request held the engine thread for
minutes, every stream frozen. A DFA reads every text one way only, so a pass over the
vocabulary costs what a plain string's does; and the bound on its states is checked here, in
the request's worker thread, before the engine sees it. The pattern's characters are
written as JSON text: `"` and `\\` as their escapes, raw control characters never (only the
escapes JSON has short forms for: \\b \\f \\n \\r \\t), so the reply stays valid JSON.

Supported: literals, `.`, classes (`[a-z]`, `[^,]`, with `\\d \\w \\s` and their negations
inside and out), groups (`(...)`, `(?:...)`, `(?<name>...)`), `|`, and `* + ? {m} {m,} {m,n}`
(lazy `?` suffixes read the same). An alternative not anchored by `^` / `$` matches anywhere
in the string, as JSON Schema says (`^a|b$`: starts with a, or ends with b). Not supported (a
`ValueError`, the request's 400): lookarounds, backreferences, word boundaries, anchors
other than at an alternative's start or end.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass, field

__all__ = ["ANY", "BOUNDS", "CHAR_ESCAPES", "CLASS_ESCAPES", "DIGIT", "ESCAPES", "LINE_ENDS",
           "MAX_CODEPOINT", "MAX_DFA_STATES", "MAX_NFA_STATES", "MAX_WORK",
           "MINIMIZE_STEPS", "RAW", "SPACE", "WORD", "automaton", "Budget", "Chars",
           "pattern_rules", "PatternRules"]

MAX_NFA_STATES = 4_000       # Thompson states: a repetition count is written out in full
MAX_DFA_STATES = 1_000       # each becomes one GBNF rule
# Steps of the subset construction (NFA states visited, pieces of characters split): what
# bounds this module's time in the worker thread (~0.5 s at the bound on a 2-core CPU).
MAX_WORK = 250_000
MINIMIZE_STEPS = 20_000      # merging equivalent states only saves rules: never worth more
MAX_CODEPOINT = 0x10FFFF

# Inclusive codepoint intervals, sorted and disjoint.
Chars = tuple[tuple[int, int], ...]

ANY: Chars = ((0, 0xD7FF), (0xE000, MAX_CODEPOINT))     # no surrogate is a character
DIGIT: Chars = ((0x30, 0x39),)
WORD: Chars = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE: Chars = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                (0x3000, 0x3000), (0xFEFF, 0xFEFF))
LINE_ENDS: Chars = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))
# Characters a JSON string holds raw, and those written as a two-character escape; other
# control characters (\u0000-style escapes) are never generated.
RAW: Chars = ((0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E), (0x80, 0xD7FF),
              (0xE000, MAX_CODEPOINT))
ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r",
           0x09: "\\t"}
BOUNDS = re.compile(r"\{(\d+)(,(\d*))?\}")
CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE}
CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}


class Budget:
    """The steps a conversion may still take, shared by every pattern of one schema: a
    request's body could otherwise hold thousands of patterns each just under the bound."""

    def __init__(self, steps: int = MAX_WORK) -> None:
        self.left = steps

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise ValueError("the schema's patterns are too ambiguous (optional or "
                             "variable-length parts under a repetition count) or too many to "
                             "make deterministic here")


# -- character sets ---------------------------------------------------------------------
def _normal(intervals: list[tuple[int, int]]) -> Chars:
    out: list[tuple[int, int]] = []
    for low, high in sorted(intervals):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return tuple(out)


def _union(*sets: Chars) -> Chars:
    return _normal([interval for chars in sets for interval in chars])


def _intersect(a: Chars, b: Chars) -> Chars:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if low <= high:
            out.append((low, high))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def _complement(chars: Chars) -> Chars:
    out, start = [], 0
    for low, high in chars:
        if low > start:
            out.append((start, low - 1))
        start = high + 1
    if start <= MAX_CODEPOINT:
        out.append((start, MAX_CODEPOINT))
    return _intersect(tuple(out), ANY)


def _single(code: int) -> Chars:
    return ((code, code),)


# -- the regular expression -------------------------------------------------------------
@dataclass(frozen=True)
class _Set:
    chars: Chars


@dataclass(frozen=True)
class _Seq:
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Alt:
    options: tuple[_Node, ...]


@dataclass(frozen=True)
class _Repeat:
    item: _Node
    low: int
    high: int | None          # None: no upper bound


_Node = _Set | _Seq | _Alt | _Repeat


class _Parser:
    """Recursive descent over the pattern; nesting is bounded by the caller's text size
    (the request body), and deep nesting fails as a `ValueError`, not a crash."""

    def __init__(self, pattern: str) -> None:
        self.text = pattern
        self.i = 0

    def fail(self, why: str) -> ValueError:
        return ValueError(f"pattern {self.text!r}: {why} at index {self.i}")

    def peek(self) -> str | None:
        return self.text[self.i] if self.i < len(self.text) else None

    def take(self) -> str:
        char = self.peek()
        if char is None:
            raise self.fail("unexpected end")
        self.i += 1
        return char

    def pattern(self) -> _Node:
        """The whole pattern: alternatives that match anywhere in the text unless `^` starts
        or `$` ends them (`^a|b$` is "starts with a, or ends with b", as in ECMAScript)."""
        everything = _Repeat(_Set(ANY), 0, None)
        options: list[_Node] = []
        while True:
            start = self.peek() == "^"
            self.i += start
            body = self.sequence(top=True)
            end = self.peek() == "$"
            self.i += end
            options.append(_Seq(((), (everything,))[not start] + (body,) +
                                ((), (everything,))[not end]))
            if self.peek() != "|":
                break
            self.i += 1
        if self.peek() is not None:
            raise self.fail("unbalanced parentheses")
        return options[0] if len(options) == 1 else _Alt(tuple(options))

    def alternation(self) -> _Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else _Alt(tuple(options))

    def sequence(self, *, top: bool = False) -> _Node:
        items: list[_Node] = []
        while self.peek() not in (None, "|", ")"):
            if top and self.peek() == "$" and self.text[self.i + 1:self.i + 2] in ("", "|"):
                break                             # the alternative's end anchor
            atom = self.atom()
            items.append(self.quantified(atom))
        return items[0] if len(items) == 1 else _Seq(tuple(items))

    def quantified(self, atom: _Node) -> _Node:
        while True:
            char = self.peek()
            if char in ("*", "+", "?"):
                self.i += 1
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
            elif char == "{" and (bounds := self.bounds()) is not None:
                low, high = bounds
            else:
                return atom
            if self.peek() == "?":
                self.i += 1                       # lazy: the same set of strings
            atom = _Repeat(atom, low, high)

    def bounds(self) -> tuple[int, int | None] | None:
        match = BOUNDS.match(self.text, self.i)
        if match is None:
            return None                           # a literal "{", as ECMAScript reads it
        self.i = match.end()
        low = int(match.group(1))
        high = low if match.group(2) is None else (int(match.group(3)) if match.group(3)
                                                   else None)
        if high is not None and high < low:
            raise self.fail(f"{{{low},{high}}} has its least above its most")
        return low, high

    def atom(self) -> _Node:
        char = self.take()
        if char == "(":
            if self.text.startswith("?:", self.i):
                self.i += 2
            elif self.text.startswith("?<", self.i) and self.text[self.i + 2:self.i + 3] \
                    not in ("=", "!"):
                end = self.text.find(">", self.i)
                if end < 0:
                    raise self.fail("a group name without its '>'")
                self.i = end + 1
            elif self.peek() == "?":
                raise self.fail("lookarounds are not supported")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("unbalanced parentheses")
            self.i += 1
            return inner
        if char == ")":
            raise self.fail("unbalanced parentheses")
        if char == "[":
            return _Set(self.char_class())
        if char == ".":
            return _Set(_intersect(_complement(LINE_ENDS), ANY))
        if char == "\\":
            return _Set(self.escape(in_class=False))
        if char in "*+?":
            raise self.fail(f"nothing to repeat with {char!r}")
        if char in "^$":
            raise self.fail("anchors are supported only at the start and end of the "
                            "pattern's alternatives")
        return _Set(_single(ord(char)))

    def escape(self, *, in_class: bool) -> Chars:
        char = self.take()
        if char.lower() in CLASS_ESCAPES:
            chars = CLASS_ESCAPES[char.lower()]
            return _complement(chars) if char.isupper() else chars
        if char in CHAR_ESCAPES:
            return _single(CHAR_ESCAPES[char])
        if char == "b" and in_class:
            return _single(0x08)
        if char in "xu":
            digits = 2 if char == "x" else 4
            hex_text = self.text[self.i:self.i + digits]
            if len(hex_text) != digits or not all(c in "0123456789abcdefABCDEF"
                                                  for c in hex_text):
                raise self.fail(f"\\{char} needs {digits} hex digits")
            self.i += digits
            return _intersect(_single(int(hex_text, 16)), ANY)
        if char.isalnum():
            raise self.fail(f"\\{char} is not supported (backreferences, word boundaries "
                            "and Unicode properties are not)")
        return _single(ord(char))                 # an escaped punctuation mark is itself

    def char_class(self) -> Chars:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        parts: list[Chars] = []
        while True:
            char = self.take()
            if char == "]":                   # even first: `[]` is empty, `[^]` anything
                break
            low = self.escape(in_class=True) if char == "\\" else _single(ord(char))
            if self.peek() == "-" and self.text[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                end = self.take()
                high = self.escape(in_class=True) if end == "\\" else _single(ord(end))
                if len(low) != 1 or len(high) != 1 or low[0][0] != low[0][1] \
                        or high[0][0] != high[0][1]:
                    raise self.fail("a range between classes")
                if high[0][0] < low[0][0]:
                    raise self.fail("a range whose end is below its start")
                parts.append(((low[0][0], high[0][0]),))
            else:
                parts.append(low)
        chars = _union(*parts)
        return _complement(chars) if negated else _intersect(chars, ANY)


# -- NFA (Thompson) and DFA -------------------------------------------------------------
@dataclass
class _NFA:
    moves: list[list[tuple[Chars, int]]] = field(default_factory=list)
    empty: list[list[int]] = field(default_factory=list)

    def state(self) -> int:
        if len(self.moves) >= MAX_NFA_STATES:
            raise ValueError(f"the pattern is too large (more than {MAX_NFA_STATES} "
                             "states: lower its repetition counts)")
        self.moves.append([])
        self.empty.append([])
        return len(self.moves) - 1

    def build(self, node: _Node, start: int) -> int:
        """Wire `node` from `start`; return the state it ends in."""
        if isinstance(node, _Set):
            end = self.state()
            self.moves[start].append((node.chars, end))
            return end
        if isinstance(node, _Seq):
            for item in node.items:
                start = self.build(item, start)
            return start
        if isinstance(node, _Alt):
            end = self.state()
            for option in node.options:
                self.empty[self.build(option, start)].append(end)
            return end
        for _ in range(node.low):
            start = self.build(node.item, start)
        if node.high is None:
            loop = self.state()
            self.empty[start].append(loop)
            self.empty[self.build(node.item, loop)].append(loop)
            return loop
        end = self.state()
        self.empty[start].append(end)
        for _ in range(node.high - node.low):
            start = self.build(node.item, start)
            self.empty[start].append(end)
        return end

    def closure(self, states: frozenset[int]) -> frozenset[int]:
        seen, stack = set(states), list(states)
        while stack:
            for nxt in self.empty[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return frozenset(seen)


@dataclass
class PatternRules:
    """GBNF rules for a pattern's string body (between the quotes): `root` is the first."""

    root: str
    rules: dict[str, str]


def pattern_rules(pattern: str, name: str, budget: Budget | None = None) -> PatternRules:
    """The rules of a deterministic grammar for the JSON text of every string `pattern`
    matches (without the surrounding quotes). A pattern that is not supported, too large, or
    that no JSON string can match raises `ValueError`, as does one that would take more
    steps than `budget` has left."""
    return _emit(*automaton(pattern, budget), name)


def automaton(pattern: str, budget: Budget | None = None
              ) -> tuple[list[list[tuple[Chars, int]]], list[bool]]:
    """The DFA of `pattern` over the characters a reply can write (minimal where that is
    cheap): each state's moves (characters, next state) and whether it accepts; state 0
    starts."""
    budget = budget or Budget()
    parser = _Parser(pattern)
    try:
        node = parser.pattern()
    except RecursionError:
        raise ValueError("the pattern nests too deeply") from None
    nfa = _NFA()
    start = nfa.state()
    try:
        accept = nfa.build(node, start)
    except RecursionError:
        raise ValueError("the pattern nests too deeply") from None
    return _minimal(*_dfa(nfa, start, accept, budget), budget)


def _dfa(nfa: _NFA, start: int, accept: int, budget: Budget
         ) -> tuple[list[list[tuple[Chars, int]]], list[bool]]:
    """Subset construction over JSON-writable characters; states that cannot reach the
    accepting one are dropped, so no reply can be led into a dead end."""
    writable = _union(RAW, tuple((c, c) for c in ESCAPES))
    first = nfa.closure(frozenset([start]))
    index = {first: 0}
    order = [first]
    moves: list[list[tuple[Chars, int]]] = []
    for subset in order:                              # grows while it is walked
        edges: dict[Chars, set[int]] = {}
        for state in subset:
            for chars, target in nfa.moves[state]:
                edges.setdefault(_intersect(chars, writable), set()).add(target)
        edges.pop((), None)
        pieces, cost = _partition(edges)
        budget.spend(len(subset) + cost)
        out: list[tuple[Chars, int]] = []
        for chars, targets in pieces:
            following = nfa.closure(targets)
            budget.spend(len(following))
            if following not in index:
                if len(order) >= MAX_DFA_STATES:
                    raise ValueError(f"the pattern needs more than {MAX_DFA_STATES} "
                                     "states as a deterministic grammar")
                index[following] = len(order)
                order.append(following)
            out.append((chars, index[following]))
        moves.append(out)
    accepting = [accept in subset for subset in order]
    return moves, accepting


def _partition(edges: dict[Chars, set[int]]) -> tuple[list[tuple[Chars, frozenset[int]]], int]:
    """Split overlapping character sets into disjoint ones, each with every target whose
    set covers it (pieces with the same targets joined); and the steps that took."""
    cuts = sorted({low for chars in edges for low, _ in chars} |
                  {high + 1 for chars in edges for _, high in chars})
    by_targets: dict[frozenset[int], list[tuple[int, int]]] = {}
    for low, nxt in itertools.pairwise(cuts):
        covering = [targets for chars, targets in edges.items() if _covers(chars, low)]
        if covering:
            by_targets.setdefault(frozenset().union(*covering), []).append((low, nxt - 1))
    pieces = [(_normal(found), targets) for targets, found in by_targets.items()]
    return pieces, len(cuts) * len(edges)


def _covers(chars: Chars, code: int) -> bool:
    at = bisect.bisect_right(chars, (code, MAX_CODEPOINT + 1)) - 1
    return at >= 0 and chars[at][0] <= code <= chars[at][1]


def _minimal(moves: list[list[tuple[Chars, int]]], accepting: list[bool], budget: Budget
             ) -> tuple[list[list[tuple[Chars, int]]], list[bool]]:
    """The same automaton with equivalent states merged (Moore's refinement): fewer rules,
    and the start stays state 0. Refinement takes a round per character of the longest
    distinguishing suffix (900 rounds for `.{0,900}`); past its share of the budget it is
    left undone and the automaton kept as it is (larger, as correct)."""
    allowed = min(MINIMIZE_STEPS, budget.left)
    steps = 0
    group = [int(ok) for ok in accepting]
    while True:
        steps += len(moves) + sum(len(out) for out in moves)
        if steps > allowed:
            budget.left -= allowed
            return moves, accepting
        signatures: dict[tuple[int, frozenset[tuple[int, Chars]]], int] = {}
        regroup = []
        for state, out in enumerate(moves):
            by_group: dict[int, Chars] = {}
            for chars, target in out:
                by_group[group[target]] = _union(by_group.get(group[target], ()), chars)
            key = (group[state], frozenset(by_group.items()))
            regroup.append(signatures.setdefault(key, len(signatures)))
        if len(signatures) == len(set(group)):
            break
        group = regroup
    budget.left -= steps
    numbers: dict[int, int] = {}                     # the start's group becomes 0
    for g in group:
        numbers.setdefault(g, len(numbers))
    merged: list[list[tuple[Chars, int]]] = [[] for _ in numbers]
    final = [False] * len(numbers)
    for state, out in enumerate(moves):
        number = numbers[group[state]]
        final[number] = accepting[state]
        if merged[number]:
            continue                                  # an equivalent state was written
        by_target: dict[int, Chars] = {}
        for chars, target in out:
            t = numbers[group[target]]
            by_target[t] = _union(by_target.get(t, ()), chars)
        merged[number] = [(chars, t) for t, chars in by_target.items()]
    return merged, final


def _emit(moves: list[list[tuple[Chars, int]]], accepting: list[bool],
          name: str) -> PatternRules:
    live = _live(moves, accepting)
    if 0 not in live:
        raise ValueError("no JSON string can match the pattern (an empty class, or only "
                         "control characters JSON has no short escape for)")
    names = {state: f"{name}-{k}" for k, state in enumerate(sorted(live))}
    rules: dict[str, str] = {}
    for state in sorted(live):
        options = [f"{_gbnf(chars)} {names[target]}" for chars, target in moves[state]
                   if target in live]
        if accepting[state]:
            options.append('""')
        rules[names[state]] = " | ".join(options)
    return PatternRules(names[0], rules)


def _live(moves: list[list[tuple[Chars, int]]], accepting: list[bool]) -> set[int]:
    """The states from which the accepting ones can be reached."""
    live = {state for state, ok in enumerate(accepting) if ok}
    changed = True
    while changed:
        changed = False
        for state, out in enumerate(moves):
            if state not in live and any(target in live for _, target in out):
                live.add(state)
                changed = True
    return live


def _gbnf(chars: Chars) -> str:
    """One transition's characters in GBNF: a class for those written raw, and the JSON
    escape of each of the others."""
    raw = _intersect(chars, RAW)
    options = [f"[{''.join(_range(low, high) for low, high in raw)}]"] if raw else []
    options += [_literal(ESCAPES[code]) for code in sorted(ESCAPES)
                if _intersect(chars, _single(code))]
    return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"


def _range(low: int, high: int) -> str:
    return _class_char(low) if low == high else f"{_class_char(low)}-{_class_char(high)}"


def _class_char(code: int) -> str:
    if chr(code).isascii() and chr(code).isalnum():
        return chr(code)
    return f"\\x{code:02X}" if code < 0x100 else (f"\\u{code:04X}" if code < 0x10000
                                                  else f"\\U{code:08X}")


def _literal(text: str) -> str:
    """A GBNF literal of `text` (JSON escape characters: backslashes and quotes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
