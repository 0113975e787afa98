"""`LlamaEngine`: one executor thread that owns the llama.cpp model and serves prepared jobs.

    >>> engine = LlamaEngine(EngineConfig(model=path, num_of_concurrent_executions=4))
    >>> info = await engine.start(died=admission.engine_died)
    >>> engine.run(job)        # from the loop; job.prompt holds its token ids already
    >>> await engine.close()

Jobs arrive prepared (`Admission` rendered, tokenized and fitted them in a worker), so this
thread only decodes and samples. Each turn of its loop takes the new jobs, asks the
`Scheduler` for a step, has the `Runner` execute it, and hands the step's events to the event
loop in exactly one place, `_flush` (one `call_soon_threadsafe` per phase of a step).

llama.cpp objects are not thread-safe, so they are created, used and closed only on this
thread. Cancelling is a flag per job, read between steps and between prompt chunks. If the
thread's loop itself raises, the engine is dead for good: every job it holds fails, `failure`
says why, and `died` tells the admission layer, which fails the waiting ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import llama_cpp

from ...config import DEFAULTS, EngineConfig
from ...model_file import resolve_model_path
from ..embeddings import EmbedJob, plan_batch
from ..events import Event, Failed
from ..faults import Faults
from ..job import Job
from ..kv_slots import KVSlots
from ..protocol import Died, EngineStats, ModelInfo
from ..scheduler import SampleTokens, Scheduler, Sequence
from ..template import ChatTemplate
from .embedder import Embedder
from .grammar import json_grammar
from .kernel_check import CheckResult, run_check, settle
from .kernels import KernelPolicy, Machine, choose
from .model import Model
from .runner import Runner
from .threads import default_threads

__all__ = ["WEIGHTS_READ", "LlamaEngine"]

log = logging.getLogger(__name__)

# What /health's load_progress says once the weights are read and the context is being made.
WEIGHTS_READ = 0.99
# Sequences one embeddings batch may hold (several short inputs read in one llama_decode).
EMBEDDING_SEQUENCES = 32
# Tokens one embeddings batch may hold while streams run (a longer input is read alone): the
# longest a stream waits for its next token beside embeddings is one batch, ~0.5 s for 128
# tokens on 2 cores where a full 512-token batch took 1.6 s (RESULTS, Embeddings).
EMBEDDING_TOKENS_BESIDE_STREAMS = 128
class LlamaEngine:
    """Runs up to `config.num_of_concurrent_executions` jobs together on one thread that owns
    the model. `ModelNotFound` when `config.model` is not a file (or, None, the embedded model
    is not installed)."""

    def __init__(self, config: EngineConfig = DEFAULTS.engine) -> None:
        most = llama_cpp.llama_max_parallel_sequences()
        if not 1 <= config.num_of_concurrent_executions <= most:
            raise ValueError(f"num_of_concurrent_executions must be between 1 and {most}")
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.threads = config.n_threads or default_threads()
        self.stats = EngineStats()
        self.faults = Faults(wake=self._wake)
        self.model_info: ModelInfo | None = None
        self.failure: BaseException | None = None
        self.last_progress = time.monotonic()        # written by the thread, read by /health
        self.load_progress: float | None = None      # 0..1 as llama.cpp loads; read by /health
        self.kernels: KernelPolicy | None = None     # the CPU kernels chosen at load
        self._weights_read = 0.0                     # llama.cpp's own fraction, for the log
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatstream-engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._died: Died | None = None
        self._model: Model | None = None
        self._scheduler: Scheduler | None = None
        self._runner: Runner | None = None
        self._outbox: list[tuple[Job, Event]] = []   # the thread's events since the last flush
        self._inbox: deque[Job] = deque()            # loop -> thread: jobs to start
        self._embed_inbox: deque[EmbedJob] = deque()  # loop -> thread: embeddings to read
        self._embedding: deque[EmbedJob] = deque()    # the thread's: read in turn
        self._embedded: list[tuple[EmbedJob, list[list[float]] | BaseException]] = []
        self._embedder: Embedder | None = None
        self._generation_owed = 0.0   # seconds of generation due before the next embeddings
        self._work = threading.Event()               # wakes the idle thread
        self._serving: asyncio.Future[None] | None = None
        self._stopping = False                       # the thread exits once idle
        self._closing = False

    @property
    def capacity(self) -> int:
        return self.config.num_of_concurrent_executions

    @property
    def ready(self) -> bool:
        return self._serving is not None and not self._serving.done() and not self._closing

    # -- on the loop ----------------------------------------------------------------------
    async def start(self, died: Died) -> ModelInfo:
        self._loop = asyncio.get_running_loop()
        self._died = died
        self.model_info = await self._loop.run_in_executor(self._executor, self._load)
        self._serving = self._loop.run_in_executor(self._executor, self._serve)
        self._serving.add_done_callback(self._thread_ended)
        return self.model_info

    def run(self, job: Job) -> None:
        self._inbox.append(job)
        self._work.set()

    def embed(self, job: EmbedJob) -> None:
        """On the loop: read `job`'s embeddings between generation steps."""
        self._embed_inbox.append(job)
        self._work.set()

    async def close(self) -> None:
        """Let the thread cancel what it holds and stop, then close the model there."""
        self._closing = True
        self._stopping = True
        self._work.set()
        if self._serving is not None:
            # A thread that died was logged and recorded (`failure`) already.
            await asyncio.gather(self._serving, return_exceptions=True)
            self._serving = None
        if self._loop is not None:
            await self._loop.run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=True)

    def _wake(self) -> None:
        self._work.set()

    def _thread_ended(self, serving: asyncio.Future[None]) -> None:
        if serving.cancelled() or serving.exception() is None:
            return
        self.failure = serving.exception()
        if self._died is not None:
            self._died(self.failure)    # type: ignore[arg-type]

    def _deliver(self, events: list[tuple[Job, Event]],
                 embedded: list[tuple[EmbedJob, list[list[float]] | BaseException]]) -> None:
        for job, event in events:
            job.deliver(event)
        for embed_job, outcome in embedded:
            embed_job.on_done(outcome)

    # -- on the thread --------------------------------------------------------------------
    def _load(self) -> ModelInfo:
        cfg = self.config
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        log.info("loading %s (n_ctx=%d, n_gpu_layers=%d, n_threads=%d, parallel=%d, "
                 "flash_attn=%s%s); GPU offload %s", self.model_path, cfg.n_ctx,
                 cfg.n_gpu_layers, self.threads, cfg.num_of_concurrent_executions,
                 "off" if cfg.deterministic else cfg.flash_attn,
                 ", deterministic" if cfg.deterministic else "", "supported" if gpu else
                 "not supported by this llama-cpp-python build (CPU only)")
        kernels = self._choose_kernels()
        # One sequence per running job; each keeps its cells when its job ends, so an idle
        # session's next turn finds them unless a newer session needed the slot.
        model = Model.load(self.model_path, n_ctx=cfg.n_ctx, n_batch=cfg.n_batch,
                           n_seq=cfg.num_of_concurrent_executions, n_gpu_layers=cfg.n_gpu_layers,
                           n_threads=self.threads, verbose=cfg.verbose,
                           extra_buffers=kernels.extra_buffers,
                           flash_attn="off" if cfg.deterministic else cfg.flash_attn,
                           progress=self._load_progressed)
        template_text = model.metadata.get("tokenizer.chat_template")
        if not template_text:
            model.close()
            raise ValueError(f"{self.model_path} has no tokenizer.chat_template in its metadata")
        template = ChatTemplate(template_text, bos_token=model.token_text(model.bos_token),
                                eos_token=model.token_text(model.eos_token))
        self._model = model
        self._runner = Runner(model)
        # Every input is read whole in one batch: up to n_batch tokens (embedder.py).
        try:
            self._embedder = Embedder(model, n_tokens=model.batch.capacity,
                                      n_seq=EMBEDDING_SEQUENCES, n_threads=self.threads,
                                      verbose=cfg.verbose)
        except Exception:
            model.close()
            raise
        slots = KVSlots(model, model.n_seq, exact=cfg.deterministic)
        self._scheduler = Scheduler(slots, n_batch=model.batch.capacity,
                                    emit=self._post, stats=self.stats, faults=self.faults,
                                    max_generation_time=cfg.max_generation_time)
        name = model.metadata.get("general.name") or self.model_path.stem
        self.load_progress = 1.0
        return ModelInfo(self.model_path, name, model.n_ctx, gpu, template, model.vocabulary,
                         model.n_vocab, json_grammar, model.add_bos, logprobs=True,
                         max_choices=cfg.num_of_concurrent_executions,
                         n_embd=self._embedder.n_embd,
                         max_embedding_tokens=self._embedder.n_tokens)

    def _choose_kernels(self) -> KernelPolicy:
        """Extra buffer types on or off (kernels.py), checked in a child first where asked."""
        cfg = self.config
        machine = Machine.detect()
        policy = choose(machine, cfg.extra_buffers, cfg.kernel_check)
        if policy.check:
            log.info("kernel check: decoding a batch in a child process before loading")
            hook = self.faults.kernel_check_signal

            def check(extra_buffers: bool) -> CheckResult:
                return run_check(self.model_path, extra_buffers=extra_buffers,
                                 n_threads=self.threads, n_gpu_layers=cfg.n_gpu_layers,
                                 die_with=hook(extra_buffers) if hook else None)

            policy = settle(policy, machine, check)
        log.log(logging.INFO if policy.extra_buffers else logging.WARNING, "%s",
                policy.describe())
        self.kernels = policy
        return policy

    def _load_progressed(self, fraction: float) -> None:
        """Inside llama.cpp's load, a few hundred times: one log line per tenth."""
        if int(fraction * 10) > int(self._weights_read * 10):
            log.info("loading the model: %d %%", fraction * 100)
        self._weights_read = fraction
        # llama.cpp's fraction is of the weights; the context (KV cells, compute buffers)
        # comes after them and takes about a second more on CPU, so /health says 99 % until
        # `_load` has finished, not 100 % while requests would still get 503.
        self.load_progress = min(fraction, WEIGHTS_READ)
        if self.faults.during_load is not None:
            self.faults.during_load(fraction)

    def _unload(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._model is not None:
            self._model.close()
            self._model = None

    def _post(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """The one place where the executor thread hands something to the event loop."""
        if self._outbox or self._embedded:
            assert self._loop is not None
            began = time.perf_counter()
            events, self._outbox = self._outbox, []
            embedded, self._embedded = self._embedded, []
            self._loop.call_soon_threadsafe(self._deliver, events, embedded)
            self.stats.handoff_seconds += time.perf_counter() - began

    def _serve(self) -> None:
        """The thread's loop: take new jobs, run a step, hand the events over; sleep when idle."""
        scheduler, runner = self._scheduler, self._runner
        assert scheduler is not None and runner is not None
        try:
            while True:
                if self.faults.thread_error is not None:
                    raise self.faults.thread_error
                while self._inbox:
                    seq = scheduler.admit(self._inbox.popleft())
                    if seq is not None:
                        self._attach(scheduler, runner, seq)
                while self._embed_inbox:
                    self._embedding.append(self._embed_inbox.popleft())
                if self._stopping:
                    for seq in list(scheduler.sequences):
                        scheduler.finish(seq, "cancelled")
                    self._end_embeddings(ConnectionAbortedError("the server is stopping"))
                self._flush()
                if scheduler.active or self._embedding:
                    began = time.perf_counter()
                    if scheduler.active:
                        self._step(scheduler, runner)
                        self._generation_owed -= time.perf_counter() - began
                    # Embeddings and generation share the thread by time: after a batch of
                    # embeddings, the streams get as long before the next one (a batch of
                    # 512 tokens is ~2 s on 2 cores; one between every two steps left a
                    # stream 1/15 of its rate beside a flood of them: RESULTS, Embeddings).
                    if self._embedding and (not scheduler.active or self._generation_owed <= 0):
                        embedding = time.perf_counter()
                        self._embed_step(beside_streams=bool(scheduler.active))
                        self._generation_owed = time.perf_counter() - embedding
                    self.stats.step_seconds += time.perf_counter() - began
                    self.last_progress = time.monotonic()
                    continue
                if self._stopping and not self._inbox and not self._embed_inbox:
                    return
                # A job handed over after the inbox check set the event already: no lost wakeup.
                self._work.wait()
                self._work.clear()
                self.last_progress = time.monotonic()
        except BaseException as error:  # a bug here must not leave a client waiting forever
            log.exception("the engine thread failed")
            scheduler.fail_everything(error)
            while self._inbox:
                self._post(self._inbox.popleft(), Failed(error))
            self._embedding.extend(self._embed_inbox)
            self._embed_inbox.clear()
            self._end_embeddings(error)
            self._flush()
            raise

    def _embed_step(self, *, beside_streams: bool = False) -> None:
        """Read the next embeddings batch (embeddings.py's plan), a smaller one while streams
        run, and end the jobs it completes; a cancelled job ends without more batches."""
        pending, embedder = self._embedding, self._embedder
        assert embedder is not None
        budget = min(embedder.n_tokens, EMBEDDING_TOKENS_BESIDE_STREAMS) if beside_streams \
            else embedder.n_tokens
        rows = plan_batch(pending, budget, embedder.n_seq)
        if rows:
            began = time.perf_counter()
            try:
                vectors = embedder.embed([job.inputs[index] for job, index in rows])
            except Exception as error:  # noqa: BLE001 - that batch's jobs fail; the engine goes on
                for job in {job for job, _ in rows}:
                    job.cancel()
                    self._embedded.append((job, error))
                vectors = []
            for (job, index), vector in zip(rows, vectors, strict=False):
                job.vectors[index] = vector
            self.stats.decode_seconds += time.perf_counter() - began
        for job in list(pending):
            if job.cancelled or job.done:
                pending.remove(job)
                if job.done and not job.cancelled:
                    self._embedded.append((job, [v for v in job.vectors if v is not None]))
                elif not any(done is job for done, _ in self._embedded):
                    self._embedded.append((job, ConnectionAbortedError("cancelled")))
        self._flush()

    def _end_embeddings(self, error: BaseException) -> None:
        while self._embedding:
            self._embedded.append((self._embedding.popleft(), error))

    @staticmethod
    def _attach(scheduler: Scheduler, runner: Runner, seq: Sequence) -> None:
        try:
            runner.attach(seq)
        except Exception as error:  # a sampler llama.cpp would not build fails its job only
            log.exception("building the sampler chain failed")
            scheduler.fail(seq, error)

    def _step(self, scheduler: Scheduler, runner: Runner) -> None:
        """Execute the scheduler's plans for one step (their order is the scheduler's)."""
        stats = self.stats
        plan = scheduler.plan()
        while plan is not None:
            began = time.perf_counter()
            outputs = runner.execute(plan)
            spent = time.perf_counter() - began
            if isinstance(plan, SampleTokens):
                stats.sample_seconds += spent
            else:
                stats.decode_seconds += spent
            done, plan = plan, scheduler.update(plan, outputs)
            if isinstance(done, SampleTokens):
                self._flush()   # first tokens go out before the others' step; then the rest
