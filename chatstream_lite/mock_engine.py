"""A stand-in engine without a model: canned text streamed at a set pace, for front-end work.

    chat_stream = ChatStream(mock=True, mock_delay=0.05)   # or: python -m chatstream_lite --mock

It offers the `Engine` interface (`engine_protocol.EngineProtocol`) and keeps its rules: the
same exact admission bound (`QueueFull`, `ServiceUnavailable`), the same events, a waiting job
that is cancelled never starts, a running one stops within one word. So requests still go
through ChatStream's queue, disconnect detection, history and callbacks; only the text is
canned. It runs on the event loop (no thread, no llama.cpp), so `fault_hook` is called on
the loop too. Behaviour tests use the real model; this is a product feature for UI work.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from pathlib import Path
from typing import AsyncIterator, Callable, Hashable

from .engine import (
    EngineStats,
    Event,
    Failed,
    Finished,
    FinishReason,
    ModelInfo,
    Piece,
    SamplingParams,
    Started,
)
from .errors import QueueFull, QueueTimeout, ServiceUnavailable
from .prompt import ChatTemplate, Message, fit_to_context
from .queue_wait import QueueWait

DEFAULT_DELAY = 0.05        # seconds per word: about the pace of a small model on a CPU
MODEL_NAME = "mock"

# ChatML, so that `get_chat_prompt(request).create_prompt()` works as it does with SmolLM2.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_TEXT = (
    "This is the mock engine of chatstream_lite: no model is loaded. You said: \u201c{user}\u201d\n\n"
    "The reply streams word by word at a fixed pace, through the same queue, disconnect "
    "detection and callbacks as a real model, so a front end can be built without one.\n"
    "- Newlines are kept.\n"
    "- 日本語も一文字ずつ流れます。\n"
    "Press Stop to end it early."
)

# A "token": one CJK character, or a run of other non-space characters; leading spaces
# travel with the token that follows them, as in a real tokenizer.
_CJK = "\u3000-\u30ff\u3400-\u9fff\uf900-\ufaff\uff00-\uffef"
_TOKEN = re.compile(rf"\s*(?:[{_CJK}]|[^\s{_CJK}]+)")


def split_tokens(text: str) -> list[str]:
    """`text` cut into word-like pieces that join back to it (trailing spaces aside)."""
    return _TOKEN.findall(text)


class MockJob:
    """One request to the mock engine; the same surface as `engine.Job`."""

    def __init__(self, engine: MockEngine, messages: list[Message], params: SamplingParams) -> None:
        self.messages = messages
        self.params = params
        self.cancelled = False
        self.done = False
        self._engine = engine
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def cancel(self) -> None:
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self._engine._withdraw(self)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    def _deliver(self, event: Event) -> None:
        if isinstance(event, (Finished, Failed)):
            self.done = True
        self._events.put_nowait(event)


class MockEngine:
    """Streams `text` (``{user}`` is replaced by the last user message) one word per `delay`."""

    def __init__(
        self,
        *,
        n_ctx: int = 4096,
        num_of_concurrent_executions: int = 1,
        max_queue_size: int = 16,
        max_queue_wait: float | None = None,
        max_generation_time: float | None = None,
        delay: float = DEFAULT_DELAY,
        text: str | None = None,
    ) -> None:
        if num_of_concurrent_executions < 1 or max_queue_size < 0 or delay < 0:
            raise ValueError("mock engine: concurrency >= 1, max_queue_size >= 0, delay >= 0")
        if max_generation_time is not None and not max_generation_time > 0:
            raise ValueError("max_generation_time must be > 0 seconds (no limit: None, or 0 on the command line)")
        self.n_ctx = n_ctx
        self.concurrent = num_of_concurrent_executions
        self.max_queue_size = max_queue_size
        self.delay = delay
        self.text = DEFAULT_TEXT if text is None else text
        self.stats = EngineStats()
        self.model_info: ModelInfo | None = None
        self.fault_hook: Callable[[int], None] | None = None
        self.max_generation_time = max_generation_time
        self._template = ChatTemplate(CHATML, bos_token="", eos_token="<|im_end|>")
        self._waiting: deque[MockJob] = deque()
        self._queue_wait = QueueWait[MockJob](max_queue_wait, self._expire)
        self._running: dict[MockJob, asyncio.Task[None]] = {}
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> ModelInfo:
        self._wakeup = asyncio.Event()
        self.model_info = ModelInfo(Path(MODEL_NAME), MODEL_NAME, self.n_ctx, False, self._template)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="chatstream-mock-dispatcher")
        return self.model_info

    async def close(self) -> None:
        self._closing = True
        for job in list(self._waiting) + list(self._running):
            job.cancel()
        if self._dispatcher is not None:
            self._wakeup.set()
            await self._dispatcher
            self._dispatcher = None
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    @property
    def ready(self) -> bool:
        return self._dispatcher is not None and not self._dispatcher.done() and not self._closing

    @property
    def failure(self) -> BaseException | None:
        """Why the dispatcher died, if it did (a bug: it catches nothing on purpose)."""
        dispatcher = self._dispatcher
        if dispatcher is None or not dispatcher.done() or dispatcher.cancelled():
            return None
        return dispatcher.exception()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, messages: list[Message], params: SamplingParams, *,
               cache_key: Hashable | None = None) -> MockJob:
        """`cache_key` is accepted for the engine's interface; a mock has no KV cache."""
        if not self.ready:
            raise ServiceUnavailable("The mock engine is not running (starting up or shutting down).")
        if len(self._running) + len(self._waiting) >= self.concurrent + self.max_queue_size:
            raise QueueFull(
                f"The server is busy: {len(self._running)} running and "
                f"{len(self._waiting)} waiting (max_queue_size={self.max_queue_size})."
            )
        job = MockJob(self, messages, params)
        self._waiting.append(job)
        self._queue_wait.start(job)
        self.stats.jobs_submitted += 1
        self._wakeup.set()
        return job

    def _withdraw(self, job: MockJob) -> None:
        try:
            self._waiting.remove(job)
        except ValueError:
            return  # running: its task sees the flag before the next word
        self._queue_wait.stop(job)
        self.stats.jobs_skipped += 1
        job._deliver(Finished("cancelled", reached_model=False))

    def _expire(self, job: MockJob) -> None:
        self._waiting.remove(job)
        self.stats.jobs_expired += 1
        job._deliver(Failed(QueueTimeout("The request waited too long in the queue "
                                         "(max_queue_wait); the server is busy.")))

    async def _dispatch(self) -> None:
        while not self._closing:
            if not self._waiting or len(self._running) >= self.concurrent:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            job = self._waiting.popleft()
            self._queue_wait.stop(job)
            self._running[job] = asyncio.create_task(self._run(job))

    async def _run(self, job: MockJob) -> None:
        try:
            await self._generate(job)
        except Exception as error:  # noqa: BLE001 - a failure ends this job, as in Engine
            job._deliver(Failed(error))
        finally:
            self._running.pop(job, None)
            self._wakeup.set()

    def _encode(self, messages: list[Message]) -> list[int]:
        return [0] * len(split_tokens(self._template.render(messages).text))

    async def _generate(self, job: MockJob) -> None:
        if job.cancelled:  # cancelled between leaving the queue and starting
            self.stats.jobs_skipped += 1
            job._deliver(Finished("cancelled", reached_model=False))
            return
        params = job.params
        prompt, dropped = fit_to_context(job.messages, self._encode, self.n_ctx - params.max_new_tokens)
        self.stats.jobs_started += 1
        self.stats.prompt_tokens += len(prompt)
        job._deliver(Started(len(prompt), dropped))
        reply, reason = self._reply(job.messages, params)
        tokens = split_tokens(reply)
        if len(tokens) > params.max_new_tokens:
            tokens, reason = tokens[: params.max_new_tokens], "length"
        count = 0
        loop = asyncio.get_running_loop()
        limit = self.max_generation_time
        deadline = None if limit is None else loop.time() + limit
        for token in tokens:
            await asyncio.sleep(self.delay)
            if job.cancelled:
                break
            if self.fault_hook is not None:
                self.fault_hook(count)
            count += 1
            job._deliver(Piece(token))
            if deadline is not None and loop.time() >= deadline and count < len(tokens):
                reason = "length"   # as Engine: checked after each word, cut like max_new_tokens
                break
        self.stats.completion_tokens += count
        job._deliver(Finished("cancelled" if job.cancelled else reason, True, len(prompt), count,
                              0.0, count * self.delay))

    def _reply(self, messages: list[Message], params: SamplingParams) -> tuple[str, FinishReason]:
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        reply = self.text.replace("{user}", user)
        cuts = [i for i in (reply.find(s) for s in params.stop if s) if i >= 0]
        if cuts:
            return reply[: min(cuts)], "stop"
        return reply, "stop"
