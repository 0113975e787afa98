"""Constrained decoding on llguidance: grammars compiled under work bounds, off the engine
thread, and one matcher per sequence.

    >>> grammar = schema_grammar('{"type": "object"}')     # llguidance's grammar text
    >>> grammar = lark_grammar('start: "yes" | "no"')      # or GBNF: gbnf_grammar(text)
    >>> vocab = vocabulary(model_path)                      # kept for the process
    >>> guide = Guide(grammar, vocab)                       # engine thread: this sequence's

A grammar here is llguidance's own serialized form (JSON text: `{"grammars": [...]}`), what
`SamplingParams.grammar` carries. Making one checks it: a grammar llguidance cannot serve,
or one past `LIMITS`, or one whose compilation outlasts `COMPILE_DEADLINE`, raises
`ValueError` (the request's 400). The check builds the matcher itself when the model's
vocabulary is known, and keeps it (`RECENT_GRAMMARS` of them): the engine thread then only
copies it, never compiles. llguidance serves any context-free grammar (an Earley parser:
left recursion and ambiguity are fine) and bounds each step's work by `LIMITS`, so no
grammar can stall the engine; what a grammar costs is paid at compile time, here.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from llguidance.gbnf_to_lark import gbnf_to_lark
from llguidance.llamacpp import lltokenizer_from_vocab
from numpy.typing import NDArray

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = ["ANY_OBJECT", "COMPILE_DEADLINE", "JSON_OPTIONS", "LIMITS", "MAX_GRAMMAR_CHARS",
           "MAX_INTEGER", "RECENT_GRAMMARS", "Guide", "Vocab", "gbnf_grammar", "lark_grammar",
           "new_matcher", "schema_grammar", "vocabulary"]

# llguidance's own defaults, except the grammar size (a 256 KiB request body could otherwise
# ask for 500,000 symbols) and the error texts, which would echo grammar internals back.
LIMITS = LLParserLimits(max_grammar_size=200_000, verbose_errors=False)
# Compiling a grammar (and building its lexer against 49,152 tokens) drops the GIL and is
# bounded by LIMITS' fuel, but a huge alternation still takes seconds (40,000 alternatives:
# 3.4 s). A request worker waits this long, then refuses the grammar as too costly.
COMPILE_DEADLINE = 2.0
MAX_GRAMMAR_CHARS = 256 * 1024       # grammar text (GBNF, Lark) a request may send
RECENT_GRAMMARS = 64                 # compiled grammars (and refusals) remembered
ANY_OBJECT = '{"type": "object"}'
MAX_INTEGER = 10**16 - 1             # an integer without bounds: 16 digits, as llama.cpp's
# JSON as the replies of llama.cpp's converter look (", " and ": "), with no free white space
# between tokens: a small model left free to write white space can write only that, forever.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ",
                                    "key_separator": ": "}

_compiler = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")
# (kind, text) -> (grammar, its matcher if compiled with a vocabulary), or why not
_recent: OrderedDict[str, tuple[str, LLMatcher | None, Vocab | None] | str] = OrderedDict()
_matchers: OrderedDict[tuple[str, str], LLMatcher] = OrderedDict()   # (file, grammar) ->
_lock = threading.Lock()
_building = threading.Lock()
_vocabularies: dict[str, Vocab] = {}         # by the GGUF file's path, for the process
_current: Vocab | None = None                # the last model's, for compiling ahead


class Vocab:
    """A GGUF file's vocabulary as llguidance sees it, loaded on its own (llama.cpp's
    `vocab_only`) and kept for the life of the process.

    llguidance's tokenizer calls llama.cpp's tokenizer through the vocabulary's address,
    and every compiled matcher (kept, copied, built in a compile thread) holds that
    tokenizer. Built on the engine's model, they outlived it: a server closes its model,
    tests load and close one per module, and a matcher kept across that computed its next
    mask through a freed vocabulary (SIGSEGV in `unsafe_compute_mask_ptr`, in CI). A
    vocabulary of its own, never freed, has no such end: a few MB per model file."""

    def __init__(self, path: str) -> None:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(path.encode("utf-8"), params)
        if not model:
            raise ValueError(f"llama.cpp could not read the vocabulary of {path}")
        self.path = path
        self._model = model                       # never freed: see the class's comment
        self.vocab: llama_cpp.llama_vocab_p = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        with warnings.catch_warnings():     # llguidance reads token attributes the old way
            warnings.simplefilter("ignore", DeprecationWarning)
            self.tokenizer: LLTokenizer = lltokenizer_from_vocab(self.vocab)
        # The end-of-generation tokens (found once: 49,152 calls).
        self.ends: NDArray[np.intc] = np.array(
            [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)],
            dtype=np.intc)

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))


def vocabulary(path: str | os.PathLike[str]) -> Vocab:
    """The kept vocabulary of the GGUF file at `path` (built once per file: 0.4 s for 49,152
    tokens); grammars are compiled ahead against the last one asked for, in the request
    workers. Raises ValueError where llama.cpp cannot read the file."""
    global _current
    key = os.fspath(path)
    with _building:                         # one build per file, however many ask at once
        known = _vocabularies.get(key)
        if known is None:
            known = _vocabularies[key] = Vocab(key)
    _current = known
    return known


def schema_grammar(schema: str | None) -> str:
    """The grammar of the JSON text `schema` (a JSON Schema, as text) allows; any JSON object
    when None. Raises ValueError for a schema llguidance cannot hold."""
    text = schema if schema is not None else ANY_OBJECT
    return _compiled("json_schema", text, lambda: _from_schema(text))


def lark_grammar(text: str) -> str:
    """The grammar of a Lark text (llguidance's dialect). Raises ValueError."""
    _check_size(text)
    return _compiled("lark", text, lambda: LLMatcher.grammar_from_lark(text))


def gbnf_grammar(text: str) -> str:
    """The grammar of a GBNF text (llama.cpp's), converted to Lark. Raises ValueError."""
    _check_size(text)
    return _compiled("gbnf", text, lambda: LLMatcher.grammar_from_lark(_gbnf_to_lark(text)))


def _check_size(text: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"the grammar is over {MAX_GRAMMAR_CHARS} characters")


def _from_schema(text: str) -> str:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("the schema is not JSON") from None
    if not isinstance(value, (dict, bool)):
        raise ValueError("a JSON Schema is an object (or true/false)")
    _bound_integers(value)
    _check_patterns(value)
    try:
        grammar: str = LLMatcher.grammar_from_json_schema(json.dumps(value),
                                                          defaults=JSON_OPTIONS)
    except (ValueError, RecursionError) as error:
        raise ValueError(str(error) or "the schema cannot be compiled") from None
    return grammar


# Keywords whose values are data, not schemas: a "type" or "pattern" inside them is data.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def _objects(schema: object) -> Iterator[dict[str, Any]]:
    """Every JSON object in a schema, the values of data keywords left out; no recursion,
    so any nesting is fine here."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            stack.extend(value for key, value in node.items() if key not in _DATA_KEYWORDS)


def _bound_integers(schema: object) -> None:
    """Give every integer without bounds llama.cpp's converter's: at most 16 digits. Left
    unbounded, a small model can write digits until max_tokens (SmolLM2 did, describing
    Paris's population); the replies that remain still validate."""
    for node in _objects(schema):
        kind = node.get("type")
        if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
            if not {"maximum", "exclusiveMaximum"} & node.keys():
                node["maximum"] = MAX_INTEGER
            if not {"minimum", "exclusiveMinimum"} & node.keys():
                node["minimum"] = -MAX_INTEGER


def _check_patterns(schema: object) -> None:
    """Refuse a regex llguidance cannot read (a backreference, a lookaround) wherever it
    sits: llguidance compiles a branch only when a reply reaches it, so one in a branch no
    reply can take (an array with minItems 1 and maxItems 0) was served, and the same regex
    elsewhere refused. Each distinct regex is checked once (~0.04 ms)."""
    seen: set[str] = set()
    for node in _objects(schema):
        regexes = [node.get("pattern")]
        if isinstance(node.get("patternProperties"), dict):
            regexes.extend(node["patternProperties"])
        for regex in regexes:
            if isinstance(regex, str) and regex not in seen:
                seen.add(regex)
                refusal = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(
                    json.dumps({"type": "string", "pattern": regex})), None)
                if refusal:
                    raise ValueError(f"the pattern {regex[:80]!r} cannot be held: "
                                     f"{refusal.strip().splitlines()[-1]}")


def _gbnf_to_lark(text: str) -> str:
    try:
        lark: str = gbnf_to_lark(text)
    except RecursionError:            # the converter recurses once per nesting level
        raise ValueError("the grammar nests too deeply") from None
    except Exception as error:  # noqa: BLE001 - the converter's ways of saying "cannot"
        raise ValueError(f"the grammar does not parse: {error}") from None
    return lark


def _compiled(kind: str, text: str, make: Callable[[], str]) -> str:
    """The grammar `make` makes of `text`, once llguidance has compiled it within LIMITS,
    all in a compile thread within COMPILE_DEADLINE; the last ones (refusals too) are
    remembered, and so is the compiled matcher, for the engine thread. Raises ValueError."""
    key = f"{kind}\n{text}"
    with _lock:
        known = _recent.get(key)
        if known is not None:
            _recent.move_to_end(key)
    if known is None:
        future = _compiler.submit(_make_and_compile, make, _current)
        try:
            known = future.result(timeout=COMPILE_DEADLINE)
        except FutureTimeout:
            known = (f"the grammar takes over {COMPILE_DEADLINE:g} s to compile (too many "
                     "alternatives or too large a schema)")
        with _lock:
            _recent[key] = known
            while len(_recent) > RECENT_GRAMMARS:
                _recent.popitem(last=False)
    if isinstance(known, str):
        raise ValueError(known)
    grammar, matcher, vocab = known
    if matcher is not None and vocab is not None:
        _keep(vocab, grammar, matcher)
    return grammar


def _make_and_compile(make: Callable[[], str], vocab: Vocab | None
                      ) -> tuple[str, LLMatcher | None, Vocab | None] | str:
    """(the grammar, its matcher, the vocabulary it is for) or the error text; with no
    vocabulary yet, the grammar is only checked (the engine thread builds its first matcher
    itself)."""
    try:
        grammar = make()
        if not grammar.startswith("{"):   # Lark text: in the JSON form, told from GBNF by it
            grammar = json.dumps({"grammars": [{"lark_grammar": grammar}]})
        grammar.encode("utf-8")
    except UnicodeEncodeError:                  # a lone surrogate in a literal
        return "the grammar holds text that is not valid Unicode"
    except ValueError as error:
        return str(error)
    if vocab is None:
        refusal = LLMatcher.validate_grammar(grammar, None, limits=LIMITS)
        return refusal if refusal else (grammar, None, None)
    matcher = LLMatcher(vocab.tokenizer, grammar, log_level=0, limits=LIMITS)
    if matcher.is_error():
        return matcher.get_error() or "the grammar cannot be compiled"
    return grammar, matcher, vocab


def _keep(vocab: Vocab, grammar: str, matcher: LLMatcher) -> None:
    """Keep `grammar`'s compiled matcher for `vocab` (never consumed: sequences take
    copies). Keyed by the file too: a matcher's masks are as wide as its vocabulary."""
    key = (vocab.path, grammar)
    with _lock:
        _matchers[key] = matcher
        _matchers.move_to_end(key)
        while len(_matchers) > RECENT_GRAMMARS:
            _matchers.popitem(last=False)


def new_matcher(grammar: str, vocab: Vocab) -> LLMatcher:
    """A fresh matcher of `grammar` for one sequence: a copy of the compiled one (cheap), or
    compiled here when none is kept. Raises ValueError for a grammar in error."""
    with _lock:
        known = _matchers.get((vocab.path, grammar))
    if known is not None:
        return known.deep_copy()
    matcher = LLMatcher(vocab.tokenizer, grammar, log_level=0, limits=LIMITS)
    if matcher.is_error():
        raise ValueError(matcher.get_error() or "the grammar cannot be compiled")
    _keep(vocab, grammar, matcher.deep_copy())
    return matcher


class Guide:
    """One sequence's grammar on llguidance, as the sampler uses a grammar: check one token
    (microseconds), and on a refusal restrict the whole vocabulary (a token mask)."""

    def __init__(self, grammar: str, vocab: Vocab) -> None:
        self._matcher = new_matcher(grammar, vocab)
        self._vocab = vocab
        self._mask: NDArray[np.int32] = np.zeros((vocab.n_vocab + 31) // 32, dtype=np.int32)

    def allows(self, token: int) -> bool:
        """Whether `token` may come next; an end-of-generation token ends the reply, which
        the grammar allows only where it is complete."""
        if self._vocab.is_end(token):
            return bool(self._matcher.is_accepting())
        return bool(self._matcher.validate_tokens([token]) == 1)

    def allowed(self) -> NDArray[np.bool_]:
        """Which tokens may come next (a bool per token)."""
        mask = self._mask
        # Exactly the matcher's width: its vocabulary is the one the mask was sized by.
        self._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:self._vocab.n_vocab]
        allowed = bits.astype(bool)
        allowed[self._vocab.ends] = bool(self._matcher.is_accepting())
        return allowed

    def accept(self, token: int) -> None:
        if self._vocab.is_end(token):
            return                                  # the reply ends here
        if not self._matcher.consume_token(token):
            raise ValueError(self._matcher.get_error() or "the grammar refused a token")
