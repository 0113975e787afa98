"""Where the engine thread's time goes, as /metrics reports it: real model, real HTTP."""

from __future__ import annotations

import time

import pytest

from chatstream_lite import ChatStream

from .conftest import GREEDY, build_full_app, post_chat, sample, scrape, serve

pytestmark = [pytest.mark.timeout(120), pytest.mark.model]

PHASES = ("decode", "sample", "handoff", "other")


async def test_metrics_split_the_engine_threads_time_by_phase(model_path: str) -> None:
    async for server in serve(ChatStream(model_path, n_ctx=512, max_new_tokens=16),
                              build_full_app):
        before = await scrape(server)
        assert all(sample(before, "chatstream_engine_seconds_total", phase=phase) == 0
                   for phase in PHASES)
        began = time.monotonic()
        async with server.client() as client:
            status, text = await post_chat(client, user_input="Count to ten.", **GREEDY)
        wall = time.monotonic() - began
        assert status == 200 and text
        after = await scrape(server)
        seconds = {phase: sample(after, "chatstream_engine_seconds_total", phase=phase)
                   for phase in PHASES}
        # A prompt and up to 16 tokens were decoded and sampled: time in both, and all of it
        # within the request's own wall time.
        assert seconds["decode"] > 0 and seconds["sample"] > 0 and seconds["handoff"] > 0
        assert sum(seconds.values()) <= wall
        assert seconds["decode"] > seconds["sample"]
