"""The engine: one executor thread that owns the llama.cpp model and runs generation jobs.

Data flows one way. The event loop submits a `Job` (messages + sampling parameters + an
optional cache key); up to `num_of_concurrent_executions` jobs run at once and the rest wait
in a bounded queue on the loop. Running jobs are handed to the single executor thread, which
serves them all together by continuous batching (`batching.Batcher`): each step reads the
next chunk of the prompts being read, then one `llama_decode` carries a token of every
generating job. Every
event (`Started`, `Piece`, `Finished`, `Failed`) crosses back to the loop in exactly one
place, `Engine._flush`, once per step.

    >>> engine = Engine(EngineConfig(model_path=path, num_of_concurrent_executions=4))
    >>> await engine.start()
    >>> job = engine.submit(messages, SamplingParams(max_new_tokens=32), cache_key=session_id)
    >>> async for event in job.events(): ...
    >>> job.cancel()            # from the loop; the thread drops it before its next step

llama.cpp objects are not thread-safe, so they are created, used and closed only on the
executor thread. Cancelling is a flag per job, checked between steps (a prompt is read in
chunks, so also between chunks); a job cancelled while it waits is removed from the queue
and never reaches the model. With `num_of_concurrent_executions=1` it is the same code with
one sequence. A job's `cache_key` (the session id) lets its next turn reuse the KV cells its
previous turn left (`kv_slots.KVSlots`).

Time limits (both optional): a job still waiting `max_queue_wait` seconds after it was
submitted is taken out of the queue on the loop and ends with `Failed(QueueTimeout)`; a
reply generating longer than `max_generation_time` ends as `Finished("length")` (checked on
the thread after each token). If the thread's loop itself raises, the engine is dead for
good: every job ends (`Failed`), `failure` says why, and `submit` raises `ServiceUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import llama_cpp

from .batching import Batcher
from .errors import QueueFull, QueueTimeout, ServiceUnavailable
from .job import Event, Failed, Finished, FinishReason, Job, Piece, Started
from .prompt import ChatTemplate, Message
from .queue_wait import QueueWait
from .sampling import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Event",
    "Failed",
    "FinishReason",
    "Finished",
    "Job",
    "ModelInfo",
    "Piece",
    "SamplingParams",
    "Started",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    n_ctx: int = 4096                 # one conversation's KV cells (history + reply), per sequence
    n_gpu_layers: int = -1
    n_threads: int | None = None      # None: every core this process may use
    n_batch: int = 512                # tokens per decode; also the prompt chunk between cancel checks
    num_of_concurrent_executions: int = 1
    max_queue_size: int = 16
    max_queue_wait: float | None = None       # seconds a job may wait for a slot; None: no limit
    max_generation_time: float | None = None  # seconds of generation per reply; None: no limit
    verbose: bool = False


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    n_ctx: int
    gpu_offload: bool
    chat_template: ChatTemplate


@dataclass
class EngineStats:
    jobs_submitted: int = 0
    jobs_started: int = 0           # jobs whose prompt reached the model
    jobs_skipped: int = 0           # cancelled while waiting: never reached the model
    jobs_expired: int = 0           # waited longer than max_queue_wait: never reached the model
    prompt_tokens: int = 0          # prompt length of every started job
    prompt_tokens_reused: int = 0   # of those, found in the KV cache (a session's earlier turn)
    prompt_tokens_evaluated: int = 0  # prompt tokens decoded (a cancelled prompt stops early)
    completion_tokens: int = 0
    generation_steps: int = 0       # llama_decode calls that carried generated tokens
    generation_passes: int = 0      # forward passes those took (one per run of adjacent slots)


class Engine:
    """Runs up to `num_of_concurrent_executions` jobs together on one thread that owns the model."""

    def __init__(self, config: EngineConfig) -> None:
        most = llama_cpp.llama_max_parallel_sequences()
        if not 1 <= config.num_of_concurrent_executions <= most:
            raise ValueError(f"num_of_concurrent_executions must be between 1 and {most}")
        if config.max_queue_size < 0:
            raise ValueError("max_queue_size must be >= 0")
        if config.max_generation_time is not None and not config.max_generation_time > 0:
            raise ValueError("max_generation_time must be > 0 seconds (no limit: None, or 0 on the command line)")
        self.config = config
        self.threads = config.n_threads or len(os.sched_getaffinity(0))
        self.stats = EngineStats()
        self.model_info: ModelInfo | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatstream-engine")
        self._outbox: list[tuple[Job, Event]] = []   # the thread's events since the last flush
        self._batcher = Batcher(config, self.stats, self._post, self.threads)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: deque[Job] = deque()          # loop side: admitted, not yet running
        self._queue_wait = QueueWait[Job](config.max_queue_wait, self._expire)
        self._running: set[Job] = set()              # loop side: handed to the thread
        self._inbox: deque[Job] = deque()            # loop -> thread: jobs to start
        self._work = threading.Event()               # wakes the idle thread
        self._serving: asyncio.Future[None] | None = None
        self._stopping = False                       # the thread exits once idle
        self._closing = False
        self._thread_fault: BaseException | None = None  # see kill_thread()
        # Why the executor thread died, if it did; set on the loop when its future ends.
        self.failure: BaseException | None = None

    @property
    def fault_hook(self) -> Callable[[int], None] | None:
        """A test hook: called on the executor thread before each token is emitted, with the
        token's index in its reply; whatever it raises fails that job like a model error."""
        return self._batcher.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: Callable[[int], None] | None) -> None:
        self._batcher.fault_hook = hook

    def kill_thread(self, error: BaseException) -> None:
        """A test hook: the executor thread's loop raises `error` at its next turn, as a bug
        in the engine would. The engine stays dead: what it served fails, new jobs get 503."""
        self._thread_fault = error
        self._work.set()

    # -- lifecycle (on the loop) ------------------------------------------------------------
    async def start(self) -> ModelInfo:
        self._loop = asyncio.get_running_loop()
        self.model_info = await self._loop.run_in_executor(self._executor, self._load)
        self._serving = self._loop.run_in_executor(self._executor, self._serve)
        self._serving.add_done_callback(self._thread_ended)
        return self.model_info

    async def close(self) -> None:
        """Cancel every job, let the thread finish them and stop, close the model there."""
        self._closing = True
        for job in list(self._waiting) + list(self._running):
            job.cancel()
        self._stopping = True
        self._work.set()
        if self._serving is not None:
            # A thread that died was logged and recorded (`failure`) already.
            await asyncio.gather(self._serving, return_exceptions=True)
            self._serving = None
        if self._loop is not None:
            await self._loop.run_in_executor(self._executor, self._batcher.close)
        self._executor.shutdown(wait=True)

    @property
    def ready(self) -> bool:
        return self._serving is not None and not self._serving.done() and not self._closing

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # -- admission (on the loop) ------------------------------------------------------------
    def submit(self, messages: list[Message], params: SamplingParams, *,
               cache_key: Hashable | None = None) -> Job:
        """Queue a job, or raise `QueueFull` when every slot and waiting place is taken.

        `cache_key` (e.g. the session id): the job may reuse the KV cells of the previous
        job with the same key. Synchronous on purpose: the check and the enqueue happen
        without an `await` between them, so the bound is exact however many requests arrive.
        """
        if self.failure is not None:
            raise self._dead()
        if not self.ready:
            raise ServiceUnavailable("The model is not loaded (starting up or shutting down).")
        capacity = self.config.num_of_concurrent_executions + self.config.max_queue_size
        if len(self._running) + len(self._waiting) >= capacity:
            raise QueueFull(
                f"The server is busy: {len(self._running)} running and "
                f"{len(self._waiting)} waiting (max_queue_size={self.config.max_queue_size})."
            )
        job = Job(messages, params, cache_key, self._withdraw)
        self._waiting.append(job)
        self._queue_wait.start(job)
        self.stats.jobs_submitted += 1
        self._start_waiting()
        return job

    def _start_waiting(self) -> None:
        """Hand waiting jobs to the thread while fewer than the allowed number run."""
        if self.failure is not None:
            return  # nobody would serve them: _thread_ended failed them
        while self._waiting and len(self._running) < self.config.num_of_concurrent_executions:
            job = self._waiting.popleft()
            self._queue_wait.stop(job)
            self._running.add(job)
            self._inbox.append(job)
            self._work.set()

    def _withdraw(self, job: Job) -> None:
        """A cancelled job still waiting leaves the queue now and never reaches the model."""
        try:
            self._waiting.remove(job)
        except ValueError:
            return  # already running: the thread sees the flag
        self._queue_wait.stop(job)
        self.stats.jobs_skipped += 1
        job._deliver(Finished("cancelled", reached_model=False))

    def _expire(self, job: Job) -> None:
        """A job waited `max_queue_wait` without a slot: refused like a full queue, and
        taken out here on the loop, so it never reaches the thread or the model."""
        self._waiting.remove(job)   # only waiting jobs have a clock running
        self.stats.jobs_expired += 1
        job._deliver(Failed(QueueTimeout(
            f"The request waited {self.config.max_queue_wait:g}s in the queue without "
            f"getting a slot (max_queue_wait); the server is busy.")))

    def _deliver(self, events: list[tuple[Job, Event]]) -> None:
        """On the loop: one step's events; a job that ended frees its place for the next."""
        for job, event in events:
            job._deliver(event)
            if isinstance(event, (Finished, Failed)):
                self._running.discard(job)
        self._start_waiting()

    def _thread_ended(self, serving: asyncio.Future[None]) -> None:
        """On the loop, when `_serve` returns or raises. If it raised, the engine is dead:
        fail every job not ended yet (the thread failed the ones it held; jobs submitted or
        handed over since are failed here), so that no client waits forever."""
        if serving.cancelled() or serving.exception() is None:
            return
        self.failure = serving.exception()
        dead = self._dead()
        for job in [*self._waiting, *self._running]:
            self._queue_wait.stop(job)
            if not job.done:
                job._deliver(Failed(dead))
        self._waiting.clear()
        self._running.clear()
        self._inbox.clear()

    def _dead(self) -> ServiceUnavailable:
        return ServiceUnavailable(f"The engine thread died ({self.failure!r}); the server "
                                  "must be restarted.")

    # -- the executor thread ----------------------------------------------------------------
    def _post(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """The one place where the executor thread hands something to the event loop."""
        if self._outbox:
            assert self._loop is not None
            events, self._outbox = self._outbox, []
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _load(self) -> ModelInfo:
        model = self._batcher.load()
        assert self._batcher.template is not None
        name = model.metadata.get("general.name") or self.config.model_path.stem
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        return ModelInfo(self.config.model_path, name, model.n_ctx, gpu, self._batcher.template)

    def _serve(self) -> None:
        """The thread's loop: take new jobs, step the batch, hand the events over; sleep when idle."""
        batcher = self._batcher
        try:
            while True:
                if self._thread_fault is not None:
                    raise self._thread_fault
                while self._inbox:
                    batcher.admit(self._inbox.popleft())
                self._flush()
                if batcher.active:
                    batcher.leave_cancelled()
                    batcher.read_prompts()
                    self._flush()           # a first token goes out before the others' step
                    batcher.generate()
                    self._flush()
                    continue
                if self._stopping and not self._inbox:
                    return
                # A job submitted after the inbox check set the event already: no lost wakeup.
                self._work.wait()
                self._work.clear()
        except BaseException as error:  # a bug here must not leave a client waiting forever
            log.exception("the engine thread failed")
            batcher.fail_everything(error)
            while self._inbox:
                self._post(self._inbox.popleft(), Failed(error))
            self._flush()
            raise

