"""Sampling settings and the llama.cpp sampler chain built from them, one chain per sequence.

    >>> chain = SamplerChain(SamplingParams(temperature=0.0), n_vocab, seed=1)
    >>> token = chain.sample(ctx, index)      # the logits of batch row `index`
    >>> chain.close()

The chain is the one llama-cpp-python's `Llama.generate` builds (same samplers, same order,
same defaults), so a reply sampled here equals one from `create_chat_completion` with the
same settings and seed. Each running sequence has its own chain: its repeat-penalty history
and its random state belong to that request alone.
"""

from __future__ import annotations

import random

import llama_cpp
from llama_cpp import _internals

from ..sampling import SamplingParams

# llama-cpp-python's defaults for what our API does not expose; kept equal so sampled output
# is comparable with create_chat_completion (with temperature 0 they do not matter).
MIN_P = 0.05
TYPICAL_P = 1.0           # 1.0 switches the typical sampler off
PENALTY_LAST_N = 64       # Llama(last_n_tokens_size=64): tokens the repeat penalty looks back at


class SamplerChain:
    """A llama.cpp sampler chain for one sequence; not thread-safe (the engine thread owns it)."""

    def __init__(self, params: SamplingParams, n_vocab: int,
                 vocab: llama_cpp.llama_vocab_p | None = None) -> None:
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        # llama-cpp-python's own wrapper: it builds each sampler with whatever signature the
        # installed llama.cpp has, exactly as Llama._init_sampler does.
        chain = _internals.LlamaSampler()
        self._chain = chain
        if params.grammar is not None:
            # Before every other sampler, as llama.cpp's grammar-first mode: what follows
            # (penalties, top-k, the pick) only ever sees tokens the grammar allows.
            assert vocab is not None, "a grammar needs the model's vocabulary"
            grammar = llama_cpp.llama_sampler_init_grammar(
                vocab, params.grammar.encode("utf-8"), b"root")
            if not grammar:
                chain.close()
                raise ValueError("llama.cpp could not parse the grammar")
            llama_cpp.llama_sampler_chain_add(chain.sampler, grammar)
        if params.logit_bias:
            # First, as llama.cpp's common sampler puts it: a bias of -100 bans a token
            # before any other sampler sees it.
            chain.add_logit_bias(n_vocab, dict(params.logit_bias))
        chain.add_penalties(n_vocab=n_vocab, penalty_last_n=PENALTY_LAST_N,
                            penalty_repeat=params.repeat_penalty,
                            penalty_freq=params.frequency_penalty,
                            penalty_present=params.presence_penalty)
        if params.temperature == 0.0:
            chain.add_greedy()
        else:
            chain.add_top_k(params.top_k)
            chain.add_typical(TYPICAL_P, 1)
            chain.add_top_p(params.top_p, 1)
            chain.add_min_p(MIN_P, 1)
            chain.add_temp(params.temperature)
            chain.add_dist(seed)

    def sample(self, context: _internals.LlamaContext, index: int) -> int:
        """Sample from the logits of batch row `index`; the token joins the penalty history."""
        return self._chain.sample(context, index)

    def close(self) -> None:
        self._chain.close()
