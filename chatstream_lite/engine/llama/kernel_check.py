"""The kernel self-check: a child process loads the model and decodes a prompt-sized batch.

    >>> result = run_check(path, extra_buffers=True, n_threads=2, n_gpu_layers=0)
    >>> result.ok, result.describe()          # (False, "died of SIGSEGV (Segmentation fault)")
    >>> policy = settle(policy, machine, lambda extra: run_check(path, extra_buffers=extra, ...))

A CPU kernel that faults (`kernels.py`: ggml's AMX matrix product) kills its process with a
signal, not an exception: nothing in-process can catch it and go on. So the batch that would
fault is decoded first in a child process (`main` below, started by `run_check`),
with the model and the settings the server is about to load. If the child dies of a signal
with extra buffer types on, `settle` falls back to them off and checks that; if that dies too,
the server refuses to start with `KernelFault`, one line naming the signal, the CPU and what
to do. The check costs one more load of the model (the weights come from the page cache the
second time; README "CPUs with AMX" has the figures), so it runs only where a configuration
known to fault would be served, or when `--kernel-check on` asks for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import StartupError
from .kernels import REBUILD_HINT, KernelPolicy, Machine

__all__ = ["CheckResult", "KernelFault", "run_check", "settle"]

log = logging.getLogger(__name__)

# The child's context: small, one sequence; its batch is a prompt chunk's shape (more than
# one token per decode is what reaches the AMX path), then one generation step.
CHECK_N_CTX = 256
CHECK_BATCH_TOKENS = 32
# A child that has not finished by then is killed and the check counts as inconclusive.
CHECK_TIMEOUT = 300.0
CHILD = f"import sys; from {__name__} import main; sys.exit(main(sys.argv[1:]))"
TEXT = ("The quick brown fox jumps over the lazy dog while the cat watches from the warm "
        "windowsill, counting one, two, three, four, five, six, seven, eight, nine, ten.")


class KernelFault(StartupError):
    """llama.cpp's kernels die on this CPU in every configuration tried: the server cannot
    serve with this llama-cpp-python build."""


@dataclass(frozen=True)
class CheckResult:
    returncode: int | None   # None: timed out; < 0: killed by that signal
    seconds: float
    output: str = ""         # the end of the child's stderr, for the log

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode is not None and self.returncode < 0 else None

    def describe(self) -> str:
        if self.returncode is None:
            return f"did not finish within {CHECK_TIMEOUT:g} s"
        if self.signal is not None:
            return f"died of {signal_name(self.signal)}"
        return "decoded" if self.ok else f"exited with {self.returncode}: {self.output.strip()}"


Check = Callable[[bool], CheckResult]   # extra_buffers -> how the child fared


def settle(policy: KernelPolicy, machine: Machine, check: Check) -> KernelPolicy:
    """The policy the check allows: `policy`, or it without extra buffers; KernelFault when
    the child dies either way. A check that fails without a signal (a bad file, a timeout)
    does not decide: the model's own load says what is wrong."""
    first = check(policy.extra_buffers)
    if first.signal is None:
        _log_inconclusive(first)
        return policy
    config = "with extra buffer types" if policy.extra_buffers else "without extra buffer types"
    if policy.extra_buffers:
        log.error("the kernel check's child %s decoding a batch %s on this CPU (%s): serving "
                  "without extra buffer types", first.describe(), config,
                  machine.describe_cpu())
        fallback = policy.without_extra_buffers(
            f"the kernel check's child {first.describe()} with them on; {REBUILD_HINT}")
        second = check(False)
        if second.signal is None:
            _log_inconclusive(second)
            return fallback
        first, config = second, "with extra buffer types and without"
    raise KernelFault(
        f"llama.cpp's CPU kernels {first.describe()} decoding a batch {config} on this CPU "
        f"({machine.describe_cpu()}): this llama-cpp-python build cannot serve here. Rebuild "
        "it for this CPU without native detection (CMAKE_ARGS='-DGGML_NATIVE=OFF ...' pip "
        "install --force-reinstall --no-cache-dir llama-cpp-python); " + REBUILD_HINT)


def _log_inconclusive(result: CheckResult) -> None:
    if result.ok:
        log.info("kernel check: the child decoded a %d-token batch (%.2f s)",
                 CHECK_BATCH_TOKENS, result.seconds)
    else:
        log.warning("kernel check inconclusive (the child %s); loading anyway",
                    result.describe())


def run_check(model_path: Path, *, extra_buffers: bool, n_threads: int, n_gpu_layers: int,
              die_with: int | None = None, timeout: float = CHECK_TIMEOUT) -> CheckResult:
    """Run the child; blocks until it ends (call it off the event loop).

    `die_with`: the child kills itself with this signal where it would decode (the test
    hook `Faults.kernel_check_signal`; never set in production)."""
    # `-c`, not `-m`: running a module of an imported package as __main__ imports it twice.
    argv = [sys.executable, "-c", CHILD, str(model_path),
            "--extra-buffers", "1" if extra_buffers else "0",
            "--n-threads", str(n_threads), "--n-gpu-layers", str(n_gpu_layers)]
    if die_with is not None:
        argv += ["--die-with", str(die_with)]
    started = time.monotonic()
    try:
        child = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        return CheckResult(None, time.monotonic() - started)
    output = child.stderr.decode(errors="replace")[-2000:]
    return CheckResult(child.returncode, time.monotonic() - started, output)


def _child_env() -> dict[str, str]:
    """The child imports this very package (a checkout that is not installed included)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def signal_name(signum: int) -> str:
    """'SIGILL (Illegal instruction)'."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    description = signal.strsignal(signum)
    return f"{name} ({description})" if description else name


# -- the child ----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel_check")
    parser.add_argument("model", type=Path)
    parser.add_argument("--extra-buffers", type=int, choices=(0, 1), required=True)
    parser.add_argument("--n-threads", type=int, required=True)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--die-with", type=int, default=None)
    args = parser.parse_args(argv)

    from .model import Model  # imports llama_cpp: only in the child

    started = time.monotonic()
    model = Model.load(args.model, n_ctx=CHECK_N_CTX, n_batch=CHECK_BATCH_TOKENS, n_seq=1,
                       n_gpu_layers=args.n_gpu_layers, n_threads=args.n_threads,
                       verbose=False, extra_buffers=bool(args.extra_buffers))
    loaded = time.monotonic()
    try:
        tokens = model.vocabulary.tokenize(TEXT, special=False)[:CHECK_BATCH_TOKENS]
        for position, token in enumerate(tokens):
            model.batch.add(token, position, 0, position == len(tokens) - 1)
        if args.die_with is not None:
            os.kill(os.getpid(), args.die_with)   # where a faulting kernel would stop it
        status = model.decode()
        if status == 0:
            model.batch.clear()
            model.batch.add(tokens[0], len(tokens), 0, True)   # one generation step
            status = model.decode()
        if status != 0:
            print(f"llama_decode returned {status}", file=sys.stderr)
            return 3
    finally:
        model.close()
    print(json.dumps({"load_s": round(loaded - started, 3),
                      "decode_s": round(time.monotonic() - loaded, 3)}), file=sys.stderr)
    return 0


