"""Admission, Exchange and Conversations alone, with fakes: no model, no server, fast.

The same rules are proven end to end on the real model elsewhere (test_admission.py,
test_disconnects.py, test_history.py); here each part is driven directly, so that a broken
rule fails in milliseconds and names the part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp_session
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from chatstream_lite.config import LimitsConfig
from chatstream_lite.engine import (
    Admission,
    EngineStats,
    Failed,
    Finished,
    Job,
    ModelInfo,
    Piece,
    SamplingParams,
    Started,
)
from chatstream_lite.engine.faults import Faults
from chatstream_lite.engine.mock import CHATML, MockTokenizer
from chatstream_lite.engine.template import ChatTemplate
from chatstream_lite.errors import BadRequest, QueueFull, SessionBusy
from chatstream_lite.prompt import ChatPrompt
from chatstream_lite.server.conversations import Conversations
from chatstream_lite.server.disconnects import DisconnectWatcher
from chatstream_lite.server.exchange import Exchange
from chatstream_lite.sessions import MemorySessionStore, MemoryStorage
from chatstream_lite.status import StreamStatus

pytestmark = pytest.mark.timeout(30)

TEMPLATE = ChatTemplate(CHATML, bos_token="", eos_token="<|im_end|>")
HELLO = [{"role": "user", "content": "Hello"}]


class FakeEngine:
    """An `Engine` that runs nothing by itself: a test delivers each job's events."""

    def __init__(self, capacity: int = 1) -> None:
        self.stats = EngineStats()
        self.faults = Faults()
        self.model_info: ModelInfo | None = ModelInfo(Path("fake"), "fake", 512, False,
                                                     TEMPLATE, MockTokenizer())
        self.last_progress = 0.0
        self.failure: BaseException | None = None
        self.started: list[Job] = []
        self._capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def ready(self) -> bool:
        return True

    async def start(self, died: Any) -> ModelInfo:
        assert self.model_info is not None
        return self.model_info

    async def close(self) -> None:
        return None

    def run(self, job: Job) -> None:
        self.started.append(job)


async def _settled() -> None:
    """Preparation runs in a worker thread and comes back through the loop."""
    for _ in range(200):
        await asyncio.sleep(0.005)


async def until(predicate: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), 10)


# -- Admission -------------------------------------------------------------------------------
async def test_admission_bounds_running_plus_waiting_exactly() -> None:
    engine = FakeEngine(capacity=1)
    admission = Admission(engine, LimitsConfig(max_queue_size=2))
    jobs = [admission.submit(HELLO, SamplingParams(max_new_tokens=4)) for _ in range(3)]
    with pytest.raises(QueueFull):
        admission.submit(HELLO, SamplingParams(max_new_tokens=4))
    await until(lambda: len(engine.started) == 1)
    assert engine.started == [jobs[0]] and admission.queued == 2
    admission.close()


async def test_admission_hands_jobs_over_oldest_first_as_places_free() -> None:
    engine = FakeEngine(capacity=1)
    admission = Admission(engine, LimitsConfig(max_queue_size=4))
    first, second, third = (admission.submit(HELLO, SamplingParams(max_new_tokens=4))
                            for _ in range(3))
    await until(lambda: len(engine.started) == 1)
    first.deliver(Started(3, 0))
    first.deliver(Finished("stop", True, 3, 0))
    await until(lambda: len(engine.started) == 2)
    assert engine.started == [first, second] and third not in engine.started
    admission.close()


async def test_a_job_cancelled_while_waiting_never_reaches_the_engine() -> None:
    engine = FakeEngine(capacity=1)
    admission = Admission(engine, LimitsConfig(max_queue_size=4))
    running = admission.submit(HELLO, SamplingParams(max_new_tokens=4))
    waiting = admission.submit(HELLO, SamplingParams(max_new_tokens=4))
    await until(lambda: len(engine.started) == 1)
    waiting.cancel()
    events = [event async for event in waiting.events()]
    assert events == [Finished("cancelled", reached_model=False)]
    running.deliver(Finished("stop", True, 3, 0))
    await _settled()
    assert engine.started == [running] and admission.queued == 0
    admission.close()


