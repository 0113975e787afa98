"""Where greedy text parts with the batch and with the prompt's pieces, on this CPU (issue 15).

    python -m benchmarks.determinism --no-speed               # the comparisons (2-4 min a setting)
    python -m benchmarks.determinism --ggml-lib DIR           # also against another ggml build
    python -m benchmarks.determinism --no-compare --ggml-lib DIR --threads 1   # speed (~7 min)

llama.cpp through llama-cpp-python's low-level API only (`benchmarks/lowlevel.py`), greedy,
the embedded SmolLM2-135M Q4_1. Each comparison feeds both sides the same tokens (the greedy
tokens of the reference run) and compares the logits of the same token: the largest
difference, whether every logit is bit-identical, and in how many of the 65 positions (the
prompt's last token, then 64 greedy steps) the greedy token agrees; the first position where
it does not is where free-running greedy text parts.

  kernels  ggml's mul_mat alone, no model: is column 0 of A·B the same when B has one column
           as when it has several? (F16 is the KV cache's type, Q8_0 the output matrix's,
           Q4_1 every other weight's.)
  a)       one sequence alone vs the same sequence decoded in one batch with 1, 3, 7 others
           (one token each per step); also its prompt decoded in the same call as a step of 7
           others (llama.cpp then splits the call into ubatches itself), and beside one
           other sequence of ~500 tokens (more KV cells to attend over).
  b)       a two-turn prompt decoded whole vs in 64- and 16-token chunks, vs a reused prefix
           (the first turn, then the rest), vs the same prefix whose reply was decoded one
           token at a time (as a reused previous turn was generated), vs one token at a time,
           vs all but the last token reused (the same prompt asked again).
  c)       a) and b) with one unified KV cache (`kv_unified=True`) instead of a KV stream per
           sequence (n_seq_max=8, 8 × 2048 cells either way); and there, the sequence alone
           but with its cells after 1 to 300 cells of another, idle, sequence.

for each setting: llama.cpp's defaults; weight repacking off (`use_extra_bufts=False`,
llama-server's `--no-repack`); flash attention on; and with `--ggml-lib DIR`, the defaults
against the ggml libraries in DIR (`LLAMA_CPP_LIB_PATH`), e.g. a CPU backend built with
`-DGGML_LLAMAFILE=OFF` (see benchmarks/RESULTS.md for the build). Then the speed of the
defaults against each setting named by `--speed` (medians of alternating rounds, each
setting in a fresh process): one stream's decode tokens/s, 8 sequences decoding together,
and prompt processing.

Every setting runs in a process of its own. The JSON goes to
benchmarks/results/determinism-<cpu>.json with the CPU, its instruction sets, the load
average before each run, the commit and llama-cpp-python's version.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from chatstream_lite.model_file import resolve_model_path

from .lowlevel import (
    CHAT,
    Ggml,
    LogCapture,
    Row,
    Session,
    Setting,
    cpu_slug,
    gguf_tensor_types,
    machine,
    user_turn,
)
from .provenance import provenance

RESULTS = Path(__file__).parent / "results"
STEPS = 64
N_SEQ = 8
N_CTX_SEQ = 2048

SETTINGS = {
    "defaults": Setting(),
    "no-repack": Setting("weight repacking off (use_extra_bufts=False)", repack=False),
    "flash-attn": Setting("flash attention on", flash_attn=True),
}

TARGET = "Explain what a CPU does."
OTHERS = ["Write a short poem about the sea.", "List three fruits and their colours.",
          "Tell me a story about a brave mouse.", "What is the capital of France?",
          "Give me three tips for learning to cook.", "Why is the sky blue?",
          "Describe a busy market in the morning."]
TURN_1 = "My name is Aiko and I like green tea. Tell me about the history of tea in Japan."
REPLY_1 = ("Tea came to Japan from China in the eighth century, brought back by Buddhist monks "
           "who drank it to stay awake during meditation. For centuries it was a rare "
           "medicine for nobles and priests. In the twelfth century the monk Eisai brought "
           "powdered green tea and wrote the first Japanese book about it, and by the "
           "sixteenth century Sen no Rikyu had shaped the tea ceremony that is still "
           "practised today.")
TURN_2 = "What is my name, and which tea do I like? Answer in one long paragraph."


# -- comparing logits --------------------------------------------------------------------------
def compare(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> dict[str, Any]:
    identical = [np.array_equal(a, b) for a, b in zip(reference, other, strict=False)]
    agree = [int(a.argmax()) == int(b.argmax()) for a, b in zip(reference, other, strict=False)]
    return {
        "bit_identical": all(identical),
        "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(reference, other, strict=False)),
        "greedy_agreement": f"{sum(agree)}/{len(agree)}",
        "first_logit_difference": next((i for i, same in enumerate(identical) if not same), None),
        "first_greedy_difference": next((i for i, same in enumerate(agree) if not same), None),
    }


def alone(session: Session, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """The reference: `prompt` decoded whole as sequence 0, then `steps` greedy tokens."""
    session.clear()
    logits = [session.prefill(prompt, seq=0)]
    tokens: list[int] = []
    for i in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits += session.decode([Row(tokens[-1], len(prompt) + i, 0, True)])
    return tokens, logits


def forced(session: Session, start: int, tokens: list[int], first: np.ndarray) -> list[np.ndarray]:
    """Sequence 0 fed the reference's greedy `tokens` from position `start`, alone."""
    logits = [first]
    for i, token in enumerate(tokens):
        logits += session.decode([Row(token, start + i, 0, True)])
    return logits


