"""Disconnect storm: hundreds of clients connect and drop at random points.

    python -m benchmarks.storm --clients 500            # writes benchmarks/results/storm-latest.json

Clients drop before sending the whole body, while queued, during prompt processing,
mid-stream, or right after the last byte. Afterwards we check what must hold: exactly one
callback for every request whose body arrived, a status that fits where the client left,
histories consistent with the status, nothing left running or queued, `/health` ok and a
normal request still answered; RSS at the start and the end is reported. The server runs in
this process (so its callbacks can be counted); the clients are plain sockets. The report is
printed and written, with its provenance (benchmarks/provenance.py), to `--output`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from chatstream_lite import ChatStream

from .provenance import provenance

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "storm-latest.json"
DROP_POINTS = ("before_body", "while_queued", "during_prompt", "mid_stream", "after_last_byte")

# What the server may report for each drop point. A client that leaves "while queued" closes
# before reading anything, but the server may already have started its stream by then.
ALLOWED = {
    "before_body": set(),  # never accepted: no callback at all
    "while_queued": {"client_disconnected_before_streaming", "client_disconnected_while_streaming"},
    "during_prompt": {"client_disconnected_before_streaming", "client_disconnected_while_streaming"},
    "mid_stream": {"client_disconnected_while_streaming", "success"},
    "after_last_byte": {"success"},
}

# A long system prompt makes prompt processing long enough to be hit.
LONG_PROMPT = "Please answer carefully. " * 40


@dataclass
class StormServer:
    chat_stream: ChatStream
    runner: web.AppRunner
    host: str
    port: int
    calls: dict[str, list[tuple[str, list[dict[str, str]]]]] = field(default_factory=dict)

    @classmethod
    async def start(cls, chat_stream: ChatStream) -> StormServer:
        app = web.Application()
        chat_stream.setup(app)
        runner = web.AppRunner(app)
        server = cls(chat_stream, runner, "127.0.0.1", 0)

        async def chat(request: web.Request) -> web.StreamResponse:
            try:
                body = await request.read()
            except ConnectionResetError:  # a "before_body" client: never accepted
                return web.Response(status=499)
            tag = json.loads(body)["user_input"].split(":", 1)[0]

            def callback(request: web.Request, message: str) -> None:
                history = chat_stream.get_chat_prompt(request).get_contents()
                server.calls.setdefault(tag, []).append((str(message), history))

            return await chat_stream.handle_chat_stream_request(request, body, callback=callback)

        app.router.add_post("/chat_stream", chat)
        app.router.add_get("/health", chat_stream.health.handle)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server.host, server.port = runner.addresses[0][:2]
        return server

    async def stop(self) -> None:
        await self.runner.cleanup()


async def _client(server: StormServer, tag: str, point: str, rng: random.Random,
                  max_new_tokens: int) -> str:
    """One client that leaves at `point`; returns the text it received."""
    user_input = f"{tag}: " + (LONG_PROMPT if point == "during_prompt" else "Tell me about rivers.")
    body = json.dumps({"user_input": user_input, "max_new_tokens": max_new_tokens}).encode()
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = (f"POST /chat_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    received = b""
    try:
        if point == "before_body":
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.05))
            return ""
        writer.write(head + body)
        await writer.drain()
        if point in ("while_queued", "during_prompt"):
            await asyncio.sleep(rng.uniform(0, 0.2))
            return ""
        if point == "mid_stream":
            await reader.readuntil(b"\r\n\r\n")
            received = await reader.read(64)  # some of the first chunk
            return ""
        received = await asyncio.wait_for(reader.read(), 600)  # after_last_byte
        return received.decode("utf-8", "replace")
    finally:
        writer.close()


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StormReport:
    clients: int
    drop_points: Counter[str]
    statuses: Counter[str]
    problems: list[str]
    rss_start_mb: float
    rss_end_mb: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"clients": self.clients, "drop_points": dict(self.drop_points),
                "statuses": dict(self.statuses), "problems": self.problems,
                "rss_start_mb": round(self.rss_start_mb, 1), "rss_end_mb": round(self.rss_end_mb, 1),
                "seconds": round(self.seconds, 1)}


async def run_storm(server: StormServer, clients: int, seed: int = 0, max_new_tokens: int = 16,
                    concurrency: int = 100) -> StormReport:
    rng = random.Random(seed)
    plan = [(f"c{i}", rng.choice(DROP_POINTS)) for i in range(clients)]
    gc.collect()
    rss_start = _rss_mb()
    started = time.monotonic()
    limit = asyncio.Semaphore(concurrency)

    async def one(tag: str, point: str) -> None:
        async with limit:
            await asyncio.sleep(rng.uniform(0, 0.5))
            await _client(server, tag, point, rng, max_new_tokens)

    await asyncio.gather(*(one(tag, point) for tag, point in plan))
    problems = await _settle_and_check(server, plan)
    gc.collect()
    statuses = Counter(status for calls in server.calls.values() for status, _ in calls)
    problems += await _still_serving(server)
    return StormReport(clients, Counter(p for _, p in plan), statuses, problems,
                       rss_start, _rss_mb(), time.monotonic() - started)


async def _still_serving(server: StormServer) -> list[str]:
    """After the storm: /health says ok and a normal request gets a reply."""
    problems = []
    async with aiohttp.ClientSession(f"http://{server.host}:{server.port}") as client:
        async with client.get("/health") as response:
            body = await response.json()
            if response.status != 200 or body.get("status") != "ok":
                problems.append(f"/health after the storm: {response.status} {body}")
        async with client.post("/chat_stream", json={"user_input": "after: hello",
                                                      "max_new_tokens": 4}) as response:
            text = await response.text()
            if response.status != 200 or not text:
                problems.append(f"a request after the storm: {response.status} {text[:200]!r}")
    return problems


async def _settle_and_check(server: StormServer, plan: list[tuple[str, str]]) -> list[str]:
    engine = server.chat_stream.runtime.admission   # running and queued requests
    deadline = time.monotonic() + 600
    expected = sum(1 for _, point in plan if point != "before_body")
    while time.monotonic() < deadline:
        if (engine.running == 0 and engine.queued == 0
                and sum(len(c) for c in server.calls.values()) >= expected):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # a late duplicate callback would show up here
    problems = []
    if engine.running or engine.queued:
        problems.append(f"left over: running={engine.running} queued={engine.queued}")
    for tag, point in plan:
        calls = server.calls.get(tag, [])
        if point == "before_body":
            if calls:
                problems.append(f"{tag} ({point}): callback for a request never accepted")
            continue
        if len(calls) != 1:
            problems.append(f"{tag} ({point}): {len(calls)} callbacks")
            continue
        status, history = calls[0]
        if status not in ALLOWED[point]:
            problems.append(f"{tag} ({point}): unexpected status {status}")
        turns = [m for m in history if m["role"] != "system"]
        if status in ("client_disconnected_before_streaming", "unknown_error_occurred"):
            if turns:
                problems.append(f"{tag}: history changed after {status}")
        elif len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant" \
                or not turns[1]["content"]:
            problems.append(f"{tag}: inconsistent history after {status}: {turns}")
    return problems


async def _main(args: argparse.Namespace, argv: list[str]) -> int:
    origin = provenance(argv, "benchmarks.storm")
    chat_stream = ChatStream(args.model, n_ctx=2048, max_new_tokens=args.max_new_tokens,
                             max_queue_size=args.clients)
    server = await StormServer.start(chat_stream)
    try:
        report = await run_storm(server, args.clients, args.seed, args.max_new_tokens)
    finally:
        await server.stop()
    document = {"provenance": origin,
                "settings": {"clients": args.clients, "seed": args.seed, "n_ctx": 2048,
                             "max_new_tokens": args.max_new_tokens, "model": args.model},
                **report.as_dict()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(report.as_dict(), indent=2))
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if report.problems else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where the JSON goes (default {DEFAULT_OUTPUT})")
    sys.exit(asyncio.run(_main(parser.parse_args(argv), argv)))


if __name__ == "__main__":
    main()
