"""How many threads llama.cpp gets when the user does not say: one per physical core.

    >>> default_threads()            # 8 on a machine with 8 cores and 16 hardware threads

llama.cpp's own default (`cpu_get_num_math`) counts physical cores, not hardware threads: two
threads on one core share its vector units, so the second adds little to a matrix product and
takes the core's other half from everything else (here: the event loop and the clients'
sockets). On a machine without SMT, such as the 2-vCPU one the CPU figures come from, this is
every core, as before. Only the cores this process may run on count (`taskset`, cgroups).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SYSFS_CPUS", "default_threads"]

SYSFS_CPUS = Path("/sys/devices/system/cpu")


def default_threads(cpus: set[int] | None = None, sysfs: Path = SYSFS_CPUS) -> int:
    """Physical cores among `cpus` (default: the ones this process may use); where the
    topology cannot be read, every one of them counts."""
    allowed = os.sched_getaffinity(0) if cpus is None else cpus
    cores: set[tuple[str, str]] = set()
    for cpu in allowed:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(allowed))
        cores.add((package, core))
    return max(1, len(cores))
