"""What a JSON-Schema grammar costs: tokens/s with and without `response_format` (and with a
forced tool call, whose arguments are grammar-constrained the same way), alone and with 8
clients at once, through `/v1/chat/completions` on the real model.

    python -m benchmarks.grammar                  # ~3 minutes on 2 cores
    python -m benchmarks.grammar --story bounded --runs 1 --out results/grammar.json

Both kinds of request ask for the same story, greedy, streamed with usage, at most `--tokens`;
with `--story bounded` the schema's one string field is long enough that no reply ends early. A
stream's rate counts its tokens after the first piece over the time from that piece to its
end (prompt reading excluded); a tool call arrives whole at the end, so its rate is
end to end (from sending the request, prompt included; the "end to end" column gives the same
figure for every row); the aggregate is all tokens over the round's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from chatstream_lite import ChatStream, create_app
from chatstream_lite.model_file import default_model_path

from .provenance import provenance

MESSAGES = [{"role": "user", "content": "Tell me a long story about a dragon, as JSON with "
                                        "one field, 'story'."}]
# "flat": the story is any string, so the model may close it early (fewer tokens per reply).
# "bounded": 400 to 800 characters, so that every reply runs to --tokens; llama.cpp's
# converter nests one grammar level per optional character, and that depth is what costs.
STORIES: dict[str, dict[str, Any]] = {
    "flat": {"type": "string"},
    "bounded": {"type": "string", "minLength": 400, "maxLength": 800},
}


def formats(story: str) -> dict[str, dict[str, Any]]:
    """Each kind of request: what it adds to the body."""
    schema = {"type": "object", "additionalProperties": False, "required": ["story"],
              "properties": {"story": STORIES[story]}}
    tool = {"type": "function", "function": {"name": "tell_story", "description":
                                             "Tell the user a story.", "parameters": schema}}
    return {"free text": {},
            f"json_schema ({story})": {"response_format": {"type": "json_schema", "json_schema": {
                "name": "story", "schema": schema, "strict": True}}},
            f"forced tool call ({story})": {"tools": [tool], "tool_choice": {
                "type": "function", "function": {"name": "tell_story"}}}}


async def one_stream(session: aiohttp.ClientSession, url: str, tokens: int,
                     extra: dict[str, Any]) -> tuple[int, float, float]:
    """(completion tokens, tokens/s after the first piece, tokens/s end to end) of one
    streamed reply; a tool call's rate after the first piece is its end-to-end rate."""
    body: dict[str, Any] = {"model": "x", "messages": MESSAGES, "max_tokens": tokens,
                            "temperature": 0, "repeat_penalty": 1.0, "stream": True,
                            "stream_options": {"include_usage": True}, **extra}
    sent = time.monotonic()
    first = 0.0
    count = 0
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and not first:
                first = time.monotonic()
    end = time.monotonic()
    whole = count / (end - sent)
    if not first or "tools" in extra:   # a tool call is sent whole, at its end
        return count, whole, whole
    return count, (count - 1) / (end - first) if count > 1 else 0.0, whole


async def measure(tokens: int, runs: int, clients: int, story: str) -> dict[str, Any]:
    chat_stream = ChatStream(default_model_path(), n_ctx=2048, max_new_tokens=tokens,
                             num_of_concurrent_executions=clients, max_queue_size=clients)
    runner = web.AppRunner(create_app(chat_stream))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}/v1/chat/completions"
    results: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            await one_stream(session, url, 4, {})                          # warm-up
            for _ in range(runs):      # alternate, so that drift hits all alike
                for name, extra in formats(story).items():
                    entry = results.setdefault(name, {"alone": [], "alone_end_to_end": [],
                                                      "per_stream": [], "aggregate": [],
                                                      "tokens": []})
                    count, rate, whole = await one_stream(session, url, tokens, extra)
                    entry["alone"].append(rate)
                    entry["alone_end_to_end"].append(whole)
                    start = time.monotonic()
                    outcomes = await asyncio.gather(*(
                        one_stream(session, url, tokens, extra) for _ in range(clients)))
                    wall = time.monotonic() - start
                    entry["per_stream"].extend(r for _, r, _ in outcomes)
                    entry["aggregate"].append(sum(c for c, _, _ in outcomes) / wall)
                    entry["tokens"].extend([count, *(c for c, _, _ in outcomes)])
    finally:
        await runner.cleanup()
    return results


AMBIGUOUS_PATTERNS = ("^(.?){24}$", "^(.|..){30}$", "^(.?){60}$")