def batched(session: Session, prompt: list[int], tokens: list[int], others: list[list[int]],
            prompt_in_step: bool = False) -> list[np.ndarray]:
    """Sequence 0 fed the reference's tokens while sequences 1..k decode their own greedy
    tokens in the same `llama_decode` calls (one token each per step, ids in order)."""
    session.clear()
    position, last = {}, {}
    for seq, other in enumerate(others, start=1):
        last[seq] = session.prefill(other, seq=seq)
        position[seq] = len(other)

    def step_of_others() -> list[Row]:
        return [Row(int(last[s].argmax()), position[s], s, True) for s in sorted(last)]

    def advance(out: list[np.ndarray]) -> None:
        for s, logits in zip(sorted(last), out, strict=False):
            last[s] = logits
            position[s] += 1

    if prompt_in_step:
        out = session.decode([Row(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)]
                             + step_of_others())
        mine = [out[0]]
        advance(out[1:])
    else:
        mine = [session.prefill(prompt, seq=0)]
    for i, token in enumerate(tokens):
        out = session.decode([Row(token, len(prompt) + i, 0, True)] + step_of_others())
        mine.append(out[0])
        advance(out[1:])
    return mine


def compare_batches(session: Session) -> dict[str, Any]:
    prompt = session.tokenize(CHAT + user_turn(TARGET))
    others = [session.tokenize(CHAT + user_turn(text)) for text in OTHERS]
    tokens, reference = alone(session, prompt, STEPS)
    rows = {f"with {k} other{'s' if k > 1 else ''}": compare(
        reference, batched(session, prompt, tokens, others[:k])) for k in (1, 3, 7)}
    rows["prompt in the same call as a step of 7 others"] = compare(
        reference, batched(session, prompt, tokens, others, prompt_in_step=True))
    # A long neighbour makes llama.cpp attend over more cells (n_kv is padded to 256 and is
    # the largest of the streams in the ubatch): 768 here against 256 alone.
    long_other = session.tokenize(CHAT + user_turn(REPLY_1 * 6))
    rows[f"with 1 other of {len(long_other)} tokens"] = compare(
        reference, batched(session, prompt, tokens, [long_other]))
    repeat = alone(session, prompt, STEPS)[1]
    rows["alone again (run-to-run)"] = compare(reference, repeat)
    return {"prompt_tokens": len(prompt), "text": session.model.detokenize(tokens).decode(
        "utf-8", "replace"), "comparisons": rows}


