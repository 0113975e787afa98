"""Soak: many short requests, sequentially and at concurrency; RSS and callback counts.

    python -m benchmarks.soak --requests 10000 --concurrency 8   # writes results/soak-latest.json

Two runs, one request at a time and then `--concurrency` at a time, each on a fresh server.
Reports RSS at the start, after the warm-up (the first 1,000 requests, or a tenth of a
shorter run) and at the end, the growth after warm-up, and the count of each callback
status. Target: growth < 5 % after warm-up, zero lost callbacks. The server runs in this
process (its callbacks are counted); requests go over real HTTP on 127.0.0.1, each client a
fresh session so the session store is exercised too. Each run's report is printed as it
ends; both go, with the provenance (benchmarks/provenance.py), into one JSON at `--output`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from chatstream_lite import ChatStream

from .provenance import provenance
from .storm import _rss_mb

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "soak-latest.json"


@dataclass
class SoakReport:
    requests: int
    concurrency: int
    statuses: Counter[str]
    http_statuses: Counter[int]
    rss_start_mb: float
    rss_warm_mb: float
    rss_end_mb: float
    seconds: float

    @property
    def lost_callbacks(self) -> int:
        return self.http_statuses[200] - sum(self.statuses.values())

    @property
    def growth_after_warmup(self) -> float:
        return (self.rss_end_mb - self.rss_warm_mb) / self.rss_warm_mb

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "concurrency": self.concurrency,
                "callback_statuses": dict(self.statuses),
                "http_statuses": {str(k): v for k, v in self.http_statuses.items()},
                "lost_callbacks": self.lost_callbacks,
                "rss_start_mb": round(self.rss_start_mb, 1),
                "rss_after_warmup_mb": round(self.rss_warm_mb, 1),
                "rss_end_mb": round(self.rss_end_mb, 1),
                "growth_after_warmup_pct": round(100 * self.growth_after_warmup, 2),
                "seconds": round(self.seconds, 1)}


async def run_soak(chat_stream: ChatStream, requests: int, concurrency: int,
                   max_new_tokens: int = 2) -> SoakReport:
    statuses: Counter[str] = Counter()
    http_statuses: Counter[int] = Counter()

    def callback(request: web.Request, message: str) -> None:
        statuses[str(message)] += 1

    async def chat(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_chat_stream_request(request, callback=callback)

    app = web.Application()
    chat_stream.setup(app)
    app.router.add_post("/chat_stream", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    warmup = min(1000, max(1, requests // 10))
    body = json.dumps({"user_input": "Hi", "max_new_tokens": max_new_tokens})
    done = 0
    rss_warm = 0.0
    try:
        gc.collect()
        rss_start = _rss_mb()
        started = time.monotonic()
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as client:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(requests):
                queue.put_nowait(i)

            async def worker() -> None:
                nonlocal done, rss_warm
                while not queue.empty():
                    queue.get_nowait()
                    client.cookie_jar.clear()  # a fresh session per request
                    async with client.post(f"http://{host}:{port}/chat_stream", data=body,
                                           headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        http_statuses[r.status] += 1
                    done += 1
                    if done == warmup:
                        gc.collect()
                        rss_warm = _rss_mb()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        # Let the last callbacks run.
        for _ in range(100):
            if sum(statuses.values()) >= http_statuses[200]:
                break
            await asyncio.sleep(0.05)
        gc.collect()
        return SoakReport(requests, concurrency, statuses, http_statuses, rss_start,
                          rss_warm, _rss_mb(), time.monotonic() - started)
    finally:
        await runner.cleanup()


async def _main(args: argparse.Namespace, argv: list[str]) -> int:
    document: dict[str, Any] = {
        "provenance": provenance(argv, "benchmarks.soak"),
        "settings": {"requests": args.requests, "concurrency": [1, args.concurrency],
                     "n_ctx": 512, "max_new_tokens": args.max_new_tokens, "model": args.model},
        "runs": [], "complete": False}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for concurrency in (1, args.concurrency):
        chat_stream = ChatStream(args.model, n_ctx=512, max_new_tokens=args.max_new_tokens,
                                 max_queue_size=max(16, concurrency))
        report = await run_soak(chat_stream, args.requests, concurrency, args.max_new_tokens)
        document["runs"].append(report.as_dict())
        print(json.dumps(report.as_dict(), indent=2), flush=True)
        # Written after each run, so that a long soak cut short keeps what it measured.
        document["complete"] = len(document["runs"]) == 2
        args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    bad = [r for r in document["runs"]
           if r["lost_callbacks"] or r["growth_after_warmup_pct"] >= 5]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where the JSON goes (default {DEFAULT_OUTPUT})")
    sys.exit(asyncio.run(_main(parser.parse_args(argv), argv)))


if __name__ == "__main__":
    main()
