"""Embeddings: their throughput against llama-server's, and what they cost the streams beside them.

    python -m benchmarks.embeddings --rounds 3    # writes results/embeddings-latest.json

Two servers on the same model (the embedded SmolLM2 by default), each as a process:
chatstream_lite (`python -m chatstream_lite`: embeddings from a second llama.cpp context on
the engine thread, mean pooling, sharing the thread's time with generation) and llama-server
`--embeddings --pooling mean` (its own batching of embedding requests). In each round, in an
order that alternates between rounds:

- **throughput**: `--clients` clients each send `--requests` `/v1/embeddings` requests of
  `--inputs` texts of about 30 tokens; inputs/s and tokens/s over the whole burst, both
  servers.
- **beside streams** (chatstream_lite only: llama-server with `--embeddings` serves
  embeddings only): `--streams` streams of `/v1/chat/completions` (`--max-tokens`, greedy)
  alone, then the same streams while a burst of twice the requests runs; each stream's tokens/s and
  the largest gap between two of its chunks.

Medians and spreads over the rounds are printed and written with the provenance
(benchmarks/provenance.py) to `--output`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from chatstream_lite.model_file import default_model_path

from .provenance import provenance, public_path
from .servers import (
    HOST,
    Launch,
    ServerProcess,
    Settings,
    chatstream_lite,
    find_llama_server,
    free_port,
)
from .servers import _repack_flags as repack_flags

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "embeddings-latest.json"
LOGS = Path(__file__).resolve().parent / "results" / "logs"
SENTENCE = ("Retrieval systems turn each passage into a vector so that similar passages "
            "land close together, number {i}.")
PROMPT = "Count from 1 to 200, separated by commas."


def llama_server_embeddings(binary: str, settings: Settings, port: int, n_batch: int) -> Launch:
    """llama-server serving embeddings: mean pooling, as chatstream_lite's, and its default
    L2 normalization; one context of `n_batch` cells per slot so an input fits a batch."""
    return Launch(
        [binary, "-m", str(settings.model), "--host", HOST, "--port", str(port),
         "--embeddings", "--pooling", "mean", "-c", str(n_batch * settings.parallel),
         "-np", str(settings.parallel), "-b", str(n_batch), "-ub", str(n_batch),
         "-t", str(settings.threads), "-tb", str(settings.threads), "--no-webui",
         *repack_flags()],
        ready_path="/health")


async def embeddings_burst(url: str, clients: int, requests: int, inputs: int
                           ) -> dict[str, float]:
    """Every client sends its requests one after another; the burst's inputs/s, tokens/s."""
    tokens = 0

    async def client(index: int) -> None:
        nonlocal tokens
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            for number in range(requests):
                texts = [SENTENCE.format(i=(index * 1000 + number * inputs + k))
                         for k in range(inputs)]
                async with session.post(url + "/v1/embeddings", json={
                        "model": "x", "input": texts, "encoding_format": "float"}) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"{url}: {response.status} {body}")
                    assert len(body["data"]) == inputs
                    tokens += body["usage"]["prompt_tokens"]

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    seconds = time.perf_counter() - began
    total = clients * requests * inputs
    return {"seconds": seconds, "inputs": total, "tokens": tokens,
            "inputs_per_s": total / seconds, "tokens_per_s": tokens / seconds}


