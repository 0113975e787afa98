"""A short soak (benchmarks/soak.py runs the long one): no lost callbacks, no 5xx."""

from __future__ import annotations

import pytest

from benchmarks.soak import run_soak
from chatstream_lite import ChatStream

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_short_soak_loses_no_callback(model_path: str, concurrency: int) -> None:
    chat_stream = ChatStream(model_path, n_ctx=512, max_new_tokens=2, max_queue_size=8)
    report = await run_soak(chat_stream, requests=40, concurrency=concurrency)
    assert report.http_statuses == {200: 40}
    assert report.statuses == {"success": 40}
    assert report.lost_callbacks == 0
