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


def _kinds(story: str) -> list[tuple[str, dict[str, Any], str]]:
    """Each kind of request under each grammar engine (free text once)."""
    kinds: list[tuple[str, dict[str, Any], str]] = []
    for name, extra in formats(story).items():
        for engine in ENGINES if extra else ENGINES[:1]:
            kinds.append((f"{name}, {engine}" if extra else name, extra, engine))
    return kinds


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
            for _, extra, _engine in _kinds(story):      # warm-up (llguidance's tokenizer)
                await one_stream(session, url, 4, extra)
            for _ in range(runs):      # alternate, so that drift hits all alike
                for name, extra, _engine in _kinds(story):
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
# The grammar engine. llama.cpp's own was measured against llguidance in one run before it
# was deleted (results/grammar-engines-epyc.json, RESULTS.md "Constrained decoding");
# the figures keep an engine key so that later engines can be compared the same way.
ENGINES = ("llguidance",)


def schema_cases() -> list[tuple[str, Any]]:
    """(name, what makes its grammar): a JSON Schema text, a forced tool call's request, or
    ("hermes", a request) for the Hermes format's grammar."""
    from chatstream_lite.server.openai.tool_formats import Tool, ToolRequest

    cases: list[tuple[str, Any]] = []
    for story_name, story in STORIES.items():
        schema = {"type": "object", "required": ["story"], "additionalProperties": False,
                  "properties": {"story": story}}
        cases.append((f"json_schema ({story_name})", json.dumps(schema)))
        # The generic tool format's grammar for a forced call of one tool (the prompt
        # stays the plain one, so the model's first picks are refused more often than
        # with the tool-describing system turn a real request has).
        cases.append((f"forced tool call ({story_name})",
                      ToolRequest((Tool("tell_story", schema),), "required", "tell_story")))
        # tool_choice "auto" under a Hermes template: the lazy grammar lets text through
        # until `<tool_call>`; on this plain prompt the model writes no call, so this is
        # what "auto" costs a reply that calls no tool.
        cases.append((f"hermes auto, no call ({story_name})",
                      ("hermes", ToolRequest((Tool("tell_story", schema),), "auto"))))
    # Patterns llama.cpp's grammar engine could read in many ways at once (one sampling step
    # under these took 0.6 s, 44 s and over 5 minutes there, before its regex automaton).
    for pattern in AMBIGUOUS_PATTERNS:
        cases.append((f"pattern {pattern}", json.dumps({"type": "string", "pattern": pattern})))
    return cases


def make_grammar(engine: str, source: Any) -> str:
    """The grammar `source` asks for, made by `engine`'s path (as a request worker makes it)."""
    from chatstream_lite.engine.llama import grammar as grammar_module
    from chatstream_lite.server.openai.tool_formats import HermesFormat, ToolFormat

    if isinstance(source, str):
        return grammar_module.json_grammar(source)
    if isinstance(source, tuple):                  # ("hermes", its request)
        made = HermesFormat().grammar(source[1], grammar_module.json_grammar)
        assert made is not None
        return made
    made = ToolFormat().grammar(source, grammar_module.json_grammar)
    assert made is not None
    return made


def forget_grammars() -> None:
    """Empty the caches of compiled grammars: the next compile is cold."""
    from chatstream_lite.engine.llama import guidance

    guidance._recent.clear()
    guidance._matchers.clear()