def sampler_cost(tokens: int) -> dict[str, Any]:
    """Milliseconds per token spent in the sampler chain (grammar included) and in
    `llama_decode`, one sequence, no HTTP: the grammar's own cost, apart from the machine's
    decode speed and from other load (both are timed in the same loop)."""
    from chatstream_lite.engine import SamplingParams
    from chatstream_lite.engine.llama.grammar import json_grammar
    from chatstream_lite.engine.llama.model import Model
    from chatstream_lite.engine.llama.sampler import SamplerChain
    from chatstream_lite.server.openai.tool_formats import Tool, ToolFormat, ToolRequest

    model = Model.load(default_model_path(), n_ctx=1024, n_batch=512, n_seq=1, n_gpu_layers=0,
                       n_threads=len(__import__("os").sched_getaffinity(0)), verbose=False)
    prompt = model.vocabulary.tokenize(
        "<|im_start|>user\n" + MESSAGES[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n",
        special=True)
    results: dict[str, Any] = {}
    try:
        cases: list[tuple[str, str | None]] = [("free text", None)]
        for story_name, story in STORIES.items():
            schema = {"type": "object", "required": ["story"], "additionalProperties": False,
                      "properties": {"story": story}}
            cases.append((f"json_schema ({story_name})", json_grammar(json.dumps(schema))))
            # The generic tool format's grammar for a forced call of one tool (the prompt
            # stays the plain one, so the model's first picks are refused more often than
            # with the tool-describing system turn a real request has).
            forced = ToolRequest((Tool("tell_story", schema),), "required", "tell_story")
            cases.append((f"forced tool call ({story_name})",
                          ToolFormat().grammar(forced, json_grammar)))
        # Patterns llama.cpp's grammar engine could read in many ways at once (before
        # pattern.py, one sampling step under these took 0.6 s, 44 s and over 5 minutes).
        for pattern in AMBIGUOUS_PATTERNS:
            cases.append((f"pattern {pattern}", json_grammar(json.dumps(
                {"type": "string", "pattern": pattern}))))
        for name, grammar in cases:
            chain = SamplerChain(SamplingParams(temperature=0.0, repeat_penalty=1.0,
                                                grammar=grammar), model.n_vocab, model.vocab)
            model.forget(0)
            model.batch.clear()
            for pos, token in enumerate(prompt):
                model.batch.add(token, pos, 0, pos == len(prompt) - 1)
            assert model.decode() == 0
            sampling = decoding = worst = 0.0
            row, count = model.batch.size - 1, 0
            for pos in range(len(prompt), len(prompt) + tokens):
                start = time.perf_counter()
                token = chain.sample(model.context, row)
                worst = max(worst, time.perf_counter() - start)
                sampling += time.perf_counter() - start
                count += 1
                if model.is_end_of_generation(token):
                    break
                model.batch.clear()
                row = model.batch.add(token, pos, 0, True)
                start = time.perf_counter()
                assert model.decode() == 0
                decoding += time.perf_counter() - start
            chain.close()
            results[name] = {"tokens": count, "sample_ms": 1000 * sampling / count,
                             "worst_sample_ms": 1000 * worst,
                             "decode_ms": 1000 * decoding / max(1, count - 1),
                             "refusals": chain.refusals}
    finally:
        model.close()
    return results


def table(results: dict[str, Any], clients: int) -> str:
    rows = ["| request | tokens/s alone | end to end, alone | tokens/s per stream, "
            f"{clients} clients | aggregate tokens/s, {clients} clients | tokens per reply |",
            "|---|---:|---:|---:|---:|---|"]
    for name, entry in results.items():
        rows.append(f"| {name} | {statistics.median(entry['alone']):.1f} | "
                    f"{statistics.median(entry['alone_end_to_end']):.1f} | "
                    f"{statistics.median(entry['per_stream']):.1f} | "
                    f"{statistics.median(entry['aggregate']):.1f} | "
                    f"{min(entry['tokens'])}–{max(entry['tokens'])} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--story", choices=sorted(STORIES), default="flat",
                        help="the schema of the story field (see STORIES)")
    parser.add_argument("--out", type=Path, default=None, help="write the raw figures here")
    parser.add_argument("--sampler-only", action="store_true",
                        help="time the sampler chain against llama_decode, in-process")
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.grammar")
    if args.sampler_only:
        costs = sampler_cost(args.tokens)
        print("| request | tokens | grammar refusals | sampler ms/token | worst sample ms |"
              " llama_decode ms/token |\n|---|---:|---:|---:|---:|---:|")
        for name, c in costs.items():
            print(f"| {name} | {c['tokens']} | {c['refusals']} | {c['sample_ms']:.2f} | "
                  f"{c['worst_sample_ms']:.1f} | {c['decode_ms']:.2f} |")
        if args.out is not None:
            args.out.write_text(json.dumps({"provenance": origin, "costs": costs},
                                           indent=1) + "\n")
        return
    results = asyncio.run(measure(args.tokens, args.runs, args.clients, args.story))
    if args.out is not None:
        args.out.write_text(json.dumps({"provenance": origin, "results": results},
                                       indent=1) + "\n")
    print(table(results, args.clients))


if __name__ == "__main__":
    main()
