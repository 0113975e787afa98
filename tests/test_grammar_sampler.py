"""The sampler with a grammar (llguidance's) on the real model: what a JSON string may hold,
and a grammar that allows nothing more ends the request, not the process; and greedy
without a grammar reads the argmax itself. (The fast path against the whole mask, step by
step: tests/test_grammar_llguidance.py.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

# The model tier throughout: where llama_cpp is blocked (the fast tier) the module is skipped.
llama_cpp = pytest.importorskip("llama_cpp")

import numpy as np  # noqa: E402
from llama_cpp import _internals  # noqa: E402

from chatstream_lite.engine import SamplingParams  # noqa: E402
from chatstream_lite.engine.llama.grammar import json_grammar  # noqa: E402
from chatstream_lite.engine.llama.guidance import Guide  # noqa: E402
from chatstream_lite.engine.llama.model import Model  # noqa: E402
from chatstream_lite.engine.llama.sampler import SamplerChain  # noqa: E402
from chatstream_lite.errors import SchemaUnsatisfiable  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PROMPT = ("<|im_start|>user\nDescribe a person as JSON with a name and an age."
          "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def model(model_path: str) -> Iterator[Model]:
    # This test's thread owns the model, as the engine thread does in the server.
    loaded = Model.load(model_path, n_ctx=512, n_batch=256, n_seq=1, n_gpu_layers=0,
                        n_threads=len(os.sched_getaffinity(0)), verbose=False)
    yield loaded
    loaded.close()


def _guide(model: Model, schema: dict[str, object]) -> Guide:
    return Guide(json_grammar(json.dumps(schema)), model.guidance_vocab())


def _token(model: Model, text: str) -> int:
    found, = model.vocabulary.tokenize(text, special=False)
    return found


def test_schema_strings_refuse_raw_control_characters(model: Model) -> None:
    # Strict JSON parsers refuse a raw newline inside a string; the grammar must too.
    guide = _guide(model, {"type": "object", "required": ["a"],
                           "properties": {"a": {"type": "string"}}})
    for token in model.vocabulary.tokenize('{"a": "x', special=False):
        assert guide.allows(token)
        guide.accept(token)
    assert guide.allows(_token(model, "y"))
    assert not guide.allows(_token(model, "\n")) and not guide.allows(_token(model, "\t"))
    allowed = guide.allowed()              # the whole mask agrees with the one-token check
    assert allowed[_token(model, "y")] and not allowed[_token(model, "\n")]


@pytest.mark.parametrize("pattern", ["^.{3}$", "^[^,]{3}$", "^(x|.){3}$"])
def test_a_pattern_writes_quotes_and_backslashes_only_as_json_escapes(
        model: Model, pattern: str) -> None:
    # A pattern is held inside the JSON string: `.` or `[^,]` must not let a raw `"` end the
    # string early (the reply would no longer parse) nor a raw control character in. After
    # `"a` the string needs two more characters, so a quote there could only be one of
    # them: it must come as `\"`.
    guide = _guide(model, {"type": "string", "pattern": pattern})
    for piece in model.vocabulary.tokenize('"a', special=False):
        assert guide.allows(piece)
        guide.accept(piece)
    for char in ('"', "\n", "\x01"):
        assert not guide.allows(_token(model, char)), repr(char)
    assert guide.allows(_token(model, "y"))
    backslash = _token(model, "\\")
    assert guide.allows(backslash)                 # the start of an escape, and only that
    guide.accept(backslash)
    assert guide.allows(_token(model, '"')) and not guide.allows(_token(model, "q"))


def test_a_grammar_that_allows_nothing_more_ends_the_request_not_the_process(
        model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    # llguidance compiles away the dead ends this project once met (`^[z-a]$` made llama.cpp's
    # grammar throw inside `accept` and abort the process), so the state is made by hand:
    # after the first token the grammar allows nothing, not even the end. The sampler must
    # not accept a token the grammar refused, and must say why.
    chain = SamplerChain(SamplingParams(temperature=0.0, grammar=json_grammar(None)),
                         model.n_vocab, model.guidance_vocab)
    guide = chain._guide
    assert guide is not None
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
        monkeypatch.setattr(guide, "allows", lambda token: False)
        monkeypatch.setattr(guide, "allowed", lambda: np.zeros(model.n_vocab, dtype=bool))
        with pytest.raises(SchemaUnsatisfiable):
            chain.sample(model.context, row)
    finally:
        chain.close()


def test_the_greedy_argmax_picks_what_llamas_greedy_sampler_picks(model: Model) -> None:
    """Greedy with no penalty, bias or grammar reads the argmax of the logits itself; at
    every step it must be llama.cpp's own greedy pick from the same logits."""
    params = SamplingParams(temperature=0.0, repeat_penalty=1.0)
    fast = SamplerChain(params, model.n_vocab)
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
        chain = SamplerChain(other, model.n_vocab)
        assert not chain._argmax
        chain.close()
