"""Direct's first token with and without the previous prompt's cells: what "direct" measures.

    python -m benchmarks.direct_prefix                 # 3 rounds of 5 prompts, each way

`benchmarks.stream`'s direct system is llama-cpp-python's `create_chat_completion` on one
`Llama`, one request after another. `Llama` keeps the last prompt's KV and re-evaluates only
from the first token that differs, so each request reuses the chat template's opening (for
SmolLM2: its default system turn) from the request before. A server's fresh session has no
such cells of its own. This times the first token both ways, alternating: as direct runs
(reuse) and after `Llama.reset()` (a fresh context, as a new session starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import llama_cpp

from chatstream_lite import default_model_path
from chatstream_lite.engine.llama.kernels import load_llama

from .provenance import provenance
from .workload import PROMPTS, REPEAT_PENALTY, TEMPERATURE

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "direct-prefix-latest.json"


def first_token_ms(llm: llama_cpp.Llama, prompt: str, fresh: bool) -> float:
    if fresh:
        llm.reset()
    start = time.perf_counter()
    stream = llm.create_chat_completion([{"role": "user", "content": prompt}], stream=True,
                                        max_tokens=4, temperature=TEMPERATURE,
                                        repeat_penalty=REPEAT_PENALTY)
    try:
        for chunk in stream:
            if chunk["choices"][0]["delta"].get("content"):  # type: ignore[index]
                return 1000 * (time.perf_counter() - start)
    finally:
        stream.close()  # type: ignore[union-attr]
    raise RuntimeError("no content in the reply")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.direct_prefix",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.direct_prefix")
    llm = load_llama(model_path=str(default_model_path()), n_ctx=4096,
                     n_threads=args.threads, n_batch=512, verbose=False)
    times: dict[str, list[float]] = {"reuse": [], "fresh": []}
    try:
        # Warm-up on a prompt not timed below (a prompt just seen would be reused whole).
        first_token_ms(llm, PROMPTS[-1], fresh=True)
        for _ in range(args.rounds):
            for way in times:
                for prompt in PROMPTS[:args.prompts]:
                    times[way].append(first_token_ms(llm, prompt, fresh=way == "fresh"))
    finally:
        llm.close()
    summary = {way: {"p50_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
               for way, v in times.items()}
    for way, figures in summary.items():
        print(f"{way}: first token p50 {figures['p50_ms']:.1f} ms "
              f"[{figures['min_ms']:.1f}-{figures['max_ms']:.1f}]")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"provenance": origin, "summary": summary,
                                       "times_ms": times}, indent=1))
    print(f"results: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
