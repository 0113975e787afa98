"""The engine: one executor thread that owns the llama.cpp model and runs generation jobs.

Data flows one way. The event loop submits a `Job` (messages + sampling parameters); it waits
in the engine's asyncio-side queue; the dispatcher hands it to the single executor thread,
which renders the chat template, fits the conversation into the context, evaluates the
prompt in chunks and samples token by token. Every event for the job (`Started`, `Piece`,
`Finished`, `Failed`) crosses back to the loop in exactly one place, `Engine._emit`.

    >>> engine = Engine(EngineConfig(model_path=path))
    >>> await engine.start()
    >>> job = engine.submit(messages, SamplingParams(max_new_tokens=32))
    >>> async for event in job.events(): ...
    >>> job.cancel()            # from the loop; the thread stops within one token

The `llama_cpp.Llama` object is not thread-safe, so it is created, used and closed only on
the executor thread. Cancelling is a flag per job, checked between prompt chunks and between
tokens; a job cancelled while it waits is removed from the queue and never reaches the model.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Literal, Union

import llama_cpp

from .errors import ChatStreamError, QueueFull, ServiceUnavailable
from .prompt import ChatTemplate, Message, fit_to_context

log = logging.getLogger(__name__)

# llama-cpp-python's chat default; our API does not expose it, and with temperature 0 it
# does not matter. Kept equal so sampled output is comparable with create_chat_completion.
MIN_P = 0.05

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    n_ctx: int = 4096
    n_gpu_layers: int = -1
    n_threads: int | None = None      # None: every core this process may use
    n_batch: int = 512                # also the prompt chunk between two cancel checks
    num_of_concurrent_executions: int = 1
    max_queue_size: int = 16
    verbose: bool = False


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    n_ctx: int
    gpu_offload: bool
    chat_template: ChatTemplate


# -- events: what the executor thread tells the loop about one job ----------------------------
@dataclass(frozen=True)
class Started:
    """The prompt fits and is about to be evaluated; the oldest messages were dropped."""

    prompt_tokens: int
    dropped_messages: int


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    reached_model: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Union[Started, Piece, Finished, Failed]


@dataclass
class EngineStats:
    jobs_submitted: int = 0
    jobs_started: int = 0           # jobs whose prompt reached the model
    jobs_skipped: int = 0           # cancelled while waiting: never reached the model
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Job:
    """One generation request: created by `Engine.submit`, consumed with `events()`."""

    def __init__(self, engine: Engine, messages: list[Message], params: SamplingParams) -> None:
        self.messages = messages
        self.params = params
        self._engine = engine
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancel = threading.Event()
        self.done = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop this job: dropped from the queue if waiting, stopped within a token if running."""
        if self.done or self._cancel.is_set():
            return
        self._cancel.set()
        self._engine._withdraw(self)

    async def events(self) -> AsyncIterator[Event]:
        """Every event of this job, ending with `Finished` or `Failed`."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    def _deliver(self, event: Event) -> None:  # on the loop
        if isinstance(event, (Finished, Failed)):
            self.done = True
        self._events.put_nowait(event)


class Engine:
    """Runs jobs one at a time on one executor thread that owns the model."""

    def __init__(self, config: EngineConfig) -> None:
        if config.num_of_concurrent_executions != 1:
            # Continuous batching (several sequences per llama_decode) is not built yet.
            raise ValueError("num_of_concurrent_executions must be 1 for now")
        if config.max_queue_size < 0:
            raise ValueError("max_queue_size must be >= 0")
        self.config = config
        self.threads = config.n_threads or len(os.sched_getaffinity(0))
        self.stats = EngineStats()
        self.model_info: ModelInfo | None = None
        # A test hook: called on the executor thread before each token is emitted, with the
        # token's index; whatever it raises fails the job like a model error would.
        self.fault_hook: Callable[[int], None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatstream-engine")
        self._llm: llama_cpp.Llama | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle (on the loop) ------------------------------------------------------------
    async def start(self) -> ModelInfo:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self.model_info = await self._loop.run_in_executor(self._executor, self._load)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="chatstream-dispatcher")
        return self.model_info

    async def close(self) -> None:
        """Cancel every job, wait for the thread to stop, close the model on its thread."""
        self._closing = True
        for job in list(self._waiting) + list(self._running):
            job.cancel()
        if self._dispatcher is not None:
            self._wakeup.set()
            await self._dispatcher
            self._dispatcher = None
        if self._loop is not None:
            await self._loop.run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=True)

    @property
    def ready(self) -> bool:
        return self._dispatcher is not None and not self._dispatcher.done() and not self._closing

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # -- admission (on the loop) ------------------------------------------------------------
    def submit(self, messages: list[Message], params: SamplingParams) -> Job:
        """Queue a job, or raise `QueueFull` when every slot and waiting place is taken.

        Synchronous on purpose: the check and the enqueue happen without an `await` between
        them, so the bound is exact however many requests arrive at once.
        """
        if not self.ready:
            raise ServiceUnavailable("The model is not loaded (starting up or shutting down).")
        capacity = self.config.num_of_concurrent_executions + self.config.max_queue_size
        if len(self._running) + len(self._waiting) >= capacity:
            raise QueueFull(
                f"The server is busy: {len(self._running)} running and "
                f"{len(self._waiting)} waiting (max_queue_size={self.config.max_queue_size})."
            )
        job = Job(self, messages, params)
        self._waiting.append(job)
        self.stats.jobs_submitted += 1
        self._wakeup.set()
        return job

    def _withdraw(self, job: Job) -> None:
        """A cancelled job still waiting leaves the queue now and never reaches the model."""
        try:
            self._waiting.remove(job)
        except ValueError:
            return  # already running: the thread sees the flag
        self.stats.jobs_skipped += 1
        job._deliver(Finished("cancelled", reached_model=False))

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            job = self._waiting.popleft()
            self._running.add(job)
            try:
                await loop.run_in_executor(self._executor, self._run_job, job)
            finally:
                self._running.discard(job)

    # -- the executor thread ----------------------------------------------------------------
    def _emit(self, job: Job, event: Event) -> None:
        """The one place where the executor thread hands something to the event loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(job._deliver, event)

    def _load(self) -> ModelInfo:
        cfg = self.config
        n_threads = self.threads
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        log.info(
            "loading %s (n_ctx=%d, n_gpu_layers=%d, n_threads=%d); GPU offload %s",
            cfg.model_path, cfg.n_ctx, cfg.n_gpu_layers, n_threads,
            "supported" if gpu else "not supported by this llama-cpp-python build (CPU only)",
        )
        llm = llama_cpp.Llama(
            model_path=str(cfg.model_path),
            n_ctx=cfg.n_ctx,
            n_gpu_layers=cfg.n_gpu_layers,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=cfg.n_batch,
            verbose=cfg.verbose,
        )
        template_text = llm.metadata.get("tokenizer.chat_template")
        if not template_text:
            llm.close()
            raise ValueError(f"{cfg.model_path} has no tokenizer.chat_template in its metadata")
        eos, bos = llm.token_eos(), llm.token_bos()
        template = ChatTemplate(
            template_text,
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        )
        self._llm = llm
        name = llm.metadata.get("general.name") or cfg.model_path.stem
        return ModelInfo(cfg.model_path, name, llm.n_ctx(), gpu, template)

    def _unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _run_job(self, job: Job) -> None:
        try:
            self._generate(job)
        except ChatStreamError as error:  # the request's own fault, e.g. PromptTooLong
            self._emit(job, Failed(error))
        except BaseException as error:  # noqa: BLE001 - any failure ends this job, not the thread
            log.exception("generation failed")
            self._emit(job, Failed(error))

    def _encode(self, messages: list[Message]) -> list[int]:
        assert self.model_info is not None and self._llm is not None
        rendered = self.model_info.chat_template.render(messages)
        # As llama-cpp-python's chat handler does: special tokens parsed, BOS only when the
        # template did not write it itself.
        return self._llm.tokenize(
            rendered.text.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )

    def _generate(self, job: Job) -> None:
        llm = self._llm
        assert llm is not None and self.model_info is not None
        if job.cancelled:
            self.stats.jobs_skipped += 1
            self._emit(job, Finished("cancelled", reached_model=False))
            return
        params = job.params
        budget = self.model_info.n_ctx - params.max_new_tokens
        tokens, dropped = fit_to_context(job.messages, self._encode, budget)
        template_stop = self.model_info.chat_template.eos_token
        stops = [s for s in (template_stop, *params.stop) if s]
        self.stats.jobs_started += 1
        self.stats.prompt_tokens += len(tokens)
        self._emit(job, Started(len(tokens), dropped))

        started = time.monotonic()
        if not self._evaluate_prompt(job, tokens):
            self._emit(job, Finished("cancelled", True, len(tokens), 0, time.monotonic() - started))
            return
        prompt_done = time.monotonic()

        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        text = _TextAssembler(stops)
        reason: FinishReason = "length"
        count = 0
        for token in llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=MIN_P,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
        ):
            if job.cancelled:
                reason = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                reason = "stop"
                break
            if self.fault_hook is not None:
                self.fault_hook(count)
            count += 1
            piece, stopped = text.add(llm.detokenize([token]))
            if piece:
                self._emit(job, Piece(piece))
            if stopped:
                reason = "stop"
                break
            if count >= params.max_new_tokens:
                break
        if reason != "cancelled":
            tail = text.flush()
            if tail:
                self._emit(job, Piece(tail))
        self.stats.completion_tokens += count
        finished = time.monotonic()
        self._emit(job, Finished(reason, True, len(tokens), count,
                                 prompt_done - started, finished - prompt_done))

    def _evaluate_prompt(self, job: Job, tokens: list[int]) -> bool:
        """Evaluate the prompt in n_batch chunks, checking for a cancel between chunks.

        `Llama.generate` would evaluate the whole prompt in one call with no way out; done
        here chunk by chunk, a client that leaves during a long prompt stops it within one
        chunk. KV cells shared with the previous prompt are kept (prefix reuse). Afterwards
        `generate` finds the whole prompt evaluated and samples at once; on a cold cache the
        batches are exactly the ones llama-cpp-python itself would run.
        """
        llm = self._llm
        assert llm is not None
        cached = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens].tolist(), tokens):
            if a != b:
                break
            cached += 1
        # The logits of the prompt's last token are needed to sample: re-evaluate it even
        # when the whole prompt is cached (the current logits belong to a later token).
        cached = min(cached, len(tokens) - 1)
        llm.n_tokens = cached  # eval() drops the KV cells from here on
        for start in range(cached, len(tokens), self.config.n_batch):
            if job.cancelled:
                return False
            llm.eval(tokens[start:start + self.config.n_batch])
        return not job.cancelled


class _TextAssembler:
    """Turns token bytes into text pieces that never split a UTF-8 character or leak a stop.

    Incomplete UTF-8 sequences wait in the incremental decoder; text that could be the start
    of a stop string waits here until the next token shows whether it is one.
    """

    def __init__(self, stops: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._stops = stops
        self._held = ""

    def add(self, data: bytes) -> tuple[str, bool]:
        """The text that is safe to send now, and whether a stop string was reached."""
        self._held += self._decoder.decode(data)
        if not self._stops:
            out, self._held = self._held, ""
            return out, False
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._held = self._held[: min(hits)], ""
            return out, True
        keep = max((_overlap(self._held, s) for s in self._stops), default=0)
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        out, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a beginning of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
