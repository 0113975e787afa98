"""Where one stream's CPU goes: per generated token, the server's threads and the client.

    python -m benchmarks.cpu_share                          # ours (both APIs) and llama-server
    python -m benchmarks.cpu_share --systems chat_stream --requests 3
    python -m benchmarks.cpu_share --systems chat_stream,chat_stream_baseline --baseline ../other

Issue 14 §3 asks for one stream over HTTP at direct's speed. On a machine with as many cores as
llama.cpp has threads, every other CPU-second (the server's event loop, its HTTP work, the
client reading the stream) is taken from llama.cpp's threads, and one preempted thread stalls
the other at the next barrier. This counts those CPU-seconds instead of guessing them: each
system runs as a subprocess, `--requests` greedy streams of `--max-tokens` one after another
(after one warm-up), and the script reads every server thread's CPU time from
/proc/PID/task/*/stat before and after, grouped by what the thread is, and its own CPU time
(it is the client, and does nothing else meanwhile). CPU time, not wall time, so another
process's load changes it little.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from chatstream_lite import default_model_path

from .clients import ChatStreamUser, OpenAIUser
from .measure import Tokenizer
from .provenance import command_line, provenance
from .servers import (
    ServerProcess,
    Settings,
    chatstream_lite,
    find_llama_server,
    free_port,
    llama_server,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "cpu-share-latest.json"
PROMPT = "Write a long story about a lighthouse keeper and a storm."
CLOCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{thread id: (name, CPU seconds)} of every thread of `pid`.

    Read from `schedstat` (nanoseconds) where the kernel keeps it: `stat` counts in clock
    ticks (10 ms), and a thread that worked a few milliseconds between two readings can
    show none (the event loop over one short request did, in CI)."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            seconds = _schedstat_seconds(task)
            if seconds is None:
                fields = (task / "stat").read_text().rpartition(")")[2].split()
                seconds = (int(fields[11]) + int(fields[12])) / CLOCK
        except OSError:
            continue                       # the thread ended between listing and reading
        out[int(task.name)] = (name, seconds)
    return out


def _schedstat_seconds(task: Path) -> float | None:
    """CPU time on record in a task's `schedstat`, or None where the kernel has none."""
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def role(tid: int, pid: int, name: str) -> str:
    """A group of server threads: the main one (ours: the event loop; llama-server: its
    decoding loop) or the others by their name (ours names its engine thread; llama.cpp's
    OpenMP workers and Python's default threads keep the process's name)."""
    return "main thread" if tid == pid else f"threads named {name!r}"


async def one_system(name: str, settings: Settings, args: argparse.Namespace,
                     tokenizer: Tokenizer, logs: Path) -> dict[str, Any]:
    port = free_port()
    if name == "llama_server":
        binary, why = find_llama_server(args.llama_server)
        if binary is None:
            return {"status": "n/a", "reason": why}
        launch = llama_server(binary, settings, port)
    elif name.endswith("_baseline"):
        if args.baseline is None:
            return {"status": "n/a", "reason": "needs --baseline DIR"}
        launch = chatstream_lite(settings, port, root=args.baseline)
    else:
        launch = chatstream_lite(settings, port)
    async with ServerProcess(launch, logs / f"cpu-share-{name}.log", port) as server:
        def user() -> ChatStreamUser | OpenAIUser:
            return (ChatStreamUser(server.base_url, 600, tokenizer)
                    if name.startswith("chat_stream")
                    else OpenAIUser(server.base_url, 600, tokenizer))

        pid = server.pid
        warm = user()
        await warm.send(PROMPT, 16)
        await warm.close()
        before, client_before, wall_before = thread_cpu(pid), time.process_time(), \
            time.perf_counter()
        tokens = 0
        for _ in range(args.requests):
            fresh = user()           # no history: every request is the same one
            record = await fresh.send(PROMPT, args.max_tokens)
            await fresh.close()
            if not record.ok:
                return {"status": "failed", "reason": record.error}
            tokens += tokenizer.count(record.text)
        wall = time.perf_counter() - wall_before
        client = time.process_time() - client_before
        after = thread_cpu(pid)
    groups: dict[str, float] = defaultdict(float)
    for tid, (thread, seconds) in after.items():
        groups[role(tid, pid, thread)] += seconds - before.get(tid, (thread, 0.0))[1]
    per_token = {group: 1000 * seconds / tokens for group, seconds in sorted(groups.items())}
    per_token["client process"] = 1000 * client / tokens
    return {"status": "ok", "tokens": tokens, "wall_ms_per_token": 1000 * wall / tokens,
            "cpu_ms_per_token": per_token,
            "threads": sorted({thread for thread, _ in after.values()})}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_share", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="chat_stream,openai,llama_server")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--llama-server", metavar="PATH")
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="a checkout of "
                        "chatstream_lite for the systems chat_stream_baseline, openai_baseline")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.cpu_share")
    model = Path(default_model_path() or "")
    settings = Settings(model=model, n_ctx=4096, threads=args.threads, parallel=1,
                        llama_server_parallel=1, max_new_tokens=args.max_tokens)
    tokenizer = Tokenizer(model)
    results = {}
    try:
        for name in args.systems.split(","):
            print(f"== {name}", file=sys.stderr)
            results[name] = asyncio.run(one_system(name, settings, args, tokenizer,
                                                   args.output.parent / "logs"))
    finally:
        tokenizer.close()
    groups = sorted({g for r in results.values() for g in r.get("cpu_ms_per_token", {})})
    lines = ["| CPU ms per token | " + " | ".join(results) + " |",
             "|---|" + "---:|" * len(results)]
    for group in [*groups, "wall"]:
        cells = []
        for result in results.values():
            if result["status"] != "ok":
                cells.append(result["status"])
            elif group == "wall":
                cells.append(f"{result['wall_ms_per_token']:.2f}")
            else:
                value = result["cpu_ms_per_token"].get(group)
                cells.append("" if value is None else f"{value:.2f}")
        label = "wall time per token (not CPU)" if group == "wall" else group
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("benchmarks.cpu_share", argv), "provenance": origin,
        "settings": {"threads": args.threads, "requests": args.requests,
                     "max_tokens": args.max_tokens, "parallel": 1},
        "systems": results, "table": table,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1))
    print(f"results: {args.output}", file=sys.stderr)
    return 0 if all(r["status"] in ("ok", "n/a") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
