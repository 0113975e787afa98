"""Sampling settings and the llama.cpp sampler chain built from them, one chain per sequence.

    >>> chain = SamplerChain(SamplingParams(temperature=0.0), n_vocab, seed=1)
    >>> token = chain.sample(ctx, index)      # the logits of batch row `index`
    >>> chain.close()

The chain is the one llama-cpp-python's `Llama.generate` builds (same samplers, same order,
same defaults), so a reply sampled here equals one from `create_chat_completion` with the
same settings and seed. Each running sequence has its own chain: its repeat-penalty history
and its random state belong to that request alone.

A grammar is kept beside the chain, not in it, and used as llama.cpp's common sampler does:
the chain picks a token from the unconstrained logits, the grammar checks that one token,
and only when it refuses is the grammar applied to the whole vocabulary and the pick made
again. Applying a JSON grammar to 49,152 candidates costs ~50 ms per token on 2 cores (five
times the decode); checking one costs microseconds, and most picks pass. Greedy picks are
the same either way (the best token the grammar allows); sampled ones follow the same
distribution (a rejected draw is redrawn from the allowed tokens alone).
"""

from __future__ import annotations

import ctypes
import math
import random
from collections.abc import Callable

import llama_cpp
import numpy as np
from llama_cpp import _internals

from ...errors import SchemaUnsatisfiable
from ..sampling import SamplingParams
from .guidance import Guide, Vocab, is_guidance

__all__ = ["SamplerChain", "token_logprobs"]


