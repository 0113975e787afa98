"""Does aiohttp-sse cost speed next to hand-written SSE framing? One run, same chunks, real HTTP.

    python -m benchmarks.sse_framing [--events 20000]   # writes results/sse-framing-latest.json

Serves the same `chat.completion.chunk` JSON events two ways on a loopback port: through
`aiohttp_sse.EventSourceResponse.send()` (what /v1/chat/completions uses) and through a
bare `StreamResponse.write(b"data: ...\\n\\n")`. An aiohttp client reads every byte; the
figure is server+client microseconds per event (median of 5 rounds), to set against the
time a token takes. The table is printed; every round's figure goes with the provenance
(benchmarks/provenance.py) into the JSON at `--output`.
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
from aiohttp_sse import EventSourceResponse

from .provenance import provenance

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "sse-framing-latest.json"
CHUNK = json.dumps({
    "id": "chatcmpl-0123456789abcdef0123456789abcdef", "object": "chat.completion.chunk",
    "created": 1700000000, "model": "SmolLM2-135M-Instruct.Q4_1",
    "choices": [{"index": 0, "delta": {"content": " token"}, "logprobs": None,
                 "finish_reason": None}],
}, separators=(",", ":"))


def make_app(events: int) -> web.Application:
    async def with_library(request: web.Request) -> web.StreamResponse:
        response = EventSourceResponse(sep="\n")
        await response.prepare(request)
        for _ in range(events):
            await response.send(CHUNK)
        await response.send("[DONE]")
        response.stop_streaming()
        await response.write_eof()
        return response

    async def by_hand(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(events):
            await response.write(f"data: {CHUNK}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/library", with_library)
    app.router.add_get("/by-hand", by_hand)
    return app


async def measure(events: int, rounds: int) -> dict[str, list[float]]:
    """Microseconds per event, one figure per round, for each way of framing."""
    runner = web.AppRunner(make_app(events))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    results: dict[str, list[float]] = {"aiohttp-sse": [], "hand-written": []}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
        for _ in range(rounds):
            for name, path in (("aiohttp-sse", "/library"), ("hand-written", "/by-hand")):
                started = time.perf_counter()
                async with client.get(path) as response:
                    body = await response.read()
                elapsed = time.perf_counter() - started
                assert body.count(b"\n\n") == events + 1
                results[name].append(elapsed / events * 1e6)
    await runner.cleanup()
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where the JSON goes (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.sse_framing")
    results = asyncio.run(measure(args.events, args.rounds))
    lines = [f"| framing | us per event (median of {args.rounds}, {args.events} events) |",
             "|---|---|"]
    lines += [f"| {name} | {statistics.median(values):.1f} |" for name, values in results.items()]
    document: dict[str, Any] = {
        "provenance": origin, "settings": {"events": args.events, "rounds": args.rounds},
        "us_per_event": results,
        "median_us_per_event": {name: statistics.median(v) for name, v in results.items()},
        "table": "\n".join(lines)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(document["table"])
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