async def one_stream(url: str, max_tokens: int) -> dict[str, float]:
    """A greedy streamed chat completion: its tokens/s after the first chunk, largest gap."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.post(url + "/v1/chat/completions", json={
                "model": "x", "max_tokens": max_tokens, "stream": True, "temperature": 0,
                "repeat_penalty": 1.0, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": PROMPT}]}) as response:
            stamps: list[float] = []
            completion_tokens = 0
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    completion_tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return {"tokens": completion_tokens, "tokens_per_s": (completion_tokens - 1) / span,
            "largest_gap_ms": max(gaps) * 1000 if gaps else float("nan"),
            "median_gap_ms": statistics.median(gaps) * 1000 if gaps else float("nan")}


async def streams(url: str, count: int, max_tokens: int) -> list[dict[str, float]]:
    results = await asyncio.gather(*(one_stream(url, max_tokens) for _ in range(count)))
    return list(results)


async def streams_with_burst(url: str, args: argparse.Namespace) -> dict[str, Any]:
    alone = await streams(url, args.streams, args.max_tokens)
    burst_task = asyncio.create_task(embeddings_burst(url, args.clients, args.requests * 2,
                                                      args.inputs))
    beside = await streams(url, args.streams, args.max_tokens)
    burst = await burst_task
    return {"alone": alone, "beside_embeddings": beside, "burst_during": burst}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or default_model_path()
    settings = Settings(model=Path(model), n_ctx=args.n_ctx, threads=args.threads,
                        parallel=args.parallel, llama_server_parallel=args.parallel,
                        max_new_tokens=args.max_tokens)
    binary, found = find_llama_server(args.llama_server)
    if binary is None:
        raise SystemExit(f"llama-server: {found}")
    rounds: list[dict[str, Any]] = []
    ours_launch = chatstream_lite(settings, free_port(),
                                  extra=("--n-batch", str(args.n_batch)))
    theirs_port = free_port()
    theirs_launch = llama_server_embeddings(binary, settings, theirs_port, args.n_batch)
    for number in range(args.rounds):
        order = ["chatstream_lite", "llama-server"]
        if number % 2:
            order.reverse()
        row: dict[str, Any] = {"round": number, "order": order}
        for system in order:
            if system == "chatstream_lite":
                port = int(ours_launch.argv[ours_launch.argv.index("--port") + 1])
                async with ServerProcess(ours_launch, LOGS / "embeddings-ours.log", port) as s:
                    await embeddings_burst(s.base_url, 1, 1, args.inputs)       # warm-up
                    row[system] = {
                        "throughput": await embeddings_burst(s.base_url, args.clients,
                                                             args.requests, args.inputs),
                        **await streams_with_burst(s.base_url, args)}
            else:
                async with ServerProcess(theirs_launch, LOGS / "embeddings-llama-server.log",
                                         theirs_port) as s:
                    await embeddings_burst(s.base_url, 1, 1, args.inputs)
                    row[system] = {"throughput": await embeddings_burst(
                        s.base_url, args.clients, args.requests, args.inputs)}
        rounds.append(row)
        print(json.dumps(_round_line(row)), flush=True)
    return {"settings": {"model": public_path(str(model)), "n_ctx": args.n_ctx,
                         "n_batch": args.n_batch, "threads": args.threads,
                         "parallel": args.parallel, "clients": args.clients,
                         "requests": args.requests, "inputs": args.inputs,
                         "streams": args.streams, "max_tokens": args.max_tokens,
                         "llama_server": found},
            "rounds": rounds, "summary": _summary(rounds)}


def _round_line(row: dict[str, Any]) -> dict[str, Any]:
    ours = row["chatstream_lite"]
    return {"round": row["round"],
            "ours_inputs_per_s": round(ours["throughput"]["inputs_per_s"], 1),
            "llama_server_inputs_per_s": round(row["llama-server"]["throughput"]
                                               ["inputs_per_s"], 1),
            "stream_tps_alone": [round(s["tokens_per_s"], 1) for s in ours["alone"]],
            "stream_tps_beside": [round(s["tokens_per_s"], 1)
                                  for s in ours["beside_embeddings"]],
            "largest_gap_ms_alone": round(max(s["largest_gap_ms"] for s in ours["alone"]), 1),
            "largest_gap_ms_beside": round(max(s["largest_gap_ms"]
                                               for s in ours["beside_embeddings"]), 1)}


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def over(pick: Any) -> dict[str, float]:
        return spread([pick(row) for row in rounds])

    return {
        "chatstream_lite_inputs_per_s": over(lambda r: r["chatstream_lite"]["throughput"]
                                             ["inputs_per_s"]),
        "llama_server_inputs_per_s": over(lambda r: r["llama-server"]["throughput"]
                                          ["inputs_per_s"]),
        "chatstream_lite_tokens_per_s": over(lambda r: r["chatstream_lite"]["throughput"]
                                             ["tokens_per_s"]),
        "llama_server_tokens_per_s": over(lambda r: r["llama-server"]["throughput"]
                                          ["tokens_per_s"]),
        "stream_tokens_per_s_alone": over(lambda r: statistics.mean(
            s["tokens_per_s"] for s in r["chatstream_lite"]["alone"])),
        "stream_tokens_per_s_beside_embeddings": over(lambda r: statistics.mean(
            s["tokens_per_s"] for s in r["chatstream_lite"]["beside_embeddings"])),
        "largest_gap_ms_alone": over(lambda r: max(
            s["largest_gap_ms"] for s in r["chatstream_lite"]["alone"])),
        "largest_gap_ms_beside_embeddings": over(lambda r: max(
            s["largest_gap_ms"] for s in r["chatstream_lite"]["beside_embeddings"])),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2)")
    parser.add_argument("--llama-server", default=None, help="llama-server binary")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.embeddings")
    result = asyncio.run(run(args))
    result = {"provenance": {**origin, "loadavg_after": os.getloadavg()}, **result}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
