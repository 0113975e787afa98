"""Does aiohttp-sse cost speed next to hand-written SSE framing? One run, same chunks, real HTTP.

    python benchmarks/sse_framing.py [--events 20000]

Serves the same `chat.completion.chunk` JSON events two ways on a loopback port: through
`aiohttp_sse.EventSourceResponse.send()` (what /v1/chat/completions uses) and through a
bare `StreamResponse.write(b"data: ...\\n\\n")`. An aiohttp client reads every byte; the
figure is server+client microseconds per event (median of 5 rounds), to set against the
~10,000 us a token takes on this machine's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp
from aiohttp import web
from aiohttp_sse import EventSourceResponse

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


async def main(events: int, rounds: int) -> None:
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
    print(f"| framing | us per event (median of {rounds}, {events} events) |")
    print("|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds))
