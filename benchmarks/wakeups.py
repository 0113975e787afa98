"""What idle queued requests cost the event loop, counted rather than timed.

    python -m benchmarks.wakeups                 # 1,000 queued requests, 3 s window
    python -m benchmarks.wakeups --idle 200 --seconds 2 --output results/wakeups-200.json

An in-process server (the embedded model) holds its engine thread at the first token of one
request (the engine's test hook), N more requests wait in the queue on real sockets, and for
a window the script counts the callbacks the event loop runs and the CPU time the process
uses. The engine thread is parked, so everything counted is the loop's cost of the waiting
requests: the figures do not depend on how fast this machine decodes, and another process's
load changes them little (CPU time, not wall time). Before and after a change, run it on both.
The figures are printed and written, with their provenance (benchmarks/provenance.py), to
`--output` (default results/wakeups-latest.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from chatstream_lite import ChatStream

from .provenance import provenance

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "wakeups-latest.json"
_callbacks = 0
_run = asyncio.events.Handle._run


def _counting_run(self: asyncio.Handle) -> None:
    global _callbacks
    _callbacks += 1
    _run(self)


async def measure(idle: int, seconds: float) -> dict[str, Any]:
    chat_stream = ChatStream(n_ctx=512, max_new_tokens=8, max_queue_size=idle)
    app = web.Application()
    chat_stream.setup(app)
    app.router.add_post("/chat_stream", chat_stream.handle_chat_stream_request)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    held, release = threading.Event(), threading.Event()

    def hold(index: int) -> None:
        if index == 0 and not release.is_set():
            held.set()
            release.wait(120)

    chat_stream.engine.faults.before_token = hold
    writers: list[asyncio.StreamWriter] = []

    async def post(text: str) -> None:
        _, writer = await asyncio.open_connection(host, port)
        body = json.dumps({"user_input": text, "max_new_tokens": 4}).encode()
        writer.write(f"POST /chat_stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writers.append(writer)

    global _callbacks
    try:
        await post("Hello")
        await asyncio.get_running_loop().run_in_executor(None, held.wait, 60)
        for first in range(0, idle, 100):
            await asyncio.gather(*(post(f"wait {i}") for i in range(first, min(idle, first + 100))))
        while chat_stream.runtime.admission.queued < idle:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        _callbacks, cpu, wall = 0, time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        calls, cpu, wall = _callbacks, time.process_time() - cpu, time.perf_counter() - wall
        return {"idle": idle, "seconds": wall, "loop_callbacks_per_s": calls / wall,
                "process_cpu_percent": 100 * cpu / wall, "queued": chat_stream.runtime.admission.queued}
    finally:
        release.set()
        for writer in writers:
            writer.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=1000, help="queued requests (default 1000)")
    parser.add_argument("--seconds", type=float, default=3.0, help="counting window")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where the JSON goes (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.wakeups")
    asyncio.events.Handle._run = _counting_run  # type: ignore[method-assign]
    figures = asyncio.run(measure(args.idle, args.seconds))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"provenance": origin, **figures}, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
