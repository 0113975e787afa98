"""This CPU, as the kernel decisions and fault messages name it: model name and flags.

    >>> cpu = Cpu.detect()
    >>> cpu.has("amx_tile"), cpu.describe()   # (True, "Intel(R) Xeon(R) ..., flags amx_tile ...")

llama.cpp picks its CPU kernels by instruction set (AVX2, AVX-512, AMX), so a fault or a
difference in replies is only meaningful with the flags beside it. Linux's /proc/cpuinfo
is read; elsewhere the flags are unknown (None) and callers assume the worse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CPUINFO", "Cpu", "NAMED_FLAGS"]

CPUINFO = Path("/proc/cpuinfo")
# The flags worth naming beside a kernel fault: the instruction sets ggml picks kernels by.
NAMED_FLAGS = ("amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512_vnni", "avx512_bf16",
               "avx2")


@dataclass(frozen=True)
class Cpu:
    name: str
    flags: frozenset[str] | None   # None: unknown (no /proc/cpuinfo)

    @classmethod
    def detect(cls, path: Path = CPUINFO) -> Cpu:
        """The first CPU's model name and flags (all cores of a machine share them)."""
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return cls("unknown CPU", None)
        flags = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
        name = re.search(r"^model name\s*:(.*)$", text, re.MULTILINE)
        return cls(name.group(1).strip() if name else "unknown CPU",
                   frozenset(flags.group(1).split()) if flags else None)

    def has(self, flag: str) -> bool | None:
        return None if self.flags is None else flag in self.flags

    def describe(self) -> str:
        """'Intel(R) Xeon(R) Processor, flags amx_tile amx_int8 ... avx2' for log lines."""
        if self.flags is None:
            return f"{self.name}, flags unknown"
        named = [flag for flag in NAMED_FLAGS if flag in self.flags]
        return f"{self.name}, flags {' '.join(named) or 'none of AVX2/AVX-512/AMX'}"
