"""The grammar's fast path picks what the grammar applied to every token would pick.

`SamplerChain` checks only the chain's pick against the grammar and applies the grammar to
the whole vocabulary only when that pick is refused (as llama.cpp's common sampler does).
Here both ways sample from the same logits, step by step, on the real model: greedy, the
tokens must be the same at every step, and the reply must be the JSON the grammar allows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

# The model tier throughout: where llama_cpp is blocked (the fast tier) the module is skipped.
llama_cpp = pytest.importorskip("llama_cpp")

from llama_cpp import _internals  # noqa: E402

from chatstream_lite.engine import SamplingParams  # noqa: E402
from chatstream_lite.engine.llama.grammar import json_grammar  # noqa: E402
from chatstream_lite.engine.llama.model import Model  # noqa: E402
from chatstream_lite.engine.llama.sampler import SamplerChain  # noqa: E402
from chatstream_lite.errors import SchemaUnsatisfiable  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer"}}}
PROMPT = ("<|im_start|>user\nDescribe a person as JSON with a name and an age."
          "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(autouse=True)
def llama_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's grammar path (llguidance's: tests/test_grammar_llguidance.py)."""
    from chatstream_lite.engine.llama import grammar

    monkeypatch.setattr(grammar, "ENGINE", "llama")


@pytest.fixture(scope="module")
def model(model_path: str) -> Iterator[Model]:
    # This test's thread owns the model, as the engine thread does in the server.
    loaded = Model.load(model_path, n_ctx=512, n_batch=256, n_seq=1, n_gpu_layers=0,
                        n_threads=len(os.sched_getaffinity(0)), verbose=False)
    yield loaded
    loaded.close()


def reference_chain(model: Model, grammar: str) -> _internals.LlamaSampler:
    """The slow way: the grammar first in the chain, applied to every candidate."""
    chain = _internals.LlamaSampler()
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    assert sampler
    llama_cpp.llama_sampler_chain_add(chain.sampler, sampler)
    chain.add_greedy()
    return chain


def test_the_fast_path_picks_what_the_whole_grammar_picks(model: Model) -> None:
    grammar = json_grammar(json.dumps(SCHEMA))
    fast = SamplerChain(SamplingParams(temperature=0.0, repeat_penalty=1.0, grammar=grammar),
                        model.n_vocab, model.vocab)
    slow = reference_chain(model, grammar)
    prompt = model.vocabulary.tokenize(PROMPT, special=True)
    model.forget(0)
    model.batch.clear()
    for pos, token in enumerate(prompt):
        model.batch.add(token, pos, 0, pos == len(prompt) - 1)
    assert model.decode() == 0
    row, reply, steps = model.batch.size - 1, b"", 0
    try:
        for pos in range(len(prompt), len(prompt) + 60):
            steps += 1
            expected = slow.sample(model.context, row)   # reads the logits, keeps them
            token = fast.sample(model.context, row)
            assert token == expected, f"step {pos - len(prompt)}: {token} != {expected}"
            if model.is_end_of_generation(token):
                break
            reply += model.piece(token)
            model.batch.clear()
            row = model.batch.add(token, pos, 0, True)
            assert model.decode() == 0
        else:
            pytest.fail(f"no end of generation in 60 tokens: {reply!r}")
    finally:
        fast.close()
        slow.close()
    value = json.loads(reply)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    # The point of the fast path: most picks pass the one-token check; only refusals pay
    # for the whole vocabulary.
    assert fast.refusals < steps / 2, (fast.refusals, steps)


def test_schema_strings_refuse_raw_control_characters(model: Model) -> None:
    # Strict JSON parsers refuse a raw newline inside a string; the grammar must too.
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}}
    chain = SamplerChain(SamplingParams(temperature=0.0, grammar=json_grammar(json.dumps(schema))),
                         model.n_vocab, model.vocab)
    try:
        grammar = chain._grammar
        assert grammar is not None
        for token in model.vocabulary.tokenize('{"a": "x', special=False):
            assert chain._allows(token)
            llama_cpp.llama_sampler_accept(grammar, token)
        newline, = model.vocabulary.tokenize("\n", special=False)
        tab, = model.vocabulary.tokenize("\t", special=False)
        letter, = model.vocabulary.tokenize("y", special=False)
        assert chain._allows(letter)
        assert not chain._allows(newline) and not chain._allows(tab)
    finally:
        chain.close()


