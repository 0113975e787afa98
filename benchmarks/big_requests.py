"""Big requests beside a running stream: how long each takes, and the longest gap it causes.

    python -m benchmarks.big_requests            # writes results/big-requests-latest.json

A stream of `/chat_stream` runs (greedy, 300 tokens); meanwhile one big request arrives:
`/v1/chat/completions` with 1,000 or 20,000 short messages, or `/chat_stream` with a 1 MiB
`user_input` on a session with a long history. For each, we print how long the big request
took to be answered or refused, its status, and the longest gap between two pieces of the
running stream while it was handled (median gap for comparison). The server runs in this
process on the embedded SmolLM2 model with 2 parallel slots. Issue 10 wants each big
request answered or refused within 1 s of work and no gap over 200 ms. The rows are printed
as they come and written, with their provenance (benchmarks/provenance.py), to `--output`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from chatstream_lite import ChatStream, create_app

from .provenance import provenance

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "big-requests-latest.json"


def _messages(count: int) -> list[dict[str, str]]:
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}
               for i in range(count - 1)]
    return [*history, {"role": "user", "content": "Say hi."}]


async def _stream(url: str, gaps: list[tuple[float, float]], started: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.post(url + "/chat_stream", json={
                "user_input": "Tell me a long story about a dragon.", "max_new_tokens": 300,
                "temperature": 0.0, "repeat_penalty": 1.0}) as response:
            last = None
            async for _ in response.content.iter_any():
                now = time.monotonic()
                if last is not None:
                    gaps.append((now, now - last))
                last = now
                started.set()


async def _prepare(url: str, case: str) -> tuple[str, bytes, dict[str, str]]:
    """The big request's path, body (serialized here, before the measured window: the client
    shares this process's loop with the server) and cookies (a long history for /chat_stream)."""
    if case.startswith("v1"):
        count = int(case.split("-")[1])
        body = json.dumps({"messages": _messages(count), "max_tokens": 8}).encode()
        return "/v1/chat/completions", body, {}
    cookies: dict[str, str] = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        for i in range(20):
            async with client.post(url + "/chat_stream", json={
                    "user_input": f"Remember the number {i} and say ok.", "max_new_tokens": 4,
                    "temperature": 0.0}) as response:
                await response.read()
        cookies = {c.key: c.value for c in client.cookie_jar}
    body = json.dumps({"user_input": "word " * (1024 * 1024 // 5 - 10),
                       "max_new_tokens": 4}).encode()
    return "/chat_stream", body, cookies


async def _big(url: str, path: str, body: bytes, cookies: dict[str, str]) -> tuple[int, float]:
    async with aiohttp.ClientSession(cookies=cookies) as client:
        sent = time.monotonic()
        async with client.post(url + path, data=body,
                               headers={"Content-Type": "application/json"}) as response:
            await response.read()
            return response.status, time.monotonic() - sent


async def run(cases: list[str]) -> list[dict[str, Any]]:
    chat_stream = ChatStream(num_of_concurrent_executions=2, max_new_tokens=300,
                             max_body_size=2 * 1024 * 1024)
    runner = web.AppRunner(create_app(chat_stream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    rows = []
    try:
        for case in cases:
            path, body, cookies = await _prepare(url, case)
            gaps: list[tuple[float, float]] = []
            started = asyncio.Event()
            stream = asyncio.create_task(_stream(url, gaps, started))
            await started.wait()
            await asyncio.sleep(0.3)
            begin = time.monotonic()
            status, took = await _big(url, path, body, cookies)
            end = time.monotonic()
            await stream
            during = [gap for at, gap in gaps if begin <= at <= end + 0.2]
            rows.append({"case": case, "status": status, "seconds": round(took, 3),
                         "max_gap_ms_during": round(1000 * max(during, default=0.0), 1),
                         "median_gap_ms": round(1000 * statistics.median(g for _, g in gaps), 1)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        await runner.cleanup()
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="v1-1000,v1-20000,chat-1MiB")
    parser.add_argument("--output", "--out", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where the JSON goes (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.big_requests")
    rows = asyncio.run(run(args.cases.split(",")))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"provenance": origin, "cases": args.cases.split(","),
                                       "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
