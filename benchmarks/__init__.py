"""Benchmarks for chatstream_lite: side-by-side streaming figures and memory targets.

    python -m benchmarks.stream            # direct vs chatstream_lite vs the peers (issue 4)
    python -m benchmarks.stream --quick    # a smoke run (a few minutes)
    python -m benchmarks.memory            # idle queued connections, RSS drift over requests
    python -m benchmarks.determinism       # where greedy text parts with batching/chunking (issue 15)
    python -m benchmarks.kv_pool           # per-sequence KV streams against one unified pool

Figures, machines and commands are kept in benchmarks/RESULTS.md; what the profiler showed
and the hypotheses for the engine are in benchmarks/NOTES.md. Nothing here is imported by
the package itself, and nothing here is a timed test.
"""
