"""Prometheus metrics for one ChatStream, rendered by `prometheus-client` at `GET /metrics`.

    chat_stream.metrics.request_finished("chat_stream", exchange)   # every accepted request
    chat_stream.metrics.request_rejected("chat_stream", error)      # every refused one
    app.router.add_get("/metrics", chat_stream.metrics.handle)

Each ChatStream has its own registry (not the process-wide default), so two servers in one
process, as in the tests, never count into each other. Queue depth and running generations
are read from the admission layer at scrape time, and what the session store owes and lost
from the store (`add_session_store`); everything else is counted when a request ends.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine import Admission
from ..errors import ChatStreamError
from ..sessions import SessionStore
from ..status import StreamStatus
from .exchange import Exchange

__all__ = ["ENDPOINTS", "REJECTED", "TOKEN_BUCKETS", "TTFT_BUCKETS", "Metrics"]

# Every endpoint that serves through serve_exchange, by its name in the `endpoint` label.
ENDPOINTS = ("chat_stream", "chat_completions", "completions", "messages", "responses",
             "embeddings")
REJECTED = "rejected"   # the `status` of a refused request, beside the four callback statuses

# From a fast GPU's few milliseconds to a long queue wait on a CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.25, 0.5, 1.0)


class _EngineTime(Collector):
    """`chatstream_engine_seconds_total{phase}`: the engine thread's time by phase, read from
    its stats at scrape time (decode: llama_decode; sample: sampler chains, detokenizing and
    the events of each token; handoff: to the event loop; other: planning and batches)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._admission.engine.stats
        family = CounterMetricFamily(
            "chatstream_engine_seconds", "The engine thread's time in its steps, by phase.",
            labels=["phase"])
        accounted = stats.decode_seconds + stats.sample_seconds + stats.handoff_seconds
        for phase, seconds in (("decode", stats.decode_seconds),
                               ("sample", stats.sample_seconds),
                               ("handoff", stats.handoff_seconds),
                               ("other", max(0.0, stats.step_seconds - accounted))):
            family.add_metric([phase], seconds)
        yield family


class _SessionStoreOutbox(Collector):
    """What the session store owes while it is away, and what it lost (sessions/outbox.py),
    read from the store at scrape time."""

    def __init__(self, store: SessionStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        counts = self._store.outbox_counts()
        yield GaugeMetricFamily(
            "chatstream_session_store_pending_turns", "Turns the client received that wait "
            "in memory for the session store to answer again.", value=counts.turns)
        yield GaugeMetricFamily(
            "chatstream_session_store_pending_lock_releases", "Session locks held here that "
            "wait for the session store to answer again to be released.", value=counts.locks)
        yield CounterMetricFamily(
            "chatstream_session_store_late_writes", "Turns written to the session store "
            "after it came back.", value=counts.written_late)
        lost = CounterMetricFamily(
            "chatstream_session_store_lost_turns", "Turns the client received that never "
            "reached the session store, by reason: full (the pending bound), conflict "
            "(another replica wrote the session first), stopping (the server stopped "
            "first), unavailable (a store that keeps nothing).", labels=["reason"])
        for reason, count in counts.lost.items():
            lost.add_metric([reason], count)
        yield lost


class Metrics:
    """The counters, gauges and histograms of one ChatStream."""

    def __init__(self, admission: Admission) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "chatstream_requests", "Requests by endpoint and final status: the four callback "
            "statuses, or 'rejected' (4xx/429/503 before streaming, no callback).",
            ["endpoint", "status"], registry=self.registry)
        self.rejections = Counter(
            "chatstream_rejected_requests", "Refused requests by endpoint and error code.",
            ["endpoint", "code"], registry=self.registry)
        Gauge("chatstream_queue_depth", "Requests waiting for a generation slot.",
              registry=self.registry).set_function(lambda: admission.queued)
        Gauge("chatstream_running_generations", "Generations running now.",
              registry=self.registry).set_function(lambda: admission.running)
        self.prompt_tokens = Counter(
            "chatstream_prompt_tokens", "Prompt tokens of the requests that reached the model.",
            registry=self.registry)
        self.generated_tokens = Counter(
            "chatstream_generated_tokens", "Tokens generated, including those of requests whose "
            "client left.", registry=self.registry)
        self.time_to_first_token = Histogram(
            "chatstream_time_to_first_token_seconds", "From the request's arrival to the first "
            "piece of its reply, queue wait included (written to the client when streaming).",
            ["endpoint"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.token_latency = Histogram(
            "chatstream_token_latency_seconds", "Time between consecutive pieces of a reply "
            "(about one token each), measured where they are written to the client.",
            ["endpoint"], buckets=TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(_EngineTime(admission))
        # Every series exists from the start, so a dashboard shows 0 rather than nothing.
        for endpoint in ENDPOINTS:
            for status in (*StreamStatus, REJECTED):
                self.requests.labels(endpoint, str(status))

    def add_session_store(self, store: SessionStore) -> None:
        """Export what `store` owes and has lost (its outbox), read at every scrape."""
        self.registry.register(_SessionStoreOutbox(store))

    def request_finished(self, endpoint: str, exchange: Exchange) -> None:
        """An admitted request has ended: its callback status is known, or it was refused
        late (e.g. its prompt cannot fit), which counts as a rejection."""
        self.prompt_tokens.inc(exchange.usage.prompt_tokens)
        self.generated_tokens.inc(exchange.usage.completion_tokens)
        if exchange.status is None:
            assert exchange.error is not None
            self.request_rejected(endpoint, exchange.error)
            return
        self.requests.labels(endpoint, str(exchange.status)).inc()
        if (ttft := exchange.time_to_first_piece) is not None:
            self.time_to_first_token.labels(endpoint).observe(ttft)
        latency = self.token_latency.labels(endpoint)
        for gap in exchange.piece_gaps:
            latency.observe(gap)

    def request_rejected(self, endpoint: str, error: ChatStreamError) -> None:
        """A request was refused before streaming: bad input, 401, 409, 429, 503 ..."""
        self.requests.labels(endpoint, REJECTED).inc()
        self.rejections.labels(endpoint, error.code).inc()

    async def handle(self, request: web.Request) -> web.Response:
        """`GET /metrics`: the Prometheus text format."""
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