@pytest.mark.parametrize("pattern", ["^.{3}$", "^[^,]{3}$", "^(x|.){3}$"])
def test_a_pattern_writes_quotes_and_backslashes_only_as_json_escapes(
        model: Model, pattern: str) -> None:
    # A pattern is held inside the JSON string: `.` or `[^,]` let the converter's grammar
    # write a raw `"` there (the string ends early: the reply no longer parses) or a raw
    # control character. After `"a` the string needs two more characters, so a quote there
    # could only be one of them: it must come as `\"`.
    schema = {"type": "string", "pattern": pattern}
    chain = SamplerChain(SamplingParams(temperature=0.0, grammar=json_grammar(json.dumps(schema))),
                         model.n_vocab, model.vocab)

    def token(text: str) -> int:
        found, = model.vocabulary.tokenize(text, special=False)
        return found

    try:
        grammar = chain._grammar
        assert grammar is not None
        for piece in model.vocabulary.tokenize('"a', special=False):
            assert chain._allows(piece)
            llama_cpp.llama_sampler_accept(grammar, piece)
        for char in ('"', "\n", "\x01"):
            assert not chain._allows(token(char)), repr(char)
        assert chain._allows(token("y"))
        backslash = token("\\")
        assert chain._allows(backslash)            # the start of an escape, and only that
        llama_cpp.llama_sampler_accept(grammar, backslash)
        assert chain._allows(token('"')) and not chain._allows(token("q"))
    finally:
        chain.close()


def test_a_grammar_that_allows_nothing_more_ends_the_request_not_the_process(
        model: Model) -> None:
    # No schema the converter takes should lead here (patterns are made deterministic with
    # their dead states dropped), but a grammar that reaches a point where no token is
    # allowed made llama.cpp throw inside `accept`, through C: the process aborted (seen with
    # a pattern `^[z-a]$`, before). The sampler must refuse to accept a token the grammar
    # refused, and say so.
    chain = SamplerChain(SamplingParams(temperature=0.0, grammar='root ::= "{" [z-a]'),
                         model.n_vocab, model.vocab)
    prompt = model.vocabulary.tokenize(PROMPT, special=True)
    model.forget(0)
    model.batch.clear()
    for pos, token in enumerate(prompt):
        model.batch.add(token, pos, 0, pos == len(prompt) - 1)
    assert model.decode() == 0
    try:
        brace = chain.sample(model.context, model.batch.size - 1)
        assert model.piece(brace) == b"{"
        model.batch.clear()
        row = model.batch.add(brace, len(prompt), 0, True)
        assert model.decode() == 0
        with pytest.raises(SchemaUnsatisfiable):
            chain.sample(model.context, row)
    finally:
        chain.close()


SHAPES = {
    "string maxLength": lambda n: {"type": "string", "maxLength": n},
    "array maxItems": lambda n: {"type": "array", "items": {"type": "integer"}, "maxItems": n},
    "objects in an array": lambda n: {"type": "array", "maxItems": n, "items": {
        "type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}}},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_grammar_the_converter_accepts_llama_cpp_parses(model: Model, shape: str) -> None:
    # A grammar the request's parsing accepted but llama.cpp refuses would fail on the engine
    # thread instead of as the request's 400 (and llama.cpp prints the whole grammar to
    # stderr). Find the largest count the converter takes; llama.cpp must take it too.
    def accepted(n: int) -> str | None:
        try:
            return json_grammar(json.dumps(SHAPES[shape](n)))
        except ValueError:
            return None

    low, high = 1, 4096
    assert accepted(low) is not None and accepted(high) is None
    while low + 1 < high:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) is not None else (low, middle)
    grammar = accepted(low)
    assert grammar is not None
    chain = SamplerChain(SamplingParams(temperature=0.0, grammar=grammar), model.n_vocab,
                         model.vocab)       # raises ValueError when llama.cpp refuses it
    chain.close()


def test_the_greedy_argmax_picks_what_llamas_greedy_sampler_picks(model: Model) -> None:
    """Greedy with no penalty, bias or grammar reads the argmax of the logits itself; at
    every step it must be llama.cpp's own greedy pick from the same logits."""
    params = SamplingParams(temperature=0.0, repeat_penalty=1.0)
    fast = SamplerChain(params, model.n_vocab, model.vocab)
    assert fast._argmax
    slow = _internals.LlamaSampler()
    slow.add_greedy()
    prompt = model.vocabulary.tokenize(PROMPT, special=True)
    model.forget(0)
    model.batch.clear()
    for pos, token in enumerate(prompt):
        model.batch.add(token, pos, 0, pos == len(prompt) - 1)
    assert model.decode() == 0
    row, picks = model.batch.size - 1, []
    try:
        for pos in range(len(prompt), len(prompt) + 40):
            expected = slow.sample(model.context, row)
            token = fast.sample(model.context, row)
            assert token == expected, f"step {pos - len(prompt)}: {token} != {expected}"
            picks.append(token)
            if model.is_end_of_generation(token):
                break
            model.batch.clear()
            row = model.batch.add(token, pos, 0, True)
            assert model.decode() == 0
    finally:
        fast.close()
        slow.close()
    assert len(picks) > 10
    # A penalty, a bias or a temperature keeps llama.cpp's chain.
    for other in (SamplingParams(temperature=0.0, repeat_penalty=1.1),
                  SamplingParams(temperature=0.0, repeat_penalty=1.0, logit_bias=((5, 1.0),)),
                  SamplingParams(temperature=0.7, repeat_penalty=1.0)):
        chain = SamplerChain(other, model.n_vocab, model.vocab)
        assert not chain._argmax
        chain.close()
