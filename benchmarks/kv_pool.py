"""A KV stream per sequence against one unified KV pool, at equal capacity (issue 15).

    python -m benchmarks.kv_pool                 # 3 alternating rounds, ~4 minutes on 2 cores
    python -m benchmarks.kv_pool --threads 1     # steadier where other work shares the cores

Both layouts hold 8 × 2048 = 16,384 KV cells for `n_seq_max=8` sequences:
  per-sequence streams  kv_unified=False: each sequence owns 2048 cells (chatstream_lite's
                        layout, llama-server without --kv-unified);
  unified pool          kv_unified=True: all 16,384 cells shared, as llama-server --kv-unified.
Measured, each layout in a fresh process, alternating, `--rounds` times:
  - RSS after warm-up (8 short prompts decoded, 8 tokens each) and after the generation run;
  - generation tokens/s with 8 sequences decoding together (8 prompts of ~35 tokens, 200
    greedy tokens each, one token per sequence per `llama_decode`);
and once per layout, also in a fresh process: the longest single conversation that fits,
by decoding one sequence in 512-token chunks until llama.cpp refuses (per-sequence streams:
expected at 2048) or `--long` tokens are in (unified: more than 2048 proves the point).
llama.cpp's own buffer sizes (KV, compute) are read from its load log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chatstream_lite.model_file import resolve_model_path

from .determinism import OTHERS, REPLY_1, TARGET
from .lowlevel import CHAT, LogCapture, Row, Session, Setting, cpu_slug, machine, user_turn
from .measure import rss_mb
from .provenance import provenance

RESULTS = Path(__file__).parent / "results"
N_SEQ = 8
N_CTX_SEQ = 2048
TOKENS = 200
LAYOUTS = {"per-sequence streams": False, "unified pool": True}


def open_session(model: Path, unified: bool, threads: int) -> tuple[Session, list[str]]:
    with LogCapture() as log:
        session = Session(model, Setting(threads=threads), n_seq=N_SEQ, n_ctx_seq=N_CTX_SEQ,
                          unified=unified)
    return session, log.matching("KV buffer size", "compute buffer size", "output buffer size")


def run_generation(model: Path, unified: bool, threads: int) -> dict[str, Any]:
    session, buffers = open_session(model, unified, threads)
    try:
        prompts = [session.tokenize(CHAT + user_turn(text)) for text in [TARGET] + OTHERS]
        rates = {}
        for label, steps in (("warm-up", 8), ("run", TOKENS)):
            session.clear()
            last = {s: session.prefill(p, seq=s) for s, p in enumerate(prompts)}
            position = {s: len(p) for s, p in enumerate(prompts)}
            began = time.perf_counter()
            for _ in range(steps):
                out = session.decode([Row(int(last[s].argmax()), position[s], s, True)
                                      for s in sorted(last)])
                for s, logits in zip(sorted(last), out, strict=False):
                    last[s], position[s] = logits, position[s] + 1
            rates[label] = N_SEQ * steps / (time.perf_counter() - began)
            if label == "warm-up":
                rss_warm = rss_mb(os.getpid())
        return {"generation tokens/s (8 sequences)": rates["run"],
                "RSS after warm-up, MiB": rss_warm,
                "RSS after the run, MiB": rss_mb(os.getpid()),
                "prompt_tokens": [len(p) for p in prompts], "llama_buffers": buffers}
    finally:
        session.close()


def run_capacity(model: Path, unified: bool, longest: int, threads: int) -> dict[str, Any]:
    """Decode one long conversation as sequence 0 until it is refused or `longest` tokens are in."""
    session, buffers = open_session(model, unified, threads)
    try:
        text = CHAT + user_turn(REPLY_1 * 200)
        tokens = session.tokenize(text)[:longest]
        done, refused = 0, None
        began = time.perf_counter()
        while done < len(tokens):
            piece = tokens[done:done + 512]
            try:
                session.decode([Row(t, done + i, 0, i == len(piece) - 1) for i, t in enumerate(piece)])
            except RuntimeError as error:       # llama_decode returned 1: no room for the chunk
                refused = str(error)
                # The chunk did not fit whole; find how much of it does, one token at a time.
                session.forget(0, start=done)
                for _i, t in enumerate(piece):
                    try:
                        session.decode([Row(t, done, 0, True)])
                    except RuntimeError:
                        break
                    done += 1
                break
            done += len(piece)
        return {"tokens_decoded": done, "refused": refused, "tried": len(tokens),
                "seconds": time.perf_counter() - began, "llama_buffers": buffers}
    finally:
        session.close()


def child(model: Path, what: str, layout: str, longest: int, threads: int) -> dict[str, Any]:
    # Idle OpenMP threads sleep instead of spinning: on cores shared with other work spinning
    # threads fight the other processes (see benchmarks.determinism). Both layouts alike.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kv_pool", "--child", what,
                          "--layout", layout, "--model", str(model), "--long", str(longest),
                          "--threads", str(threads)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{what} {layout}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long", type=int, default=3072,
                        help="tokens to try in one conversation (more than 2048)")
    parser.add_argument("--threads", type=int, default=0,
                        help="llama.cpp threads (0: every core; 1 is steadier on shared cores)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=("generation", "capacity"), help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = resolve_model_path(args.model)
    if args.child == "generation":
        print(json.dumps(run_generation(model, LAYOUTS[args.layout], args.threads)))
        return 0
    if args.child == "capacity":
        print(json.dumps(run_capacity(model, LAYOUTS[args.layout], args.long, args.threads)))
        return 0

    report: dict[str, Any] = {"provenance": provenance(sys.argv[1:], "benchmarks.kv_pool"),
                              "machine": machine(), "model": model.name, "n_seq_max": N_SEQ,
                              "cells": N_SEQ * N_CTX_SEQ, "generated_per_sequence": TOKENS,
                              "threads": args.threads or len(os.sched_getaffinity(0)),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "passive"),
                              "rounds": {name: [] for name in LAYOUTS}, "loads": []}
    for round_ in range(args.rounds):
        for name in (list(LAYOUTS) if round_ % 2 == 0 else list(LAYOUTS)[::-1]):
            report["loads"].append(os.getloadavg()[0])
            result = child(model, "generation", name, args.long, args.threads)
            report["rounds"][name].append(result)
            print(f"round {round_ + 1}, {name}: {result['generation tokens/s (8 sequences)']:.1f} "
                  f"tokens/s, RSS {result['RSS after warm-up, MiB']:.0f} MiB", flush=True)
    report["capacity"] = {}
    for name in LAYOUTS:
        report["loads"].append(os.getloadavg()[0])
        report["capacity"][name] = child(model, "capacity", name, args.long, args.threads)
        print(f"{name}: one conversation of {report['capacity'][name]['tokens_decoded']} tokens "
              f"fits (tried {report['capacity'][name]['tried']})", flush=True)

    figures = ("generation tokens/s (8 sequences)", "RSS after warm-up, MiB", "RSS after the run, MiB")
    report["summary"] = {name: {figure: {"median": statistics.median(r[figure] for r in runs),
                                         "min": min(r[figure] for r in runs),
                                         "max": max(r[figure] for r in runs)} for figure in figures}
                         for name, runs in report["rounds"].items()}
    print("\n| layout | " + " | ".join(figures) + " | longest conversation that fit, tokens |")
    print("|---|" + "---:|" * (len(figures) + 1))
    for name, row in report["summary"].items():
        capacity = report["capacity"][name]
        fits = f"{capacity['tokens_decoded']}" + (" (refused there)" if capacity["refused"] else
                                                  f" (all {capacity['tried']} tried)")
        print(f"| {name} | " + " | ".join(f"{row[f]['median']:.1f} ({row[f]['min']:.1f}-{row[f]['max']:.1f})"
                                        for f in figures) + f" | {fits} |")
    out = args.out or RESULTS / f"kv-pool-{cpu_slug()}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
