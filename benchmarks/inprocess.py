"""One stream without HTTP: chatstream_lite's engine against direct llama-cpp-python.

    python -m benchmarks.inprocess      # 4 replies each, alternating; writes results/inprocess-latest.json

Tells the engine's own cost per token apart from the HTTP path's: both run in this process,
on the same prompt, greedy (temperature 0, repeat_penalty 1.0), 200 tokens, all cores, and
count streamed pieces per second from the first piece on. Each system runs in a process of
its own (two llama.cpp contexts driven from two threads of one process make two OpenMP
thread teams, which fight for the cores), and the systems alternate (direct, engine with 1
slot, engine with 8 slots, again) so that drift of the machine hits each alike. The table is
printed; every rate, per round and system, goes with the provenance (benchmarks/provenance.py)
into the JSON at `--output`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chatstream_lite.config import EngineConfig
from chatstream_lite.engine import Admission, Piece, SamplingParams
from chatstream_lite.engine.llama import LlamaEngine
from chatstream_lite.engine.llama.kernels import load_llama
from chatstream_lite.model_file import default_model_path

from .provenance import provenance

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "inprocess-latest.json"
MESSAGES = [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]
TOKENS = 200


def direct(model: str, threads: int, runs: int) -> list[float]:
    llm = load_llama(model_path=model, n_ctx=4096, n_threads=threads,
                     n_threads_batch=threads, verbose=False)
    rates = []
    for _ in range(runs):
        first, pieces = 0.0, 0
        for chunk in llm.create_chat_completion(MESSAGES, max_tokens=TOKENS, temperature=0.0,
                                                repeat_penalty=1.0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                pieces += 1
                first = first or time.monotonic()
        rates.append((pieces - 1) / (time.monotonic() - first))
    llm.close()
    return rates


async def engine(model: str, threads: int, slots: int, runs: int) -> list[float]:
    eng = LlamaEngine(EngineConfig(model=str(model), n_threads=threads,
                                   num_of_concurrent_executions=slots))
    admission = Admission(eng)
    await eng.start(died=admission.engine_died)
    rates = []
    try:
        for _ in range(runs):
            job = admission.submit(MESSAGES, SamplingParams(  # type: ignore[arg-type]
                max_new_tokens=TOKENS, temperature=0.0, repeat_penalty=1.0))
            first, pieces = 0.0, 0
            async for event in job.events():
                if isinstance(event, Piece):
                    pieces += 1
                    first = first or time.monotonic()
            rates.append((pieces - 1) / (time.monotonic() - first))
    finally:
        await eng.close()
        admission.close()
    return rates


SYSTEMS = ("direct", "engine, 1 slot", "engine, 8 slots")


def run_one(system: str, model: str, threads: int, runs: int) -> list[float]:
    if system == "direct":
        return direct(model, threads, runs)
    return asyncio.run(engine(model, threads, 1 if system == "engine, 1 slot" else 8, runs))


def table(results: dict[str, list[float]]) -> str:
    lines = ["| system | pieces/s, median | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {statistics.median(rates):.1f} | {min(rates):.1f} | {max(rates):.1f} |"
              for name, rates in results.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--runs", type=int, default=4, help="replies per system per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where the JSON goes (default {DEFAULT_OUTPUT})")
    parser.add_argument("--only", choices=SYSTEMS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    model = str(args.model or default_model_path())
    if args.only:
        print(json.dumps(run_one(args.only, model, args.threads, args.runs)))
        return
    document: dict[str, Any] = {
        "provenance": provenance(argv, "benchmarks.inprocess"),
        "settings": {"model": Path(model).name, "threads": args.threads, "runs": args.runs,
                     "rounds": args.rounds, "tokens": TOKENS, "messages": MESSAGES},
        "rounds_done": 0, "loadavg_per_round": [],
        "rates": {system: [] for system in SYSTEMS}}
    for _ in range(args.rounds):
        document["loadavg_per_round"].append(os.getloadavg())
        for system in SYSTEMS:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.inprocess", "--only", system, "--model", model,
                 "--runs", str(args.runs), "--threads", str(args.threads)],
                capture_output=True, text=True, check=True)
            document["rates"][system] += json.loads(out.stdout.strip().splitlines()[-1])
        document["rounds_done"] += 1
    rates: dict[str, list[float]] = document["rates"]
    document["summary"] = {name: {"median": statistics.median(r), "min": min(r), "max": max(r)}
                           for name, r in rates.items()}
    document["table"] = table(rates)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(document["table"])
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