def compare_pieces(session: Session) -> dict[str, Any]:
    first = session.tokenize(CHAT + user_turn(TURN_1))
    reply = session.tokenize(REPLY_1 + "<|im_end|>\n")
    rest = session.tokenize(user_turn(TURN_2))
    prompt = first + reply + rest
    tokens, reference = alone(session, prompt, STEPS)

    def pieces(sizes: list[int]) -> list[np.ndarray]:
        """`prompt` decoded as consecutive calls of `sizes` tokens, then the forced steps."""
        assert sum(sizes) == len(prompt)
        session.clear()
        begin, logits = 0, None
        for size in sizes:
            logits = session.prefill(prompt[begin:begin + size], seq=0, start=begin)
            begin += size
        assert logits is not None
        return forced(session, len(prompt), tokens, logits)

    def chunks(size: int) -> list[int]:
        return [min(size, len(prompt) - b) for b in range(0, len(prompt), size)]

    rows = {
        "64-token chunks": compare(reference, pieces(chunks(64))),
        "16-token chunks": compare(reference, pieces(chunks(16))),
        "reused prefix (first turn), then the rest": compare(
            reference, pieces([len(first) + len(reply), len(rest)])),
        "reused prefix whose reply was decoded one token at a time": compare(
            reference, pieces([len(first)] + [1] * len(reply) + [len(rest)])),
        "one token at a time": compare(reference, pieces(chunks(1))),
        # The same prompt again: a cache keeps all of it but the last token, which must be
        # decoded again for its logits, now alone.
        "reused prefix of all but the last token": compare(
            reference, pieces([len(prompt) - 1, 1])),
    }
    rows["whole again (run-to-run)"] = compare(reference, pieces([len(prompt)]))
    return {"prompt_tokens": len(prompt), "reused_prefix_tokens": len(first) + len(reply),
            "comparisons": rows}


def compare_placement(session: Session) -> dict[str, Any]:
    """The sequence alone, but its cells placed after `offset` cells that another, idle,
    sequence holds: only a unified cache can place a sequence anywhere but at cell 0."""
    prompt = session.tokenize(CHAT + user_turn(TARGET))
    tokens, reference = alone(session, prompt, STEPS)
    filler = session.tokenize(REPLY_1 * 8)
    rows = {}
    for offset in (8, 296, 1, 13, 300):
        session.clear()
        session.prefill(filler[:offset], seq=1)
        first = session.prefill(prompt, seq=0)
        rows[f"alone, after {offset} cells of an idle sequence"] = compare(
            reference, forced(session, len(prompt), tokens, first))
    return {"comparisons": rows}


def kernels() -> dict[str, Any]:
    """Column 0 of A·B with B of 1 column against B of 2, 3, 4, 8 columns, in ggml alone."""
    ggml = Ggml()
    rng = np.random.default_rng(15)
    cases = {
        "F16 (64 x 256): K·q, one head": (Ggml.F16, 256, 64),
        "F16 (256 x 64): V·softmax, one head": (Ggml.F16, 64, 256),
        "F32 (256 x 64)": (Ggml.F32, 64, 256),
        "Q8_0 (576 x 4096): the output matrix's type": (Ggml.Q8_0, 4096, 576),
        "Q4_1 (576 x 1536): every other weight's type": (Ggml.Q4_1, 1536, 576),
    }
    out = {}
    for name, (kind, m, k) in cases.items():
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((8, k)).astype(np.float32)
        one = ggml.mul_mat(kind, a, b[:1])[0]
        out[name] = {f"{n} columns": ("identical" if np.array_equal(one, column) else
                                      f"differs, max |d| {float(np.abs(one - column).max()):.3g}")
                     for n in (2, 3, 4, 8) for column in [ggml.mul_mat(kind, a, b[:n])[0]]}
    return out


def run_comparisons(model: Path, setting: Setting) -> dict[str, Any]:
    result: dict[str, Any] = {"setting": setting.to_json(), "machine": machine(),
                              "kernels": kernels()}
    for label, unified in (("per-sequence KV streams", False), ("unified KV cache", True)):
        with LogCapture() as log:
            session = Session(model, setting, n_seq=N_SEQ, n_ctx_seq=N_CTX_SEQ, unified=unified)
        # Which buffers llama.cpp put the weights in: a CPU_REPACK buffer would mean repacked
        # weights (and their own gemm/gemv kernels).
        result.setdefault("load_log", log.matching("- type ", "CPU_REPACK", "buffer size"))
        try:
            result[label] = {"batched vs alone": compare_batches(session),
                             "pieces vs whole": compare_pieces(session)}
            if unified:
                result[label]["cell placement"] = compare_placement(session)
        finally:
            session.close()
    return result