def sampler_cost(tokens: int, rounds: int) -> dict[str, Any]:
    """Per engine and case: milliseconds per token spent in the sampler chain (grammar
    included) and in `llama_decode`, one sequence, no HTTP (the grammar's own cost, apart
    from the machine's decode speed and other load: both are timed in the same loop); and
    what making the grammar costs a request worker, cold and from the cache, and building
    the sequence's grammar sampler costs the engine thread. The engines alternate within
    each round."""
    from chatstream_lite.engine import SamplingParams
    from chatstream_lite.engine.llama import guidance
    from chatstream_lite.engine.llama.model import Model
    from chatstream_lite.engine.llama.sampler import SamplerChain

    model = Model.load(default_model_path(), n_ctx=1024, n_batch=512, n_seq=1, n_gpu_layers=0,
                       n_threads=len(__import__("os").sched_getaffinity(0)), verbose=False)
    prompt = model.vocabulary.tokenize(
        "<|im_start|>user\n" + MESSAGES[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n",
        special=True)
    start = time.perf_counter()
    guidance.vocabulary(model.path or default_model_path())
    results: dict[str, Any] = {"tokenizer_s": time.perf_counter() - start}
    try:
        cases = [("free text", None), *schema_cases()]
        for _ in range(rounds):
            for name, source in cases:
                for engine in ENGINES if source is not None else ENGINES[:1]:
                    entry = results.setdefault(engine, {}).setdefault(name, {
                        "compile_cold_ms": [], "compile_cached_ms": [], "setup_ms": [],
                        "sample_ms": [], "worst_sample_ms": [], "decode_ms": [],
                        "tokens": [], "refusals": []})
                    grammar = None
                    if source is not None:
                        forget_grammars()
                        begin = time.perf_counter()
                        grammar = make_grammar(engine, source)
                        entry["compile_cold_ms"].append(1000 * (time.perf_counter() - begin))
                        begin = time.perf_counter()
                        make_grammar(engine, source)
                        entry["compile_cached_ms"].append(1000 * (time.perf_counter() - begin))
                    begin = time.perf_counter()
                    chain = SamplerChain(SamplingParams(temperature=0.0, repeat_penalty=1.0,
                                                        grammar=grammar),
                                         model.n_vocab, model.guidance_vocab)
                    entry["setup_ms"].append(1000 * (time.perf_counter() - begin))
                    _generate(model, prompt, chain, tokens, entry)
                    chain.close()
    finally:
        model.close()
    return results


def _generate(model: Any, prompt: list[int], chain: Any, tokens: int,
              entry: dict[str, list[float]]) -> None:
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
    entry["tokens"].append(count)
    entry["sample_ms"].append(1000 * sampling / count)
    entry["worst_sample_ms"].append(1000 * worst)
    entry["decode_ms"].append(1000 * decoding / max(1, count - 1))
    entry["refusals"].append(chain.refusals)


def sampler_table(costs: dict[str, Any]) -> str:
    rows = ["| request | engine | tokens | refusals | sampler ms/token | worst sample ms | "
            "llama_decode ms/token | grammar compile ms, cold | cached | sampler setup ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = list(costs[ENGINES[0]])
    for name in names:
        for engine in ENGINES:
            c = costs.get(engine, {}).get(name)
            if c is None:
                continue
            med = {k: statistics.median(v) if v else float("nan") for k, v in c.items()}
            rows.append(f"| {name} | {engine if name != 'free text' else '-'} | "
                        f"{int(med['tokens'])} | {int(med['refusals'])} | "
                        f"{med['sample_ms']:.2f} | {med['worst_sample_ms']:.1f} | "
                        f"{med['decode_ms']:.2f} | {med['compile_cold_ms']:.1f} | "
                        f"{med['compile_cached_ms']:.2f} | {med['setup_ms']:.1f} |")
    return "\n".join(rows)


def draw_schemas(count: int) -> list[Any]:
    """`count` schemas of the schema fuzz test's strategy (tests/test_fuzz.py `schemas`), one
    fixed draw: both engines get the same list."""
    from hypothesis import HealthCheck, given, settings

    from tests.test_fuzz import schemas

    drawn: list[Any] = []

    @settings(max_examples=count, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, derandomize=True)
    @given(schema=schemas)
    def collect(schema: Any) -> None:
        drawn.append(schema)

    collect()
    return drawn


async def fuzz(count: int) -> dict[str, Any]:
    """The schema fuzz test's property, schema by schema, under each engine (alternating):
    a 200 or a 400, never a 5xx or a stall; a reply that stops validates; one cut by
    max_tokens is the start of a JSON value. Counts of each outcome, and request times."""
    import jsonschema

    from tests.conftest import json_prefix
    from tests.test_fuzz import SCHEMA_NEW_TOKENS, SCHEMA_STALL

    drawn = draw_schemas(count)
    chat_stream = ChatStream(default_model_path(), n_ctx=512, max_new_tokens=SCHEMA_NEW_TOKENS)
    runner = web.AppRunner(create_app(chat_stream))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}/v1/chat/completions"
    results: dict[str, Any] = {e: {"outcomes": {}, "seconds": [], "failures": []}
                               for e in ENGINES}
    timeout = aiohttp.ClientTimeout(total=SCHEMA_STALL)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for schema in drawn:
                for engine in ENGINES:
                    entry = results[engine]
                    body = {"messages": [{"role": "user", "content": "Answer in JSON."}],
                            "temperature": 0, "response_format": {
                                "type": "json_schema",
                                "json_schema": {"name": "x", "schema": schema}}}
                    start = time.monotonic()
                    try:
                        async with session.post(url, json=body) as response:
                            status, payload = response.status, await response.text()
                    except asyncio.TimeoutError:
                        status, payload = 0, ""
                    entry["seconds"].append(time.monotonic() - start)
                    outcome = _outcome(status, payload, schema, json_prefix, jsonschema)
                    entry["outcomes"][outcome] = entry["outcomes"].get(outcome, 0) + 1
                    if outcome not in ("rejected", "stop, valid", "length, a JSON prefix"):
                        entry["failures"].append({"schema": schema, "outcome": outcome,
                                                  "reply": payload[:300]})
    finally:
        await runner.cleanup()
    for entry in results.values():
        entry["passed"] = count - len(entry["failures"])
    return {"schemas": count, "engines": results}


def fuzz_table(outcome: dict[str, Any]) -> str:
    rows = ["| engine | property held | outcomes | request s, median | worst |",
            "|---|---:|---|---:|---:|"]
    for engine, entry in outcome["engines"].items():
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(entry["outcomes"].items()))
        rows.append(f"| {engine} | {entry['passed']}/{outcome['schemas']} | {kinds} | "
                    f"{statistics.median(entry['seconds']):.2f} | "
                    f"{max(entry['seconds']):.1f} |")
    return "\n".join(rows)


