"""Which of llama.cpp's CPU kernels the model may use on this machine, decided before it loads.

    >>> machine = Machine.detect()            # this build's features and this CPU's flags
    >>> policy = choose(machine, extra_buffers="auto", kernel_check="auto")
    >>> policy.extra_buffers, policy.reason   # (False, "this llama.cpp build has AMX ...")

llama.cpp can place weights in "extra buffer types" at load: AMX (Intel's tile unit), then
CPU_REPACK (weights reordered for the AVX2/AVX-512 kernels). On a CPU with AMX, a
llama-cpp-python 0.3.x built natively (pip's default) compiles ggml's AMX kernels, and their
matrix product kills the process on the first batch of more than one token, the prompt: the
tile configuration it loads is not the one it meant (seen: SIGSEGV at `ldtilecfg` in
`ggml_backend_amx_mul_mat` on a Xeon with amx_tile, llama-cpp-python 0.3.36; SIGILL at
`tilezero` on another). llama.cpp offers one switch for it, `use_extra_bufts` in the model
parameters (llama-server's `--no-repack`), which turns off CPU_REPACK with AMX.

So `auto` turns extra buffers off exactly where the AMX path would run (the build reports
`AMX_INT8 = 1` and the CPU has AMX) and leaves them on everywhere else. What that costs is
CPU_REPACK, which has kernels for a few weight types only: measured (`COST`), Q4_0 loses
most, the embedded SmolLM2 (Q4_1) nothing. A build without AMX keeps CPU_REPACK on such a
CPU: README, "CPUs with AMX".

`--extra-buffers on` uses them anyway (a llama.cpp with the fix); then, where AMX would run,
the self-check (`kernel_check.py`) decodes a batch in a child process first and falls back
to `off` if the child dies.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, replace
from typing import Any

from ...config import EXTRA_BUFFERS, KERNEL_CHECKS
from ...cpu import Cpu

__all__ = ["EXTRA_BUFFERS", "KERNEL_CHECKS", "KernelPolicy", "Machine", "choose", "load_llama"]

# What turning extra buffers off costs, said wherever the decision is logged. Measured on a
# 2-core AVX-512 Xeon with SmolLM2-135M requantized (README "CPUs with AMX").
COST = ("no weight repacking (CPU_REPACK): Q4_0 weights read prompts 1.3x and generate 1.2x "
        "slower; Q4_K, Q8_0 and Q4_1 (the embedded SmolLM2) within 3 %")
REBUILD_HINT = ("README 'CPUs with AMX' gives the llama-cpp-python build that keeps "
                "CPU_REPACK without AMX")


@dataclass(frozen=True)
class Machine:
    """What decides the kernels: the llama.cpp build's features and the CPU's flags."""

    system_info: str   # llama_print_system_info(): "CPU : AVX2 = 1 | ... | AMX_INT8 = 1 | ..."
    cpu: Cpu

    @classmethod
    def detect(cls) -> Machine:
        import llama_cpp  # here, not at the top: the policy itself is tested without it

        return cls(llama_cpp.llama_print_system_info().decode(errors="replace"), Cpu.detect())

    @property
    def build_features(self) -> frozenset[str]:
        """The build's features that are on: {"AVX2", "AMX_INT8", "LLAMAFILE", ...}."""
        return frozenset(re.findall(r"(\w+) = 1", self.system_info))

    @property
    def build_has_amx(self) -> bool:
        return "AMX_INT8" in self.build_features

    @property
    def cpu_has_amx(self) -> bool:
        """True also where the flags cannot be read: assume the worse."""
        return self.cpu.has("amx_tile") is not False

    def describe_cpu(self) -> str:
        return self.cpu.describe()


@dataclass(frozen=True)
class KernelPolicy:
    extra_buffers: bool     # llama_model_params.use_extra_bufts
    check: bool             # decode a batch in a child process before serving
    reason: str             # why, for the log line at load

    def describe(self) -> str:
        cost = "" if self.extra_buffers else f". What it costs: {COST}"
        return (f"llama.cpp extra buffer types {'on' if self.extra_buffers else 'off'}: "
                f"{self.reason}{cost}")

    def without_extra_buffers(self, reason: str) -> KernelPolicy:
        return replace(self, extra_buffers=False, reason=reason)


def choose(machine: Machine, extra_buffers: str = "auto",
           kernel_check: str = "auto") -> KernelPolicy:
    """The kernels to load with; see the module docstring.

    `kernel_check`: `auto` checks only where the AMX path would run with extra buffers on (the
    one configuration known to fault), `on` always, `off` never.
    """
    if extra_buffers not in EXTRA_BUFFERS:
        raise ValueError(f"extra_buffers must be one of {', '.join(EXTRA_BUFFERS)}")
    if kernel_check not in KERNEL_CHECKS:
        raise ValueError(f"kernel_check must be one of {', '.join(KERNEL_CHECKS)}")
    amx_path = machine.build_has_amx and machine.cpu_has_amx
    if extra_buffers == "on":
        use, reason = True, "--extra-buffers on"
    elif extra_buffers == "off":
        use, reason = False, "--extra-buffers off"
    elif amx_path:
        use = False
        reason = ("this llama.cpp build has AMX kernels (AMX_INT8 = 1) and this CPU has AMX "
                  f"({machine.describe_cpu()}); ggml's AMX matrix product kills the process "
                  "on the first prompt there. --extra-buffers on uses them anyway, after a "
                  f"check in a child process; {REBUILD_HINT}")
    else:
        use = True
        reason = ("the default" if not machine.build_has_amx else
                  "this build has AMX kernels but this CPU has no AMX, so they never run")
    check = kernel_check == "on" or (kernel_check == "auto" and use and amx_path)
    return KernelPolicy(use, check, reason)


_patching = threading.Lock()


def load_llama(**kwargs: Any) -> Any:
    """`llama_cpp.Llama(**kwargs)`, loaded with this machine's `auto` extra buffers: the
    reference the tests and benchmarks compare with, as a user would run it where it runs.

    `Llama` has no argument for it (`use_extra_bufts=` disappears into its **kwargs), so its
    model parameters' defaults are swapped for the length of the load."""
    from llama_cpp import llama_cpp as raw
    from llama_cpp.llama import Llama

    if choose(Machine.detect()).extra_buffers:
        return Llama(**kwargs)
    with _patching:
        default = raw.llama_model_default_params

        def without_extra_buffers() -> Any:
            params = default()
            params.use_extra_bufts = False
            return params

        raw.llama_model_default_params = without_extra_buffers
        try:
            return Llama(**kwargs)
        finally:
            raw.llama_model_default_params = default