# -- speed -------------------------------------------------------------------------------------
SPEED_TOKENS = 128
PROMPT_TOKENS = 512


class Clock:
    """Wall time and this process's CPU time between `start()` and `rates(n)`. On cores shared
    with other work the wall-clock rate follows the neighbours; tokens per CPU-second (the
    process's own threads) is the steadier measure of what a kernel costs."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, tokens: int) -> tuple[float, float]:
        return (tokens / (time.perf_counter() - self.wall),
                tokens / (time.process_time() - self.cpu))


KERNEL_CASES = {
    # decoding 8 sequences: the output matrix (Q8_0, the tied embeddings) for 8 rows
    "output matrix (Q8_0 49152 x 576) for 8 tokens": (Ggml.Q8_0, 49152, 576, 8),
    # a 512-token prompt, one query head of one layer (9 heads, 30 layers): K·q, V·softmax
    "K·q of one head, 512-token prompt (F16 512 x 64, 512 columns)": (Ggml.F16, 512, 64, 512),
    "V·softmax of one head, 512-token prompt (F16 64 x 512, 512 columns)": (Ggml.F16, 64, 512, 512),
    # the same kernel in both builds, as a check of the method: one layer's FFN up projection
    "check, same kernel in both: FFN up of one layer, 512 tokens (Q4_1 1536 x 576)": (Ggml.Q4_1, 1536, 576, 512),
}


def kernel_costs(other_cpu_backend: str, turns: int = 30) -> dict[str, dict[str, float]]:
    """The products whose kernel llamafile's sgemm provides, in the bundled CPU backend and in
    `other_cpu_backend` (a folder with another libggml-cpu.so), both loaded in this process and
    run in turn, one thread, the fastest of `turns` each, in ms. On cores shared with other
    work, the fastest run is the one nothing interrupted, and taking turns spreads any drift
    over both alike."""
    builds = {"bundled": Ggml(), "other": Ggml(other_cpu_backend)}
    rng = np.random.default_rng(15)
    out = {}
    for name, (kind, m, k, n) in KERNEL_CASES.items():
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((n, k)).astype(np.float32)
        products = {build: ggml.product(kind, a, b) for build, ggml in builds.items()}
        fastest = {build: float("inf") for build in builds}
        try:
            for _ in range(turns):
                for build, product in products.items():
                    fastest[build] = min(fastest[build], product.run(threads=1))
        finally:
            for product in products.values():
                product.close()
        out[name] = {f"{build}, ms": 1000 * seconds for build, seconds in fastest.items()}
        out[name]["other / bundled"] = fastest["other"] / fastest["bundled"]
    return out


def run_speed(model: Path, setting: Setting, repeats: int = 2) -> dict[str, float]:
    """One round: decode rate of one stream and of 8 sequences together, prompt rate; each the
    best of `repeats` (on shared cores the slower repeats measure the neighbours)."""
    session = Session(model, setting, n_seq=N_SEQ, n_ctx_seq=N_CTX_SEQ, unified=False)
    clock = Clock()
    best: dict[str, float] = collections.defaultdict(float)

    def keep(name: str, rates: tuple[float, float]) -> None:
        best[f"{name}, tokens/s"] = max(best[f"{name}, tokens/s"], rates[0])
        best[f"{name}, tokens per CPU-second"] = max(best[f"{name}, tokens per CPU-second"], rates[1])

    try:
        prompts = [session.tokenize(CHAT + user_turn(text)) for text in [TARGET] + OTHERS]
        long_prompt = (session.tokenize(CHAT + user_turn(TURN_1 + " " + REPLY_1 * 8)))[:PROMPT_TOKENS]
        alone(session, prompts[0], 16)                                     # warm-up
        for _ in range(repeats):
            clock.start()
            alone(session, prompts[0], SPEED_TOKENS)                       # its ~35-token prompt included
            keep("one stream", clock.rates(SPEED_TOKENS))

            session.clear()
            last = {s: session.prefill(p, seq=s) for s, p in enumerate(prompts)}
            position = {s: len(p) for s, p in enumerate(prompts)}
            clock.start()
            for _ in range(SPEED_TOKENS // 2):
                logits = session.decode([Row(int(last[s].argmax()), position[s], s, True) for s in last])
                for s, row in zip(sorted(last), logits, strict=False):
                    last[s], position[s] = row, position[s] + 1
            keep("8 sequences together", clock.rates(N_SEQ * (SPEED_TOKENS // 2)))

            session.clear()
            clock.start()
            session.prefill(long_prompt, seq=0)
            keep(f"prompt processing ({len(long_prompt)} tokens)", clock.rates(len(long_prompt)))
        return dict(best)
    finally:
        session.close()


# -- the parent: one process per setting -------------------------------------------------------
def child(args: argparse.Namespace, what: str, key: str, lib: str | None) -> dict[str, Any]:
    env = dict(os.environ)
    # The logits do not depend on how idle threads wait, but on 2 cores shared with other work
    # OpenMP's spinning threads fight the other processes: a comparison took 13 minutes
    # instead of 2, and a speed round several times its quiet length. The same for every variant.
    env.setdefault("OMP_WAIT_POLICY", "passive")
    if lib:
        env["LLAMA_CPP_LIB_PATH"] = lib
    command = [sys.executable, "-m", "benchmarks.determinism", "--child", what, "--setting", key,
               "--model", str(args.model), "--threads", str(args.threads if what == "speed" else 0)]
    if what == "kernel-costs":
        command += ["--other-cpu-backend", args.ggml_lib]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{what} {key}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def variants(args: argparse.Namespace) -> dict[str, tuple[str, str | None]]:
    """name -> (setting key, ggml library folder or None for the bundled one)."""
    found: dict[str, tuple[str, str | None]] = {key: (key, None) for key in SETTINGS}
    if args.ggml_lib:
        found[f"defaults, {args.ggml_lib_name}"] = ("defaults", args.ggml_lib)
    return found


def table(results: dict[str, Any]) -> str:
    lines = [("| setting | KV | comparison | bit-identical | max abs diff | greedy agreement "
              "| first greedy difference |"), "|---|---|---|---|---:|---:|---:|"]
    for name, result in results.items():
        for kv in ("per-sequence KV streams", "unified KV cache"):
            for group in ("batched vs alone", "pieces vs whole", "cell placement"):
                for what, row in result[kv].get(group, {"comparisons": {}})["comparisons"].items():
                    lines.append(f"| {name} | {kv} | {what} | {'yes' if row['bit_identical'] else 'no'} "
                                 f"| {row['max_abs_diff']:.3g} | {row['greedy_agreement']} "
                                 f"| {'-' if row['first_greedy_difference'] is None else row['first_greedy_difference']} |")
    return "\n".join(lines)


def kernel_table(results: dict[str, Any]) -> str:
    lines = ["| ggml build | A (M x K) | B of 2 columns | 3 | 4 | 8 |", "|---|---|---|---|---|---|"]
    seen = set()
    for name, result in results.items():
        lib = result["machine"]["ggml_lib"]
        if lib in seen:
            continue
        seen.add(lib)
        for case, row in result["kernels"].items():
            lines.append(f"| {name} | {case} | " + " | ".join(row.values()) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--ggml-lib", help="a folder of ggml/llama libraries to compare too")
    parser.add_argument("--ggml-lib-name", default="ggml built with -DGGML_LLAMAFILE=OFF")
    parser.add_argument("--speed", nargs="*", default=None,
                        help="variants to time against the defaults (default: all but repack)")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-compare", action="store_true",
                        help="time only; keep the comparisons already in the output file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for the speed runs (0: every core). On cores shared with "
                             "other work 1 gives steadier ratios: no thread waits for another")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", nargs="*", help="compare only these variants")
    parser.add_argument("--child", choices=("compare", "speed", "kernel-costs"), help=argparse.SUPPRESS)
    parser.add_argument("--other-cpu-backend", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = resolve_model_path(args.model)
    if args.child == "kernel-costs":
        print(json.dumps(kernel_costs(args.other_cpu_backend)))
        return 0
    if args.child:
        run = run_comparisons if args.child == "compare" else run_speed
        print(json.dumps(run(args.model, replace(SETTINGS[args.setting], threads=args.threads))))
        return 0

    found = variants(args)
    if args.only:
        found = {name: found[name] for name in args.only}
    out = args.out or RESULTS / f"determinism-{cpu_slug()}.json"
    origin = provenance(sys.argv[1:], "benchmarks.determinism")
    report: dict[str, Any] = {"provenance": origin, "machine": machine(), "model": args.model.name,
                              "gguf_tensor_types": gguf_tensor_types(args.model),
                              "steps": STEPS, "n_seq_max": N_SEQ, "n_ctx_per_sequence": N_CTX_SEQ,
                              "comparisons": {}, "speed": {}}
    if args.no_compare and out.exists():
        kept = json.loads(out.read_text())
        report["comparisons"] = kept["comparisons"]
        report["comparisons_machine"] = kept.get("comparisons_machine", kept["machine"])
        report["comparisons_provenance"] = kept.get("comparisons_provenance",
                                                    kept.get("provenance"))
    else:
        report["comparisons_machine"] = report["machine"]
        report["comparisons_provenance"] = origin
    print(json.dumps(report["machine"], indent=1), "\n", report["gguf_tensor_types"], flush=True)

    if not args.no_compare:
        for name, (key, lib) in found.items():
            load = os.getloadavg()
            result = child(args, "compare", key, lib)
            result["load_average_before"] = load
            report["comparisons"][name] = result
            print(f"compared: {name} (load before {load[0]:.2f})", flush=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    if report["comparisons"]:
        print(kernel_table(report["comparisons"]) + "\n\n" + table(report["comparisons"]),
              flush=True)

    if not args.no_speed and args.ggml_lib:
        load = os.getloadavg()
        report["kernel_costs"] = child(args, "kernel-costs", "defaults", None)
        report["kernel_costs_load_average_before"] = load
        print("\n| product | bundled, ms | " + args.ggml_lib_name + ", ms | ratio |\n|---|---:|---:|---:|")
        for name, row in report["kernel_costs"].items():
            print(f"| {name} | {row['bundled, ms']:.2f} | {row['other, ms']:.2f} | {row['other / bundled']:.2f} |")
        out.write_text(json.dumps(report, indent=1) + "\n")

    if not args.no_speed:
        timed = ["defaults"] + [name for name in (args.speed if args.speed is not None else
                                                  [n for n in found if n not in ("defaults", "no-repack")])
                                if name != "defaults"]
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in timed}
        loads = []
        for round_ in range(args.rounds):
            order = timed if round_ % 2 == 0 else timed[::-1]
            for name in order:
                loads.append(os.getloadavg()[0])
                key, lib = found[name]
                rounds[name].append(child(args, "speed", key, lib))
                print(f"round {round_ + 1}, {name}: {rounds[name][-1]}", flush=True)
        for name, runs in rounds.items():
            report["speed"][name] = {
                figure: {"median": statistics.median(r[figure] for r in runs),
                         "min": min(r[figure] for r in runs), "max": max(r[figure] for r in runs)}
                for figure in runs[0]}
        report["speed_rounds"] = rounds
        report["speed_threads"] = args.threads or len(os.sched_getaffinity(0))
        report["speed_load_averages"] = loads
        figures = list(next(iter(report["speed"].values())))
        print("\n| variant | " + " | ".join(figures) + " |\n|---|" + "---:|" * len(figures))
        for name, row in report["speed"].items():
            print(f"| {name} | " + " | ".join(
                f"{row[f]['median']:.1f} ({row[f]['min']:.1f}-{row[f]['max']:.1f})" for f in figures) + " |")
        out.write_text(json.dumps(report, indent=1) + "\n")
    if not (args.no_compare and args.no_speed):
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