# -- Exchange ----------------------------------------------------------------------------------
class FakeTransport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeFraming:
    """Records what the exchange asked of it, in order."""

    def __init__(self, on_send: Callable[[], None] | None = None) -> None:
        self.calls: list[str] = []
        self._sent = False
        self._on_send = on_send

    @property
    def headers_sent(self) -> bool:
        return self._sent

    async def open(self, started: Started) -> None:
        self.calls.append("open")
        self._sent = True

    async def send(self, piece: Piece) -> None:
        self.calls.append(f"send {piece.text}")
        if self._on_send is not None:
            self._on_send()

    async def close(self, finished: Finished) -> None:
        self.calls.append(f"close {finished.reason}")

    async def abort(self, error: BaseException) -> None:
        self.calls.append("abort")

    def response_for(self, exchange: Exchange) -> web.StreamResponse:
        return web.Response(status=200)


def _exchange(framing: FakeFraming, transport: FakeTransport,
              end_turn: Callable[[Exchange], Awaitable[None]] | None = None
              ) -> tuple[Exchange, Job]:
    request = make_mocked_request("POST", "/chat_stream", transport=transport)
    job = Job(HELLO, SamplingParams(max_new_tokens=4))
    watcher = DisconnectWatcher()
    watcher.interval = 3600     # only the exchange's own reads of the transport count here
    return Exchange(request, job, framing, watcher, received=0.0, end_turn=end_turn), job


async def test_an_exchange_relays_a_reply_and_ends_the_turn_before_the_client_sees_its_end(
        ) -> None:
    framing = FakeFraming()

    async def end_turn(exchange: Exchange) -> None:
        framing.calls.append(f"end_turn {exchange.reply!r}")

    exchange, job = _exchange(framing, FakeTransport(), end_turn)
    for event in (Started(3, 0), Piece("Hel"), Piece("lo"), Finished("stop", True, 3, 2)):
        job.deliver(event)
    await exchange.run()
    assert framing.calls == ["open", "send Hel", "send lo", "end_turn 'Hello'", "close stop"]
    assert exchange.status is StreamStatus.SUCCESS and exchange.reply == "Hello"
    assert (exchange.usage.prompt_tokens, exchange.usage.completion_tokens) == (3, 2)


async def test_a_client_gone_before_the_engine_started_cancels_and_never_opens() -> None:
    transport = FakeTransport()
    framing = FakeFraming()
    exchange, job = _exchange(framing, transport)
    running = asyncio.create_task(exchange.run())
    await asyncio.sleep(0)                    # the exchange watches the job now
    transport.closing = True                 # the client left while the job waited
    assert job.cancelled                      # the engine sees it at its next step...
    job.deliver(Finished("cancelled", reached_model=False))    # ...and ends the job
    await running
    assert framing.calls == [] and exchange.status is \
        StreamStatus.CLIENT_DISCONNECTED_BEFORE_STREAMING


async def test_a_client_gone_mid_stream_cancels_the_job_and_keeps_the_partial_reply() -> None:
    transport = FakeTransport()
    framing = FakeFraming(on_send=lambda: setattr(transport, "closing", True))
    exchange, job = _exchange(framing, transport)
    job.deliver(Started(3, 0))
    job.deliver(Piece("Hel"))
    job.deliver(Finished("cancelled", True, 3, 1))
    await exchange.run()
    assert job.cancelled
    assert exchange.status is StreamStatus.CLIENT_DISCONNECTED_WHILE_STREAMING
    assert exchange.reply == "Hel" and "close cancelled" not in framing.calls


