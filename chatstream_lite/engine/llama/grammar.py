"""The grammars a reply can be held to, as `ModelInfo.json_grammar` makes them: JSON Schema,
llama.cpp's GBNF (llama-server's `grammar`) and llguidance's Lark (tool formats' lazy
grammars), all compiled by llguidance (guidance.py).

    >>> grammar = json_grammar(None)                        # any JSON object
    >>> grammar = json_grammar('{"type": "object", ...}')   # what a JSON Schema allows
    >>> grammar = json_grammar.gbnf('root ::= "yes" | "no"')

Each runs while the request is parsed (in a worker thread, never on the event loop nor the
engine thread) and raises `ValueError` for what it cannot take: the request's 400. This is
the one grammar path: llama.cpp's own grammar engine, with the JSON-Schema converter and the
regex automaton this project kept around it, went once llguidance measured faster per token
and to compile and passed the schema fuzz test (benchmarks/RESULTS.md, "Constrained decoding:
llama.cpp's grammar engine against llguidance").
"""

from __future__ import annotations

from .guidance import gbnf_grammar, lark_grammar, schema_grammar

__all__ = ["Grammars", "json_grammar"]


class Grammars:
    """What `ModelInfo.json_grammar` is: called with JSON Schema text (None: any JSON object)
    it returns the grammar that holds a reply to it; `gbnf` and `lark` take grammar text."""

    language = "llguidance"      # what the grammars made here are written in

    def __call__(self, schema: str | None) -> str:
        return schema_grammar(schema)

    def gbnf(self, text: str) -> str:
        """llama.cpp's GBNF (llama-server's `grammar`), its root rule `root`."""
        return gbnf_grammar(text)

    def lark(self, text: str) -> str:
        """llguidance's Lark (tool formats' lazy grammars)."""
        return lark_grammar(text)


json_grammar = Grammars()
