"""The model loads and generates whichever of aiohttp and llama_cpp is imported first.

Issue 14, section 1: on a GPU machine's image, `import aiohttp` before `import llama_cpp`
crashed llama.cpp's model load (SIGSEGV in `init_tokenizer`), so `python -m chatstream_lite`
exited with -11 and so would any app that embeds ChatStream after `from aiohttp import web`.
Each case runs in a fresh interpreter (an import order can only be tried once per process),
and a crash is its exit code, not a failed assertion inside the test process.

On a CPU build these pass; they are the crash test that benchmarks/gpu/run.sh runs on a CUDA
build with every layer offloaded: CHATSTREAM_TEST_N_GPU_LAYERS=-1 (default 0).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from .conftest import GREEDY, ROOT, start_cli, subprocess_env

pytestmark = [pytest.mark.timeout(180), pytest.mark.model]

N_GPU_LAYERS = int(os.environ.get("CHATSTREAM_TEST_N_GPU_LAYERS", "0"))


def _probe(order: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "benchmarks.import_probe", "--order", order,
         "--n-gpu-layers", str(N_GPU_LAYERS), "--tokens", "4"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=150)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return result, (json.loads(lines[-1]) if lines else {})


@pytest.mark.parametrize("order", ["aiohttp-first", "llama-first"])
def test_the_model_loads_and_generates_whatever_was_imported_first(order: str) -> None:
    result, report = _probe(order)
    # -11 is the crash of issue 14: the native stack is in stderr (faulthandler).
    assert result.returncode == 0, (result.returncode, result.stderr[-4000:])
    assert report["order"] == order and report["n_gpu_layers"] == N_GPU_LAYERS
    assert isinstance(report["text"], str) and report["text"].strip()


def test_both_orders_give_the_same_greedy_text() -> None:
    texts = {order: _probe(order)[1].get("text") for order in ("aiohttp-first", "llama-first")}
    assert texts["aiohttp-first"] and texts["aiohttp-first"] == texts["llama-first"], texts


async def test_the_server_imports_aiohttp_first_and_still_loads_the_model_and_streams() -> None:
    # `python -m chatstream_lite` is the embedding case: aiohttp.web is imported by the
    # package before the engine loads llama_cpp. This run crashed with -11 on the GPU image.
    process, url = await start_cli("--n-gpu-layers", str(N_GPU_LAYERS), "--n-ctx", "512")
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(url + "/chat_stream", json={
                    "user_input": "Say hello.", "max_new_tokens": 4, **GREEDY}) as response:
                assert response.status == 200
                assert (await response.text()).strip()
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output[-4000:]
