"""Grammars on llguidance (engine/llama/guidance.py): the sampler's fast path picks what the
whole token mask would pick, and hostile grammar text is refused quickly or served within
bounds, never a stall.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

# The model tier throughout: where llama_cpp is blocked (the fast tier) the module is skipped.
llama_cpp = pytest.importorskip("llama_cpp")

from chatstream_lite.engine import SamplingParams  # noqa: E402
from chatstream_lite.engine.llama import guidance  # noqa: E402
from chatstream_lite.engine.llama.model import Model  # noqa: E402
from chatstream_lite.engine.llama.sampler import SamplerChain  # noqa: E402
from chatstream_lite.server.openai.tool_formats import (  # noqa: E402
    HermesFormat,
    Tool,
    ToolRequest,
)

pytestmark = pytest.mark.timeout(120)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer"}}}
ZONE = {"type": "object", "additionalProperties": False, "required": ["timezone"],
        "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET", "JST"]}}}
PROMPT = ("<|im_start|>user\nDescribe a person as JSON with a name and an age."
          "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def model(model_path: str) -> Iterator[Model]:
    # This test's thread owns the model, as the engine thread does in the server.
    loaded = Model.load(model_path, n_ctx=512, n_batch=256, n_seq=1, n_gpu_layers=0,
                        n_threads=len(os.sched_getaffinity(0)), verbose=False)
    guidance.vocabulary(model_path)        # as the first grammar request does
    yield loaded
    loaded.close()


class _Lark:
    """The Lark maker tool formats use (engine/llama/grammar.py `Grammars`, llguidance)."""

    language = "llguidance"

    def __call__(self, schema: str | None) -> str:
        return guidance.schema_grammar(schema)

    def lark(self, text: str) -> str:
        return guidance.lark_grammar(text)


def _masked_argmax(model: Model, guide: guidance.Guide, row: int) -> int:
    """The slow way: every token the grammar refuses masked out, then the best."""
    logits = llama_cpp.llama_get_logits_ith(model.context.ctx, row)
    import numpy as np

    values = np.ctypeslib.as_array(logits, shape=(model.n_vocab,)).copy()
    values[~guide.allowed()] = -np.inf
    return int(values.argmax())


@pytest.mark.parametrize("kind", ["schema", "hermes auto"])
def test_the_fast_path_picks_what_the_whole_mask_picks(model: Model, kind: str) -> None:
    if kind == "schema":
        grammar, prompt = guidance.schema_grammar(json.dumps(SCHEMA)), PROMPT
    else:
        asked = ToolRequest((Tool("get_time", ZONE),))
        made = HermesFormat().grammar(asked, _Lark())
        assert made is not None
        grammar = made
        prompt = PROMPT.replace("Describe a person as JSON with a name and an age.",
                                "Write <tool_call> and then the time in Paris as JSON.")
    fast = SamplerChain(SamplingParams(temperature=0.0, repeat_penalty=1.0, grammar=grammar),
                        model.n_vocab, model.guidance_vocab)
    slow = guidance.Guide(grammar, model.guidance_vocab())
    tokens = model.vocabulary.tokenize(prompt, special=True)
    model.forget(0)
    model.batch.clear()
    for pos, token in enumerate(tokens):
        model.batch.add(token, pos, 0, pos == len(tokens) - 1)
    assert model.decode() == 0
    row, reply, steps = model.batch.size - 1, b"", 0
    try:
        for pos in range(len(tokens), len(tokens) + 60):
            steps += 1
            expected = _masked_argmax(model, slow, row)
            token = fast.sample(model.context, row)
            assert token == expected, f"step {pos - len(tokens)}: {token} != {expected}"
            if model.is_end_of_generation(token):
                break
            slow.accept(token)
            reply += model.piece(token)
            model.batch.clear()
            row = model.batch.add(token, pos, 0, True)
            assert model.decode() == 0
    finally:
        fast.close()
    if kind == "schema":
        value = json.loads(reply)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int)
        assert fast.refusals < steps / 2, (fast.refusals, steps)


def test_the_lazy_hermes_grammar_leaves_text_free_and_holds_a_call(model: Model) -> None:
    asked = ToolRequest((Tool("get_time", ZONE),))
    grammar = HermesFormat().grammar(asked, _Lark())
    assert grammar is not None

    def allows(text: str) -> bool:
        guide = guidance.Guide(grammar, model.guidance_vocab())
        for token in model.vocabulary.tokenize(text, special=False):
            if not guide.allows(token):
                return False
            guide.accept(token)
        return True

    assert allows("It is noon in Paris, I think. <tool ca")       # text, even like a marker
    assert allows('Let me look.<tool_call>\n{"name": "get_time", "arguments": {"timez')
    assert not allows('<tool_call>\n{"name": "get_weather"')      # not an offered tool
    assert not allows('<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Paris')


@pytest.mark.parametrize(("text", "message"), [
    ("root ::= undefined-rule", "not found"),
    ('root ::= "a', "does not parse"),
    ("root ::= " + "(" * 5000 + '"a"' + ")" * 5000, "nests too deeply"),
    ("root ::= " + "x" * (guidance.MAX_GRAMMAR_CHARS + 1), "over"),
])
def test_hostile_gbnf_is_refused_at_once(model: Model, text: str, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match=message):
        guidance.gbnf_grammar(text)
    assert time.monotonic() - start < 1.0


def test_left_recursion_is_served_and_a_huge_alternation_is_bounded(model: Model) -> None:
    # llama.cpp's own GBNF engine refuses left recursion; llguidance's Earley parser serves it.
    grammar = guidance.gbnf_grammar('root ::= "a" | root "b"')
    guide = guidance.Guide(grammar, model.guidance_vocab())
    for token in model.vocabulary.tokenize("abbb", special=False):
        assert guide.allows(token)
        guide.accept(token)
    # 20,000 alternatives (near the size bound): served, or refused once compiling passes the
    # deadline; either way the request's worker is back within the deadline.
    huge = "root ::= " + " | ".join(f'"w{i}"' for i in range(20_000))
    start = time.monotonic()
    try:
        guidance.gbnf_grammar(huge)
    except ValueError as error:
        assert "to compile" in str(error) or "too" in str(error), error
    assert time.monotonic() - start < guidance.COMPILE_DEADLINE + 3.0


# One process, as the suite and a server that reloads are: a model loads, a grammar is
# compiled and kept, the model closes, another loads, a grammar is compiled ahead (before
# the new model has asked for its vocabulary) and both are served. Run in a child so that a
# crash is this test's failure, not the suite's end.
ACROSS_MODELS = """
import json, sys
from chatstream_lite.engine.llama import guidance
from chatstream_lite.engine.llama.model import Model

