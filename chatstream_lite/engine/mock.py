"""A stand-in engine without a model: canned text streamed at a set pace, for front-end work.

    chat_stream = ChatStream(mock=True, mock_delay=0.05)   # or: python -m chatstream_lite --mock
    engine = MockEngine(EngineConfig(num_of_concurrent_executions=2), MockConfig(mock_delay=0))

It is an `Engine` (protocol.py) like the llama.cpp one, so requests go through the same
admission (bound, preparation, queue wait), disconnect detection, history and callbacks;
only the text is canned, and a running job stops within one word. It runs on the event loop
(no thread, no llama.cpp), so `faults.before_token` is called on the loop. Behaviour tests
use the real model; this is a product feature for front-end work.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from pathlib import Path

from ..config import DEFAULTS, EngineConfig, MockConfig
from .embeddings import EmbedJob, normalized
from .events import Failed, Finished, FinishReason, Piece, Started
from .faults import Faults
from .job import Job, PlainPrompt, PromptInput
from .protocol import Died, EngineStats, ModelInfo
from .sampling import SamplingParams
from .template import ChatTemplate

__all__ = ["CHATML", "DEFAULT_DELAY", "DEFAULT_TEXT", "MOCK_EMBEDDING_WIDTH", "MODEL_NAME",
           "MockEngine", "MockTokenizer", "split_tokens"]

DEFAULT_DELAY = DEFAULTS.mock.mock_delay   # seconds per word: about a small model's pace on a CPU
MODEL_NAME = "mock"

# ChatML, so that `get_chat_prompt(request).create_prompt()` works as it does with SmolLM2.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_TEXT = (
    "This is the mock engine of chatstream_lite: no model is loaded. "
    "You said: \u201c{user}\u201d\n\n"
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


_SPECIAL = re.compile(r"(<\|[a-z_]+\|>)")


MOCK_EMBEDDING_WIDTH = 64


class MockTokenizer:
    """Word-like pieces as "tokens" (ids from a checksum); with `special`, ChatML's
    `<|...|>` markers are one token each, as a real vocabulary's control tokens are."""

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        parts = _SPECIAL.split(text) if special else [text]
        tokens: list[int] = []
        for part in parts:
            if special and _SPECIAL.fullmatch(part):
                tokens.append(-zlib.crc32(part.encode()) - 1)   # control: negative ids
            else:
                tokens += [zlib.crc32(t.encode()) for t in split_tokens(part)]
        return tokens


class MockEngine:
    """Streams `text` (``{user}`` is replaced by the last user message) one word per `delay`."""

    def __init__(self, config: EngineConfig | None = None,
                 mock: MockConfig | None = None) -> None:
        config = config or DEFAULTS.engine
        mock = mock or DEFAULTS.mock
        self.n_ctx = config.n_ctx
        self.parallel = config.num_of_concurrent_executions
        self.delay = mock.mock_delay
        self.text = DEFAULT_TEXT if mock.mock_text is None else mock.mock_text
        self.max_generation_time = config.max_generation_time
        self.stats = EngineStats()
        self.faults = Faults()
        self.model_info: ModelInfo | None = None
        self.failure: BaseException | None = None
        self.last_progress = time.monotonic()
        self._template = ChatTemplate(CHATML, bos_token="", eos_token="<|im_end|>")
        self._running: dict[Job, asyncio.Task[None]] = {}
        self._started = False
        self._closing = False

    @property
    def capacity(self) -> int:
        return self.parallel

    @property
    def ready(self) -> bool:
        return self._started and not self._closing

    async def start(self, died: Died) -> ModelInfo:
        self.model_info = ModelInfo(Path(MODEL_NAME), MODEL_NAME, self.n_ctx, False,
                                    self._template, MockTokenizer(), n_embd=MOCK_EMBEDDING_WIDTH,
                                    max_embedding_tokens=min(self.n_ctx, 512))
        self._started = True
        return self.model_info

    async def close(self) -> None:
        self._closing = True
        for job in list(self._running):
            job.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    def run(self, job: Job) -> None:
        self._running[job] = asyncio.create_task(self._run(job))

    def embed(self, job: EmbedJob) -> None:
        """Vectors from a checksum of each input's tokens: the same input, the same vector;
        no meaning in them (front-end work only)."""
        vectors = [normalized([((zlib.crc32(repr((tokens, i)).encode()) % 2001) - 1000) / 1000
                               for i in range(MOCK_EMBEDDING_WIDTH)]) for tokens in job.inputs]
        asyncio.get_running_loop().call_soon(job.on_done, vectors)

    async def _run(self, job: Job) -> None:
        try:
            await self._generate(job)
        except Exception as error:  # noqa: BLE001 - a failure ends this job, as in LlamaEngine
            job.deliver(Failed(error))
        finally:
            self._running.pop(job, None)

    async def _generate(self, job: Job) -> None:
        if job.cancelled:  # cancelled between leaving the queue and starting
            self.stats.jobs_skipped += 1
            job.deliver(Finished("cancelled", reached_model=False))
            return
        assert job.prompt is not None
        params = job.params
        prompt = job.prompt.tokens
        self.stats.jobs_started += 1
        self.stats.prompt_tokens += len(prompt)
        job.deliver(Started(len(prompt), job.prompt.dropped_messages))
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
            self.last_progress = time.monotonic()
            if job.cancelled:
                break
            if self.faults.before_token is not None:
                self.faults.before_token(count)
            count += 1
            job.deliver(Piece(token))
            if deadline is not None and loop.time() >= deadline and count < len(tokens):
                reason = "length"   # as LlamaEngine: checked after each word
                break
        self.stats.completion_tokens += count
        job.deliver(Finished("cancelled" if job.cancelled else reason, True, len(prompt), count,
                             0.0, count * self.delay))

    def _reply(self, messages: PromptInput, params: SamplingParams) -> tuple[str, FinishReason]:
        if isinstance(messages, PlainPrompt):
            user = messages.text
        else:
            user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        reply = self.text.replace("{user}", user)
        cuts = [i for i in (reply.find(s) for s in params.stop if s) if i >= 0]
        if cuts:
            return reply[: min(cuts)], "stop"
        return reply, "stop"