def _outcome(status: int, payload: str, schema: Any, json_prefix: Any, jsonschema: Any) -> str:
    if status == 0:
        return "stall"
    if status == 400:
        return "rejected"
    if status != 200:
        return f"status {status}"
    choice = json.loads(payload)["choices"][0]
    content = choice["message"]["content"] or ""
    if choice["finish_reason"] == "stop":
        try:
            jsonschema.validate(json.loads(content), schema)
        except ValueError:
            return "stop, not JSON"
        except jsonschema.ValidationError:
            return "stop, invalid"
        except jsonschema.SchemaError:
            return "stop, a schema jsonschema refuses"
        return "stop, valid"
    if choice["finish_reason"] == "length":
        return "length, a JSON prefix" if json_prefix(content) else "length, not JSON"
    return f"finish {choice['finish_reason']}"


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
    parser.add_argument("--fuzz", type=int, default=0, metavar="N",
                        help="the schema fuzz test's property on N drawn schemas, per engine")
    parser.add_argument("--compare", action="store_true",
                        help="all of it in one run, both engines: --sampler-only, the HTTP "
                             "rates (--story) and --fuzz (120 schemas unless given)")
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.grammar")
    if args.compare:
        costs = sampler_cost(args.tokens, args.runs)
        print(sampler_table(costs))
        rates = asyncio.run(measure(args.tokens, args.runs, args.clients, args.story))
        print(table(rates, args.clients))
        outcome = asyncio.run(fuzz(args.fuzz or 120))
        print(fuzz_table(outcome))
        if args.out is not None:
            args.out.write_text(json.dumps({"provenance": origin, "costs": costs,
                                            "results": rates, "fuzz": outcome},
                                           indent=1) + "\n")
        return
    if args.fuzz:
        outcome = asyncio.run(fuzz(args.fuzz))
        print(fuzz_table(outcome))
        if args.out is not None:
            args.out.write_text(json.dumps({"provenance": origin, **outcome}, indent=1) + "\n")
        return
    if args.sampler_only:
        costs = sampler_cost(args.tokens, args.runs)
        print(sampler_table(costs))
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