class SamplerChain:
    """A llama.cpp sampler chain for one sequence; not thread-safe (the engine thread owns it)."""

    def __init__(self, params: SamplingParams, n_vocab: int,
                 vocab: llama_cpp.llama_vocab_p | None = None, *, choice: int = 0,
                 guidance: Callable[[], Vocab] | None = None) -> None:
        """`vocab`: the model's, for a grammar in llama.cpp's GBNF; `guidance`: gives the
        model file's kept vocabulary (guidance.vocabulary), for one of llguidance's."""
        # A seeded request's choices count up from its seed: each differs, all repeat.
        seed = (params.seed + choice) % 2**32 if params.seed is not None else \
            random.getrandbits(32)
        # llama-cpp-python's own wrapper: it builds each sampler with whatever signature the
        # installed llama.cpp has, exactly as Llama._init_sampler does.
        chain = _internals.LlamaSampler()
        self._chain = chain
        self._n_vocab = n_vocab
        self._grammar: llama_cpp.llama_sampler_p | None = None
        self.refusals = 0     # picks the grammar refused, each paid with a full-vocabulary pass
        self._guide: Guide | None = None
        if params.grammar is not None:
            if is_guidance(params.grammar):
                assert guidance is not None, "llguidance needs the model file's vocabulary"
                try:
                    self._guide = Guide(params.grammar, guidance())
                except ValueError:
                    chain.close()
                    raise
            else:
                assert vocab is not None, "a grammar needs the model's vocabulary"
                grammar = llama_cpp.llama_sampler_init_grammar(
                    vocab, params.grammar.encode("utf-8"), b"root")
                if not grammar:
                    chain.close()
                    raise ValueError("llama.cpp could not parse the grammar")
                self._grammar = grammar
                self._one = (llama_cpp.llama_token_data * 1)()
                self._one_array = llama_cpp.llama_token_data_array(
                    data=self._one, size=1, selected=-1, sorted=False)
            self._candidates = _internals.LlamaTokenDataArray(n_vocab=n_vocab)
        if params.logit_bias:
            # First, as llama.cpp's common sampler puts it: a bias of -100 bans a token
            # before any other sampler sees it.
            chain.add_logit_bias(n_vocab, dict(params.logit_bias))
        chain.add_penalties(n_vocab=n_vocab, penalty_last_n=params.repeat_last_n,
                            penalty_repeat=params.repeat_penalty,
                            penalty_freq=params.frequency_penalty,
                            penalty_present=params.presence_penalty)
        # Greedy with nothing in the chain that changes a logit (no bias, no penalty, no
        # grammar): the pick is the logits' argmax, the first of equal best, as llama.cpp's
        # greedy sampler takes it; read straight from the logits, without the chain's copy
        # of 49,152 candidates (0.2 ms of each token at 8 clients: benchmarks/RESULTS.md,
        # "Where the engine thread's time goes").
        self._argmax = (params.temperature == 0.0 and params.grammar is None
                        and not params.logit_bias and params.repeat_penalty == 1.0
                        and params.frequency_penalty == 0.0 and params.presence_penalty == 0.0)
        if params.temperature == 0.0:
            chain.add_greedy()
        else:
            chain.add_top_k(params.top_k)
            chain.add_typical(params.typical_p, 1)
            chain.add_top_p(params.top_p, 1)
            chain.add_min_p(params.min_p, 1)
            chain.add_temp(params.temperature)
            chain.add_dist(seed)

    def sample(self, context: _internals.LlamaContext, index: int) -> int:
        """Sample from the logits of batch row `index`; the token joins the penalty history
        (and advances the grammar)."""
        if self._argmax:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context.ctx, index),
                                           shape=(self._n_vocab,))
            return int(logits.argmax())
        if self._grammar is None and self._guide is None:
            return self._chain.sample(context, index)
        return self._sample_with_grammar(context, index)

    def _sample_with_grammar(self, context: _internals.LlamaContext, index: int) -> int:
        chain = self._chain.sampler
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context.ctx, index),
                                       shape=(self._n_vocab,))
        candidates = self._candidates
        candidates.copy_logits(logits)
        everything = ctypes.byref(candidates.candidates)
        llama_cpp.llama_sampler_apply(chain, everything)
        token = int(candidates.candidates_data.id[candidates.candidates.selected])
        if not self._allows(token):
            self.refusals += 1
            candidates.copy_logits(logits)
            self._restrict(candidates)
            llama_cpp.llama_sampler_apply(chain, everything)
            token = int(candidates.candidates_data.id[candidates.candidates.selected])
            if not self._allows(token):
                # The grammar allows nothing here (no token, not even the end): llama.cpp
                # would throw from inside `accept`, through C, and abort the process.
                raise SchemaUnsatisfiable(
                    "The reply's JSON Schema (response_format, or a tool's parameters) "
                    "cannot be met: the reply reached a point where it allows nothing more.")
        if self._guide is not None:
            self._guide.accept(token)
        else:
            assert self._grammar is not None
            llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _restrict(self, candidates: _internals.LlamaTokenDataArray) -> None:
        """Every token the grammar does not allow now gets a logit of -inf."""
        if self._guide is not None:
            candidates.candidates_data.logit[~self._guide.allowed()] = -np.inf
        else:
            assert self._grammar is not None
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates.candidates))

    def _allows(self, token: int) -> bool:
        """Whether the grammar, in its present state, lets `token` come next."""
        if self._guide is not None:
            return self._guide.allows(token)
        self._one[0] = llama_cpp.llama_token_data(token, 1.0, 0.0)
        self._one_array.size, self._one_array.selected = 1, -1
        assert self._grammar is not None
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return not math.isinf(self._one[0].logit)

    def close(self) -> None:
        self._chain.close()
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


def token_logprobs(context: _internals.LlamaContext, index: int, n_vocab: int, token: int,
                   top: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability under the model's own distribution at batch row `index`
    (the raw logits' log-softmax: before penalties, biases, grammar or temperature, as
    OpenAI and llama-cpp-python report it), and the `top` most likely tokens, best first."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context.ctx, index),
                                   shape=(n_vocab,)).astype(np.float64)
    peak = float(logits.max())
    log_total = peak + math.log(float(np.exp(logits - peak).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-logits, top - 1)[:top]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = [(int(i), float(logits[i]) - log_total) for i in ids]
    return float(logits[token]) - log_total, best
