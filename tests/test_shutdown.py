"""SIGTERM with a stream in flight: 503 for newcomers, the stream finishes (or is ended
cleanly after the grace period), the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import aiohttp
import pytest

from .conftest import start_cli

pytestmark = [pytest.mark.timeout(600), pytest.mark.model]

STORY = {"user_input": "Write a very long story about a dragon.", "temperature": 0.0,
         "repeat_penalty": 1.0}


async def _start(grace: float) -> tuple[subprocess.Popen[str], str]:
    return await start_cli("--n-ctx", "2048", "--max-new-tokens", "1000",
                           "--shutdown-grace", str(grace))


async def _until_draining(url: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as client:
        while True:
            async with client.get(f"{url}/health") as health:
                if (await health.json())["engine"] == "draining":
                    return
            assert asyncio.get_running_loop().time() < deadline, "SIGTERM never drained"
            await asyncio.sleep(0.05)


async def _new_request_during_shutdown(url: str) -> tuple[int, dict[str, str], int, str]:
    async with aiohttp.ClientSession() as other:
        async with other.post(f"{url}/chat_stream", json={"user_input": "Hi"}) as response:
            status, error = response.status, await response.json()
        async with other.get(f"{url}/health") as health:
            return status, error, health.status, (await health.json())["engine"]


async def test_sigterm_lets_a_running_stream_finish_and_refuses_new_requests() -> None:
    process, url = await _start(grace=300)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{url}/chat_stream", json={**STORY, "max_new_tokens": 60}) as response:
                assert response.status == 200
                first = await response.content.readany()
                process.send_signal(signal.SIGTERM)
                await _until_draining(url)      # the signal handled, however loaded the machine
                status, error, health_status, engine_state = await _new_request_during_shutdown(url)
                rest = await response.read()  # the whole reply, ended cleanly
        assert first and rest
        assert status == 503 and error["error"] == "service_unavailable"
        assert health_status == 503 and engine_state == "draining"
        assert process.wait(timeout=300) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.communicate()[0]
    assert "shutting down" in log
    assert log.index("shutting down") < log.index("status=success")
    assert "tokens=60" in log


async def test_streams_still_running_after_the_grace_period_are_ended_cleanly() -> None:
    process, url = await _start(grace=1)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{url}/chat_stream", json={**STORY, "max_new_tokens": 1000}) as response:
                assert await response.content.readany()
                process.send_signal(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()  # cut off: the reply is visibly incomplete
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.communicate()[0]
    assert "still running after 1.0s; cancelling" in log
    assert "status=unknown_error_occurred" in log and "stopped" in log
