"""The engine seam: what the admission layer needs from an engine (llama.cpp, or the mock).

    engine: Engine = LlamaEngine(config)      # or MockEngine(...)
    info = await engine.start(died=on_death)  # loads the model; ModelInfo
    engine.run(job)                           # a prepared job; events come through job.deliver
    await engine.close()

An engine runs up to `capacity` jobs at once and reports every job it was given with events
ending in exactly one `Finished` or `Failed`, delivered on the event loop. Queueing, the
bound, time limits, draining and preparation are not its business: `Admission` does them
once for every engine. This module imports no llama_cpp and no HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .embeddings import EmbedJob
from .faults import Faults
from .job import Job
from .prepare import Tokenizer
from .template import ChatTemplate

__all__ = ["Died", "Engine", "EngineStats", "Grammars", "ModelInfo"]


class Grammars(Protocol):
    """What makes the grammars a reply is held to (engine/llama/grammar.py): JSON Schema text
    (None: any JSON object), llama.cpp's GBNF and llguidance's Lark, each to a grammar for
    `SamplingParams.grammar`; each raises ValueError for what it cannot take."""

    def __call__(self, schema: str | None) -> str: ...

    def gbnf(self, text: str) -> str: ...

    def lark(self, text: str) -> str: ...


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    n_ctx: int                   # one conversation's KV cells: history + reply
    gpu_offload: bool
    chat_template: ChatTemplate
    tokenizer: Tokenizer         # thread-safe: preparation runs in its own worker
    n_vocab: int = 0             # token ids are 0 .. n_vocab-1 (0: unknown, e.g. the mock)
    # Called with JSON Schema text (None: any JSON object): a grammar for
    # `SamplingParams.grammar`; raises ValueError for a schema it cannot take. None: this
    # engine has no grammars.
    json_grammar: Grammars | None = None
    add_bos: bool = False        # a plain-text prompt starts with the BOS token
    logprobs: bool = False       # can report token log-probabilities (`SamplingParams.logprobs`)
    max_choices: int = 1         # the most choices one job may ask for (`SamplingParams.n`)
    n_embd: int = 0              # an embedding's width (0: this engine has no embeddings)
    max_embedding_tokens: int = 0   # tokens one embeddings input may hold


@dataclass
class EngineStats:
    jobs_submitted: int = 0
    jobs_started: int = 0           # jobs whose prompt reached the model
    jobs_skipped: int = 0           # cancelled before they reached the model
    jobs_expired: int = 0           # waited longer than max_queue_wait: never reached the model
    prompt_tokens: int = 0          # prompt length of every started job
    prompt_tokens_reused: int = 0   # of those, found in the KV cache (a session's earlier turn)
    prompt_tokens_evaluated: int = 0  # prompt tokens decoded (a cancelled prompt stops early)
    completion_tokens: int = 0
    generation_steps: int = 0       # llama_decode calls that carried generated tokens
    # Where the engine thread's time goes (seconds, summed over its steps): llama_decode,
    # sampling (sampler chains, detokenizing, the events of each token), handing the events to
    # the loop, and the whole steps (the rest: planning and building batches).
    step_seconds: float = 0.0
    decode_seconds: float = 0.0
    sample_seconds: float = 0.0
    handoff_seconds: float = 0.0


Died = Callable[[BaseException], None]


class Engine(Protocol):
    stats: EngineStats
    faults: Faults
    model_info: ModelInfo | None
    # time.monotonic() when the engine last finished a step or went idle: a health check
    # calls it stalled when work waits and this is too long ago.
    last_progress: float

    @property
    def capacity(self) -> int:
        """How many jobs it runs at once."""

    @property
    def ready(self) -> bool: ...

    @property
    def failure(self) -> BaseException | None:
        """Why the engine died while serving, if it did (it stays dead: restart the server)."""

    async def start(self, died: Died) -> ModelInfo:
        """Load the model; `died(error)` is called on the loop if the engine dies later."""

    async def close(self) -> None:
        """Cancel what runs, stop, free the model."""

    def run(self, job: Job) -> None:
        """On the loop: serve a prepared job (`job.prompt` is set) alongside the others."""

    def embed(self, job: EmbedJob) -> None:
        """On the loop: read `job`'s embeddings (`model_info.n_embd` wide) beside the jobs
        that run; `job.on_done` is called on the loop with the vectors or an error."""
