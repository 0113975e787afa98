"""The vendored browser libraries are exactly the files their README names (sha256), so a
stray edit, or an update that forgot the table, fails here rather than in a browser."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(10)

VENDOR = Path(__file__).resolve().parent.parent / "chatstream_lite" / "static" / "vendor"


def test_every_vendored_file_matches_its_recorded_sha256() -> None:
    table = (VENDOR / "README.md").read_text(encoding="utf-8")
    recorded = dict(re.findall(r"^\| `([\w.]+\.js)` \|.*\| `([0-9a-f]{64})` \|$", table, re.M))
    shipped = {path.name for path in VENDOR.glob("*.js")}
    assert recorded and set(recorded) == shipped, (recorded, shipped)
    for name, digest in recorded.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
