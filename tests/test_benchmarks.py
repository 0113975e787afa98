"""The benchmarks run end to end in their quickest form (real model, real servers, real HTTP).

These prove that the scripts work — servers start and stop, every stage produces its
figures, the JSON is written — not how fast anything is: speed lives in
benchmarks/RESULTS.md, never in an assertion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parent.parent
CHAT_STREAM = "chatstream_lite /chat_stream"
OPENAI = "chatstream_lite /v1/chat/completions"


def _run(module: str, *args: str, timeout: int = 800) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSTREAM_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_quick_stream_benchmark_measures_direct_and_chatstream_lite(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    result = _run("benchmarks.stream", "--quick", "--systems", "direct,chat_stream,openai",
                  "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    systems = document["systems"]

    direct, chat = systems["direct"], systems[CHAT_STREAM]
    for system in (direct, chat):
        assert system["status"] == "ok"
        assert system["errors"] == 0
        figures = system["figures"]
        assert all(tokens > 0 for tokens in figures["single_tokens"])
        assert figures["stream_tps"] > 0 and figures["ttft_p50_ms"] > 0
        assert figures["aggregate_tps_1"] > 0 and figures["aggregate_tps_2"] > 0
        assert figures["multiturn_ttft_last_ms"] > 0
        assert figures["long_prompt_ttft_ms"] > 0 and figures["wait_after_abort_ms"] > 0
        assert figures["rss_peak_mb"] > 0
        # The disconnect count is read back from the system itself (direct: its own
        # sampler; chatstream_lite: the server's per-request log line).
        assert figures["tokens_after_disconnect"] is not None
        assert figures["tokens_received_before_disconnect"] >= 2
    assert chat["same_text_as_direct"].endswith("/2")

    # Before the OpenAI route exists the column says why; after, it has figures.
    openai = systems[OPENAI]
    if openai["status"] == "n/a":
        assert "/v1/chat/completions" in openai["reason"] and "HTTP 404" in openai["reason"]
    else:
        assert openai["errors"] == 0 and openai["figures"]["stream_tps"] > 0

    table = document["table"]
    assert result.stdout.startswith(table)
    assert "| ≤ 1 token generated after a disconnect | chatstream_lite /chat_stream |" in (
        document["targets"])
    assert "| one stream, tokens/s |" in table and "×)" in table
    assert document["command"].startswith("python -m benchmarks.stream --quick")
    assert document["machine"]["nproc"] >= 1
    # Every process the benchmark started is gone once it returns.
    pids = [s["pid"] for s in systems.values() if "pid" in s]
    assert len(pids) == 3
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_quick_memory_benchmark_reports_both_targets(tmp_path: Path) -> None:
    output = tmp_path / "memory.json"
    result = _run("benchmarks.memory", "--quick", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())

    idle = document["idle"]
    assert idle["connections"] == 50
    assert idle["answered_early"] == 0 and idle["holders_still_running"]
    assert idle["rss_before_mb"] > 0 and idle["rss_after_mb"] > 0
    assert idle["met"] in (True, False)

    sequential = document["sequential"]
    assert sequential["failed_requests"] == 0
    assert sequential["rss_baseline_mb"] > 0 and sequential["rss_final_mb"] > 0
    assert [count for count, _ in sequential["rss_series_mb"]] == [20, 60]
    assert "idle queued connections" in result.stdout
