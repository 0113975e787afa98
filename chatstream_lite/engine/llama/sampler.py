"""Sampling settings and the llama.cpp sampler chain built from them, one chain per sequence.

    >>> chain = SamplerChain(SamplingParams(temperature=0.0), n_vocab, seed=1)
    >>> token = chain.sample(ctx, index)      # the logits of batch row `index`
    >>> chain.close()

The chain is the one llama-cpp-python's `Llama.generate` builds (same samplers, same order,
same defaults), so a reply sampled here equals one from `create_chat_completion` with the
same settings and seed. Each running sequence has its own chain: its repeat-penalty history
and its random state belong to that request alone.

A grammar (llguidance's, guidance.py) is kept beside the chain, not in it, and used as
llama.cpp's common sampler uses one: the chain picks a token from the unconstrained logits,
the grammar checks that one token, and only when it refuses does it mask the whole
vocabulary and the pick is made again. Checking one token costs microseconds, and most
picks pass. Greedy picks are
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
from .guidance import Guide, Vocab

__all__ = ["SamplerChain", "token_logprobs"]


class SamplerChain:
    """A llama.cpp sampler chain for one sequence; not thread-safe (the engine thread owns it)."""

    def __init__(self, params: SamplingParams, n_vocab: int,
                 guidance: Callable[[], Vocab] | None = None, *, choice: int = 0) -> None:
        """`guidance`: gives the model file's kept vocabulary (guidance.vocabulary), which a
        grammar (llguidance's, as SamplingParams.grammar carries it) is compiled against."""
        # A seeded request's choices count up from its seed: each differs, all repeat.
        seed = (params.seed + choice) % 2**32 if params.seed is not None else \
            random.getrandbits(32)
        # llama-cpp-python's own wrapper: it builds each sampler with whatever signature the
        # installed llama.cpp has, exactly as Llama._init_sampler does.
        chain = _internals.LlamaSampler()
        self._chain = chain
        self._n_vocab = n_vocab
        self.refusals = 0     # picks the grammar refused, each paid with a full-vocabulary pass
        self._guide: Guide | None = None
        if params.grammar is not None:
            assert guidance is not None, "a grammar needs the model file's vocabulary"
            try:
                self._guide = Guide(params.grammar, guidance())
            except ValueError:
                chain.close()
                raise
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
        if self._guide is None:
            return self._chain.sample(context, index)
        return self._sample_with_grammar(context, index)

    def _sample_with_grammar(self, context: _internals.LlamaContext, index: int) -> int:
        chain, guide = self._chain.sampler, self._guide
        assert guide is not None
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context.ctx, index),
                                       shape=(self._n_vocab,))
        candidates = self._candidates
        candidates.copy_logits(logits)
        everything = ctypes.byref(candidates.candidates)
        llama_cpp.llama_sampler_apply(chain, everything)
        token = int(candidates.candidates_data.id[candidates.candidates.selected])
        if not guide.allows(token):
            self.refusals += 1
            candidates.copy_logits(logits)
            # Every token the grammar does not allow now gets a logit of -inf.
            candidates.candidates_data.logit[~guide.allowed()] = -np.inf
            llama_cpp.llama_sampler_apply(chain, everything)
            token = int(candidates.candidates_data.id[candidates.candidates.selected])
            if not guide.allows(token):
                # The grammar allows nothing here (no token, not even the end): a reply
                # cannot go on, and accepting a refused token would put the matcher in error.
                raise SchemaUnsatisfiable(
                    "The reply's JSON Schema (response_format, or a tool's parameters) "
                    "cannot be met: the reply reached a point where it allows nothing more.")
        guide.accept(token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def close(self) -> None:
        self._chain.close()


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
