"""Admission: the one bounded queue in front of every engine, written once.

    admission = Admission(engine, LimitsConfig(max_queue_size=16, max_queue_wait=None))
    job = admission.submit(messages, params, cache_key=session_id)  # QueueFull, ServiceUnavailable
    async for event in job.events(): ...
    await admission.drain(grace=10.0)     # shutting down: refuse new work, let the rest end

What happens to a job here, in order:
1. **The bound** (synchronous, so exact however many requests arrive at once): at most
   `engine.capacity` running plus `max_queue_size` waiting; one more is `QueueFull` (429).
   A job asking for `n` choices takes `n` places (one engine sequence each).
2. **Preparation** (`prepare.py`) in a worker thread: the template rendered, the text
   tokenized, the oldest turns dropped to fit. A job whose client leaves stops there; one
   that cannot fit fails with the request's own error (a 400, no callback).
3. **Waiting** for a free place in the engine, oldest first, with an optional time limit
   (`max_queue_wait`: `QueueTimeout`, 503). A job cancelled while it waits leaves the queue
   at once and never reaches the model.
4. **Running** in the engine until its last event.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor

from ..config import DEFAULTS, LimitsConfig
from ..errors import (
    BadRequest,
    ChatStreamError,
    ClientClosedRequest,
    QueueFull,
    QueueTimeout,
    ServiceUnavailable,
)
from .embeddings import EmbedJob
from .events import Failed, Finished
from .job import Job, PlainPrompt, Prompt, PromptInput
from .prepare import check_limits, prepare, prepare_plain
from .protocol import Engine, ModelInfo
from .queue_wait import QueueWait
from .sampling import SamplingParams

__all__ = ["CANCEL_WAIT", "Admission"]

log = logging.getLogger(__name__)

# After a drain's grace period, how long cancelled jobs may take to end (one token each).
CANCEL_WAIT = 10.0


class Admission:
    """See the module docstring."""

    def __init__(self, engine: Engine, limits: LimitsConfig = DEFAULTS.limits) -> None:
        self.engine = engine
        self.max_queue_size = limits.max_queue_size
        self.max_messages = limits.max_messages
        self.max_input_chars = limits.max_input_chars
        self.draining = False
        self._waiting: deque[Job] = deque()     # admitted: being prepared, or prepared
        self._running: set[Job] = set()         # handed to the engine
        self._embedding: set[EmbedJob] = set()  # embeddings handed to the engine
        self._queue_wait = QueueWait[Job](limits.max_queue_wait, self._expire)
        self._workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatstream-prepare")
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def in_flight(self) -> list[Job]:
        return [*self._waiting, *self._running]

    # -- the way in -----------------------------------------------------------------------
    def submit(self, messages: PromptInput, params: SamplingParams, *,
               cache_key: Hashable | None = None, drop_oldest: bool = True) -> Job:
        """Admit a job or raise: `ServiceUnavailable` (not ready, draining, dead), `QueueFull`,
        or the request's own error when it is too big to prepare (`check_limits`).
        `messages` is a conversation, or a `PlainPrompt` read without the chat template."""
        engine, info = self._serving()
        check_limits(messages, max_messages=self.max_messages, max_chars=self.max_input_chars)
        if params.n > min(engine.capacity, info.max_choices):
            raise BadRequest(f"n={params.n} is more choices than this server runs at once "
                             f"({min(engine.capacity, info.max_choices)}).",
                             param="n")
        if _places(self._running) + _places(self._waiting) + params.n > \
                engine.capacity + self.max_queue_size:
            raise QueueFull(
                f"The server is busy: {len(self._running)} running and "
                f"{len(self._waiting)} waiting (max_queue_size={self.max_queue_size}).")
        job = Job(messages, params, cache_key=cache_key, drop_oldest=drop_oldest)
        job.on_cancel = self._withdraw
        job.on_end = self._ended
        self._waiting.append(job)
        self._idle.clear()
        self._queue_wait.start(job)
        engine.stats.jobs_submitted += 1
        budget = info.n_ctx - params.max_new_tokens
        future: Future[Prompt]
        if isinstance(messages, PlainPrompt):
            bos = info.chat_template.bos_token if info.add_bos else ""
            future = self._workers.submit(
                prepare_plain, messages, info.tokenizer, budget=budget, stops=params.stop,
                bos=info.tokenizer.tokenize(bos, special=True))
        else:
            stops = tuple(s for s in (info.chat_template.eos_token, *params.stop) if s)
            future = self._workers.submit(
                prepare, messages, info.chat_template, info.tokenizer, budget=budget,
                drop_oldest=drop_oldest, cancelled=lambda: job.cancelled, stops=stops)
        loop = asyncio.get_running_loop()
        future.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._prepared, job, done))
        return job

    def _serving(self) -> tuple[Engine, ModelInfo]:
        """The engine and its model, when it can take a request; else `ServiceUnavailable`
        saying why."""
        engine = self.engine
        if self.draining:
            raise ServiceUnavailable("The server is shutting down.")
        if engine.failure is not None:
            raise self._dead(engine.failure)
        if not engine.ready or engine.model_info is None:
            raise ServiceUnavailable(self._not_ready())
        return engine, engine.model_info

    def submit_embeddings(self, inputs: list[list[int]]
                          ) -> tuple[EmbedJob, asyncio.Future[list[list[float]]]]:
        """Admit an embeddings request (token ids per input) or raise as `submit` does. It
        takes one place of the same bound while it runs, but no generation slot: the engine
        reads it between generation steps. The future gives the vectors; `job.cancel()`
        (the client left) stops it before its next batch."""
        engine, _ = self._serving()
        if _places(self._running) + _places(self._waiting) + len(self._embedding) + 1 > \
                engine.capacity + self.max_queue_size:
            raise QueueFull(
                f"The server is busy: {len(self._running) + len(self._embedding)} running and "
                f"{len(self._waiting)} waiting (max_queue_size={self.max_queue_size}).")
        future: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()

        def done(outcome: list[list[float]] | BaseException) -> None:
            self._embedding.discard(job)
            if not self._waiting and not self._running and not self._embedding:
                self._idle.set()
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        job = EmbedJob(inputs, done)
        self._embedding.add(job)
        self._idle.clear()
        engine.embed(job)
        return job, future

    def _not_ready(self) -> str:
        # The llama.cpp engine reports its load; the others just are not ready yet.
        progress = getattr(self.engine, "load_progress", None)
        if self.engine.model_info is None and isinstance(progress, float):
            return f"The model is loading ({progress:.0%}); try again shortly."
        return "The model is not loaded (starting up or shutting down)."

    def _prepared(self, job: Job, done: Future[Prompt]) -> None:
        """On the loop: the worker is done with `job`."""
        if job.done:
            return  # cancelled or expired meanwhile: it has had its last event
        error = done.exception()
        if error is None:
            job.prompt = done.result()
            self._start_waiting()
            return
        if isinstance(error, ClientClosedRequest):
            # The worker saw `job.cancelled` (the client left, perhaps seen through
            # `Job.abandoned` before anything called `cancel()`): a withdrawal, not a refusal,
            # so the request ends as a disconnect with its one callback.
            self._withdraw(job)
            return
        if not isinstance(error, ChatStreamError):
            log.error("preparing a request failed", exc_info=error)
        self._remove(job)
        job.deliver(Failed(error))

    def _start_waiting(self) -> None:
        """Hand prepared jobs to the engine, oldest first, while it has room."""
        engine = self.engine
        if engine.failure is not None:
            return
        for job in list(self._waiting):
            if _places(self._running) + job.params.n > engine.capacity:
                return          # in order: a job with several choices is not overtaken
            if job.prompt is None:
                continue        # still being prepared; a later one may start first
            self._remove(job)
            self._running.add(job)
            engine.run(job)

    # -- the ways out ---------------------------------------------------------------------
    def _withdraw(self, job: Job) -> None:
        """A cancelled job still waiting leaves the queue now and never reaches the model."""
        if job not in self._waiting:
            return  # running: the engine sees the flag within a step
        self._remove(job)
        self.engine.stats.jobs_skipped += 1
        job.deliver(Finished("cancelled", reached_model=False))

    def _expire(self, job: Job) -> None:
        """A job waited `max_queue_wait` without a place: refused like a full queue."""
        self._remove(job)
        self.engine.stats.jobs_expired += 1
        job.deliver(Failed(QueueTimeout(
            f"The request waited {self._queue_wait.seconds:g}s in the queue without getting "
            "a slot (max_queue_wait); the server is busy.")))

    def _remove(self, job: Job) -> None:
        self._queue_wait.stop(job)
        try:
            self._waiting.remove(job)
        except ValueError:
            pass

    def _ended(self, job: Job) -> None:
        """On the loop: `job` had its last event; its place goes to the next one."""
        self._remove(job)
        self._running.discard(job)
        if not self._waiting and not self._running and not self._embedding:
            self._idle.set()
        self._start_waiting()

    def engine_died(self, error: BaseException) -> None:
        """On the loop: nobody will serve the waiting jobs (the engine failed its own)."""
        dead = self._dead(error)
        for job in list(self._waiting):
            self._remove(job)
            job.deliver(Failed(dead))
        for job in list(self._running):
            job.deliver(Failed(dead))    # a no-op for the jobs the engine failed already

    @staticmethod
    def _dead(error: BaseException) -> ServiceUnavailable:
        return ServiceUnavailable(f"The engine thread died ({error!r}); the server must be "
                                  "restarted.")

    # -- shutting down --------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """Refuse new jobs (503), give the admitted ones `grace` seconds to end, then cancel
        the rest; returns once every admitted job has had its last event."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("shutdown: %d request(s) still running after %.1fs; cancelling them",
                        len(self.in_flight), grace)
            for job in self.in_flight:
                job.cancel()
            try:
                await asyncio.wait_for(self._idle.wait(), CANCEL_WAIT)
            except asyncio.TimeoutError:
                log.error("shutdown: %d request(s) did not end after cancelling",
                          len(self.in_flight))

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)


def _places(jobs: deque[Job] | set[Job]) -> int:
    """Engine places the jobs take: one per choice."""
    return sum(job.params.n for job in jobs)
