"""What copying one sequence's KV cells to another costs, each way, by how many it holds.

    python -m benchmarks.kv_copy                  # 50 / 250 / 1,000 / 4,000 cells, 5 each

A new session borrows a shared prefix from another slot, and each extra choice (n > 1)
starts from a copy of the prompt (`Model.copy`). With a KV stream per sequence, llama.cpp's
`llama_memory_seq_cp` copies the whole stream (all n_ctx cells, at the next decode); the
per-sequence state (`llama_state_seq_get_data` then `..._set_data`) moves only the cells the
source holds. Both are timed as a borrower meets them: copy, keep 20 positions, decode one
token; against decoding that token alone. The ratio of the two per-cell costs is
`STATE_COPY_CELL_COST` in chatstream_lite/engine/llama/model.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from chatstream_lite import default_model_path
from chatstream_lite.engine.llama import model as model_module
from chatstream_lite.engine.llama.model import Model

from .provenance import provenance

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "kv-copy-latest.json"
KEEP = 20


def _decode(model: Model, seq_id: int, start: int, tokens: list[int]) -> None:
    for offset in range(0, len(tokens), 512):
        part = tokens[offset:offset + 512]
        model.batch.clear()
        for i, token in enumerate(part):
            model.batch.add(token, start + offset + i, seq_id, i == len(part) - 1)
        if model.decode() != 0:
            raise RuntimeError("llama_decode failed")


def _timed(model: Model, cells: int, way: str, text: list[int]) -> float:
    """Milliseconds for: copy seq 0 to seq 1 (`way`), keep KEEP positions, decode a token."""
    model.forget(1)
    before = dict(model.copies)
    start = time.perf_counter()
    if way != "none":
        # Model.copy's choice, forced: a cost of 0 always copies by cells, a huge one never.
        chosen, model_module.STATE_COPY_CELL_COST = model_module.STATE_COPY_CELL_COST, \
            (10**9 if way == "stream" else 0)
        try:
            model.copy(0, 1, cells)
        finally:
            model_module.STATE_COPY_CELL_COST = chosen
        if model.copies[way] != before[way] + 1:
            raise RuntimeError(f"the copy was not made by {way}")
    if way == "none":
        _decode(model, 1, 0, text[:KEEP])   # untimed: the prefix without a copy
        start = time.perf_counter()
    else:
        model.forget(1, KEEP)
    _decode(model, 1, KEEP, text[KEEP:KEEP + 1])
    return 1000 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_copy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="50,250,1000,4000")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    origin = provenance(argv, "benchmarks.kv_copy")
    sizes = [int(c) for c in args.cells.split(",")]
    if max(sizes) > args.n_ctx:
        parser.error("--cells must not exceed --n-ctx")
    model = Model.load(default_model_path(), n_ctx=args.n_ctx, n_batch=512, n_seq=2,
                       n_gpu_layers=0, n_threads=args.threads, verbose=False)
    text = model.vocabulary.tokenize("Once upon a time " * (args.n_ctx // 2), special=False)
    rows = []
    try:
        for cells in sizes:
            model.forget(0)
            _decode(model, 0, 0, text[:cells])
            times: dict[str, list[float]] = {"stream": [], "cells": [], "none": []}
            for _ in range(args.repeats):
                for way in times:   # alternating: drift hits each way alike
                    times[way].append(_timed(model, cells, way, text))
            row = {"cells": cells, **{f"{way}_ms": statistics.median(v) for way, v in times.items()},
                   "times_ms": times}
            rows.append(row)
            print(f"{cells:>5} cells: stream copy {row['stream_ms'] - row['none_ms']:6.1f} ms, "
                  f"by cells {row['cells_ms'] - row['none_ms']:6.1f} ms "
                  f"(medians, over decoding one token: {row['none_ms']:.1f} ms)")
    finally:
        model.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"provenance": origin, "n_ctx": args.n_ctx,
                                       "rows": rows}, indent=1))
    print(f"results: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
