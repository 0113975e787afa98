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
`AMX_INT8 = 1` and the CPU has AMX) and leaves them on everywhere else. What that costs:
CPU_REPACK speeds up reading prompts of Q4_0, Q4_K and IQ4_NL weights (1.5-2.5x in
llama.cpp's own figures), generation barely; it has no kernel for other types (the embedded
SmolLM2 is Q4_1: it loses nothing). A build without AMX keeps CPU_REPACK on such a CPU:
README, "CPUs with AMX".

`--extra-buffers on` uses them anyway (a llama.cpp with the fix); then, where AMX would run,
the self-check (`kernel_check.py`) decodes a batch in a child process first and falls back
to `off` if the child dies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ...cpu import Cpu
from ...settings import EXTRA_BUFFERS, KERNEL_CHECKS

__all__ = ["EXTRA_BUFFERS", "KERNEL_CHECKS", "KernelPolicy", "Machine", "choose"]

# What turning extra buffers off costs, said wherever the decision is logged.
COST = ("no weight repacking (CPU_REPACK): prompts of Q4_0, Q4_K and IQ4_NL weights are read "
        "1.5-2.5x slower, generation about the same; other weight types (the embedded "
        "SmolLM2's Q4_1) lose nothing")
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