def load():
    return Model.load(sys.argv[1], n_ctx=256, n_batch=64, n_seq=1, n_gpu_layers=0,
                      n_threads=1, verbose=False)

first = load()
kept = guidance.schema_grammar(json.dumps({"type": "object"}))
guidance.Guide(kept, first.guidance_vocab()).allowed()
kept = guidance.schema_grammar(json.dumps({"type": "object"}))   # compiled, kept
first.close()
litter = [bytearray(4096) for _ in range(20_000)]   # the freed memory, written over
second = load()
ahead = guidance.schema_grammar(json.dumps({"properties": {"b": {"type": "integer"}}}))
for grammar in (kept, ahead):
    guide = guidance.Guide(grammar, second.guidance_vocab())
    for token in second.vocabulary.tokenize('{"b": 12', special=False):
        assert guide.allowed()[token] and guide.allows(token)
        guide.accept(token)
second.close()
print("served")
"""


def test_grammars_kept_across_a_models_close_are_served_by_the_next(model_path: str) -> None:
    # CI died here (exit 139: SIGSEGV in unsafe_compute_mask_ptr, in test_fuzz): llguidance's
    # tokenizer was built on the engine's model, and matchers kept (and compiled ahead) with
    # it called llama.cpp's tokenizer through a vocabulary an earlier module had freed.
    # Before the fix this child died with SIGSEGV (-11).
    child = subprocess.run([sys.executable, "-c", ACROSS_MODELS, model_path],
                           capture_output=True, text=True, timeout=100)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert child.stdout.strip().endswith("served")


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 10**12},
    {"type": "string", "minLength": 10**12},
    {"type": "array", "items": {"type": "integer"}, "minItems": 10**12},
    {"type": "object", "properties": {"a": {"type": "array", "maxItems": 1e300}}},
    {"type": "string", "minLength": -5},
    {"type": "string", "pattern": "^(.?){5000}$"},
])
def test_a_huge_count_compiles_or_is_refused_at_once(model: Model, schema: object) -> None:
    # llama.cpp's converter wrote one rule per repetition (10^12 nested rules: hours and
    # terabytes) and had to be bounded by hand; llguidance holds a count as a number.
    start = time.monotonic()
    try:
        guide = guidance.Guide(guidance.schema_grammar(json.dumps(schema)),
                               model.guidance_vocab())
        assert guide.allowed().any()
    except ValueError as error:
        assert str(error)
    assert time.monotonic() - start < guidance.COMPILE_DEADLINE + 1.0
