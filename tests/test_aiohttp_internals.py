"""The aiohttp internals the connection guard relies on are where it expects them: an
aiohttp whose internals moved fails here, loudly, instead of while serving."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from chatstream_lite.server import aiohttp_internals

pytestmark = pytest.mark.timeout(30)


def test_this_aiohttp_is_the_one_the_guard_was_written_for() -> None:
    assert aiohttp.__version__.startswith(aiohttp_internals.TESTED + ".")
    aiohttp_internals.check()


def test_a_moved_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(web.Server, "_make_request")
    monkeypatch.setattr(aiohttp_internals, "_init_assignments", lambda cls: set())
    with pytest.raises(RuntimeError, match=r"web\.Server\._make_request.*web\.BaseSite\._runner"):
        aiohttp_internals.check()
