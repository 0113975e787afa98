"""The ceiling: llama-cpp-python's own `create_chat_completion(stream=True)` loop, in-process.

It runs in a child process of its own (`python -m benchmarks.direct ...`, started by
`benchmarks.stream`) so that its RSS is measured like a server's and a crash cannot take the
benchmark down. One `Llama` serves one request at a time, as the bindings allow: "concurrent
clients" wait in line for the single executor thread, so their first token includes the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from chatstream_lite.engine.llama.kernels import load_llama

from .clients import TokenSource
from .measure import Record, Tokenizer, peak_rss_mb, rss_mb
from .scenarios import STAGES, run_scenarios
from .workload import REPEAT_PENALTY, TEMPERATURE, Plan


class DirectTarget:
    """Users of one in-process `Llama`, served one at a time on one thread."""

    def __init__(self, llm: llama_cpp.Llama, tokenizer: Tokenizer) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.tokens: TokenSource = self  # the last disconnected request's own count
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct")
        self._last_generated: int | None = None

    def user(self, system: str | None = None) -> DirectUser:
        return DirectUser(self, system)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def marker(self) -> None:
        self._last_generated = None

    async def generated_since(self, marker: None) -> tuple[int | None, str]:
        return self._last_generated, "sampled tokens (logits processor)"

    def generate(self, messages: list[dict[str, str]], max_tokens: int,
                 close_after: int | None, record: Record) -> None:
        """On the executor thread: stream one reply into `record`, stopping like a client
        that leaves when `close_after` tokens have arrived."""
        sampled = 0

        def count(_ids: Any, scores: np.ndarray) -> np.ndarray:
            nonlocal sampled
            sampled += 1
            return scores

        stream = self.llm.create_chat_completion(
            messages,  # type: ignore[arg-type]
            stream=True, max_tokens=max_tokens, temperature=TEMPERATURE,
            repeat_penalty=REPEAT_PENALTY,
            # Counting costs a callback per token, so only the disconnect test pays for it.
            logits_processor=(llama_cpp.LogitsProcessorList([count])
                              if close_after is not None else None),
        )
        try:
            for chunk in stream:
                delta: Any = chunk["choices"][0]["delta"]  # type: ignore[index]
                record.add(delta.get("content") or "")
                if close_after is not None and self.tokenizer.count(record.text) >= close_after:
                    break
        except Exception as error:  # noqa: BLE001 - reported in the record, like a server's 500
            record.finish(f"{type(error).__name__}: {error}")
            return
        finally:
            stream.close()  # type: ignore[union-attr]
        if close_after is not None:
            self._last_generated = sampled
        record.finish()


class DirectUser:
    def __init__(self, target: DirectTarget, system: str | None) -> None:
        self._target = target
        self._messages = [{"role": "system", "content": system}] if system else []

    async def send(self, text: str, max_tokens: int, close_after: int | None = None) -> Record:
        messages = [*self._messages, {"role": "user", "content": text}]
        record = Record()
        await asyncio.get_running_loop().run_in_executor(
            self._target._executor, self._target.generate, messages, max_tokens, close_after,
            record)
        if record.ok:
            self._messages = [*messages, {"role": "assistant", "content": record.text}]
        return record

    async def close(self) -> None:
        return None


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.from_json(json.loads(args.plan))
    llm = load_llama(
        model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
        n_threads_batch=args.threads, n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers,
        flash_attn=args.flash_attn != "off",     # a bool here: llama.cpp's auto is on on a CPU
        verbose=False,
    )
    tokenizer = Tokenizer(args.model)
    target = DirectTarget(llm, tokenizer)
    loaded: dict[str, float | None] = {}

    def warmed_up() -> None:
        loaded["rss"] = rss_mb(os.getpid())

    try:
        raw = await run_scenarios(target, plan, tokenizer, tuple(args.stages.split(",")),
                                  say=lambda text: print(text, file=sys.stderr, flush=True),
                                  warmed_up=warmed_up)
    finally:
        await target.close()
    return {"raw": raw, "rss_loaded_mb": loaded.get("rss"), "rss_peak_mb": peak_rss_mb(os.getpid())}


def main() -> int:
    parser = argparse.ArgumentParser(description="benchmarks.stream's direct system (internal)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--n-ctx", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-batch", type=int, required=True)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="off")
    parser.add_argument("--plan", required=True, help="the Plan as JSON")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    result = asyncio.run(_main(args))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
