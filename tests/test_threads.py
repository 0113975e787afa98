"""The default thread count: one per physical core the process may use (as llama.cpp's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chatstream_lite.engine.llama.threads import default_threads

pytestmark = pytest.mark.timeout(10)


def _sysfs(root: Path, topology: dict[int, tuple[int, int]]) -> Path:
    """A /sys/devices/system/cpu with `cpu: (package, core)`."""
    for cpu, (package, core) in topology.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def test_hardware_threads_of_one_core_count_once(tmp_path: Path) -> None:
    # 4 cores with 2 hardware threads each (Linux numbers the siblings n and n + 4).
    sysfs = _sysfs(tmp_path, {cpu: (0, cpu % 4) for cpu in range(8)})
    assert default_threads(set(range(8)), sysfs) == 4
    assert default_threads({0, 4}, sysfs) == 1            # pinned to one core's two threads
    assert default_threads({0, 1, 4}, sysfs) == 2


def test_cores_of_two_packages_are_distinct(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)})
    assert default_threads({0, 1, 2, 3}, sysfs) == 4


def test_without_a_readable_topology_every_cpu_counts(tmp_path: Path) -> None:
    assert default_threads({0, 1, 2}, tmp_path) == 3
    assert default_threads(set(), tmp_path) == 1


def test_this_machine_gets_at_least_one_and_at_most_its_cpus() -> None:
    assert 1 <= default_threads() <= len(os.sched_getaffinity(0))