async def test_a_failure_before_the_headers_is_one_unknown_error_and_an_error_answer() -> None:
    framing = FakeFraming()
    exchange, job = _exchange(framing, FakeTransport())
    job.deliver(Failed(RuntimeError("the model broke")))
    await exchange.run()
    assert framing.calls == [] and exchange.status is StreamStatus.UNKNOWN_ERROR_OCCURRED
    assert exchange.error is not None and exchange.error.status == 500


# -- Conversations ---------------------------------------------------------------------------
def _conversations() -> Conversations:
    store = MemorySessionStore(MemoryStorage(max_sessions=10, idle_ttl=60))
    return Conversations(store, system_prompt="Be brief.", template=lambda: TEMPLATE)


class _Outcome:
    """What `Conversations.settle` reads of an exchange."""

    def __init__(self, status: StreamStatus | None, reply: str = "",
                 dropped_messages: int = 0) -> None:
        self.status = status
        self.reply = reply
        self.dropped_messages = dropped_messages


@pytest.mark.parametrize("status, reply, kept", [
    (StreamStatus.SUCCESS, "Hi there.", True),
    (StreamStatus.CLIENT_DISCONNECTED_WHILE_STREAMING, "Hi th", True),   # the partial reply
    (StreamStatus.CLIENT_DISCONNECTED_BEFORE_STREAMING, "", False),
    (StreamStatus.UNKNOWN_ERROR_OCCURRED, "", False),
])
def test_settle_keeps_a_turn_only_when_something_reached_the_user(
        status: StreamStatus, reply: str, kept: bool) -> None:
    conversations = _conversations()
    history = conversations.new()
    turn = conversations.next_turn(history, "Hello", regenerate=False)
    settled = conversations.settle(history, turn, _Outcome(status, reply))  # type: ignore[arg-type]
    contents = [m["content"] for m in settled.get_contents()]
    assert contents == (["Be brief.", "Hello", reply] if kept else ["Be brief."])


def test_regenerate_answers_the_last_user_message_again_and_needs_a_reply() -> None:
    conversations = _conversations()
    with pytest.raises(BadRequest, match="Nothing to regenerate"):
        conversations.next_turn(conversations.new(), "", regenerate=True)
    history = ChatPrompt(TEMPLATE, system="Be brief.")
    history.add_requester_msg("Hello")
    history.add_responder_msg("Hi.")
    turn = conversations.next_turn(history, "ignored", regenerate=True)
    assert [m["content"] for m in turn.get_contents()] == ["Be brief.", "Hello"]


async def test_a_session_holds_one_request_at_a_time(aiohttp_client: Any) -> None:
    """Two requests of one session, through a real aiohttp app with the session middleware
    (pytest-aiohttp's client): the second is refused while the first holds the lock."""
    conversations = _conversations()
    held, let_go = asyncio.Event(), asyncio.Event()

    async def turn(request: web.Request) -> web.Response:
        try:
            session, session_id = await conversations.lock(request)
        except SessionBusy:
            return web.json_response({"error": "session_busy"}, status=409)
        session["turns"] = session.get("turns", 0) + 1
        held.set()
        await let_go.wait()
        await conversations.release(session_id)
        return web.json_response({"turns": session["turns"]})

    app = web.Application()
    aiohttp_session.setup(app, conversations.store.storage)
    app.router.add_post("/turn", turn)
    client = await aiohttp_client(app)
    let_go.set()
    first = await client.post("/turn")          # makes the session, one turn
    assert (await first.json()) == {"turns": 1}
    let_go.clear()
    held.clear()
    pending = asyncio.create_task(client.post("/turn"))
    await held.wait()                             # the session's lock is held now
    busy = await client.post("/turn")
    assert busy.status == 409
    let_go.set()
    assert (await (await pending).json()) == {"turns": 2}
    after = await client.post("/turn")            # the lock was released with the turn
    assert after.status == 200 and (await after.json()) == {"turns": 3}
