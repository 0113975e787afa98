"""The benchmarks run end to end in their quickest form (real model, real servers, real HTTP).

These prove that the scripts work — servers start and stop, every stage produces its
figures, the JSON is written — not how fast anything is: speed lives in
benchmarks/RESULTS.md, never in an assertion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import ceiling, servers
from benchmarks.report import Figure, markdown_table
from benchmarks.scale_out import access_log, nginx_config, sessions_on_one_replica
from benchmarks.stream import combine, rotations

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
        assert figures["tokens_after_disconnect"] <= 1
        assert figures["tokens_received_before_disconnect"] >= 2
    assert chat["same_text_as_direct"] == "2/2"

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
    _check_provenance(document, "benchmarks.stream")
    assert document["rounds"] == 1 and document["complete"]      # --quick: one round
    # Every process the benchmark started is gone once it returns.
    pids = [pid for s in systems.values() for pid in s.get("pids", [])]
    assert len(pids) == 3
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def _check_provenance(document: dict[str, object], module: str) -> None:
    """What every results JSON must say about where its figures come from (issue 14)."""
    origin = document["provenance"]
    assert isinstance(origin, dict)
    assert origin["command"].startswith(f"python -m {module}")
    assert len(origin["commit"]) == 40 and isinstance(origin["dirty"], bool)
    assert len(origin["loadavg_before"]) == 3
    assert origin["cpu"]["model"] and origin["cpu"]["usable_cores"] >= 1
    assert isinstance(origin["cpu"]["simd"], list)


def test_the_systems_alternate_in_rounds_and_figures_are_medians_with_their_spread(
        tmp_path: Path) -> None:
    output = tmp_path / "rounds.json"
    result = _run("benchmarks.stream", "--quick", "--rounds", "3", "--systems",
                  "direct,chat_stream", "--stages", "single", "--threads", "1",
                  "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    direct, chat = "direct", CHAT_STREAM
    assert document["order"] == [[direct, chat], [chat, direct], [direct, chat]]
    assert document["rounds_done"] == 3 and document["complete"]
    for name in (direct, chat):
        system = document["systems"][name]
        assert system["rounds_ok"] == 3 and len(system["rounds"]) == 3
        rates = sorted(r["figures"]["stream_tps"] for r in system["rounds"])
        assert system["figures"]["stream_tps"] == rates[1]           # the median of three
        assert system["spread"]["stream_tps"] == [rates[0], rates[2]]
        assert [r["round"] for r in system["rounds"]] == [1, 2, 3]
        assert all(len(r["loadavg_before"]) == 3 for r in system["rounds"])
    assert chat_cell_has_spread(document["table"])
    assert document["systems"][chat]["same_text_as_direct"].endswith("/6")


def chat_cell_has_spread(table: str) -> bool:
    row = next(line for line in table.splitlines() if line.startswith("| one stream, tokens/s"))
    return row.count("[") == 2 and "–" in row


def test_thread_variants_are_columns_of_their_own_and_the_busy_loop_is_stopped(
        tmp_path: Path) -> None:
    output = tmp_path / "shared.json"
    result = _run("benchmarks.stream", "--quick", "--systems", "chat_stream", "--stages",
                  "single", "--threads", "2,1", "--busy", "1", "--busy-pin",
                  # 2 threads beside a pinned busy loop crawl (that is what the option
                  # measures); 4 tokens keep this smoke run short.
                  "--max-tokens", "4", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    assert list(document["systems"]) == [f"{CHAT_STREAM} @2t", f"{CHAT_STREAM} @1t"]
    busy = document["busy"]
    assert busy["processes"] == 1 and busy["pinned"] and len(busy["pids"]) == 1
    assert document["settings"]["threads"] == [2, 1]
    assert "chatstream_lite /chat_stream @1t" in document["targets"]
    assert not Path(f"/proc/{busy['pids'][0]}").exists(), "the busy loop outlived the benchmark"


def test_rounds_rotate_and_combine_takes_medians_of_numbers_only() -> None:
    assert rotations(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"],
                                             ["c", "a", "b"], ["a", "b", "c"]]
    rounds = [{"status": "ok", "errors": 0, "pid": i, "figures": {"x": x, "tokens": [x]}}
              for i, x in enumerate([3.0, 1.0, 2.0])]
    rounds.append({"status": "n/a", "reason": "did not start"})
    combined = combine(rounds)
    assert combined["figures"] == {"x": 2.0, "tokens": [3.0]}
    assert combined["spread"] == {"x": [1.0, 3.0]} and combined["rounds_ok"] == 3
    table = markdown_table({"direct": combined}, [Figure("x", "x")])
    assert "| x | 2.0 [1.0–3.0] |" in table
    assert combine([{"status": "n/a", "reason": "no binary"}])["status"] == "n/a"


BATCHED_BENCH_OUTPUT = """
main: n_kv_max = 3760, n_batch = 512, n_ubatch = 512, flash_attn = 0, is_pp_shared = 0

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    35 |    200 |    1 |    235 |    0.120 |   291.67 |    1.600 |   125.00 |    1.720 |   136.63 |
|    35 |    200 |    8 |   1880 |    0.700 |   400.00 |    8.000 |   200.00 |    8.700 |   216.09 |

llama_perf_context_print: ...
"""


def test_the_ceiling_parses_llama_batched_bench_and_names_figures_like_the_report() -> None:
    rows = ceiling.parse(BATCHED_BENCH_OUTPUT)
    assert [row["b"] for row in rows] == [1.0, 8.0]
    figures = ceiling.figures(rows)
    assert figures["aggregate_tps_8"] == 200.0 and figures["stream_tps"] == 125.0
    assert figures["end_to_end_tps_8"] == pytest.approx(8 * 200 / 8.7)
    argv = ceiling.command("llama-batched-bench", Path("m.gguf"), threads=2)
    assert argv[argv.index("-npl") + 1] == "1,8,16" and argv[argv.index("-c") + 1] == "3760"
    assert argv[argv.index("-fa") + 1] == "off"


def test_llama_batched_bench_runs_as_the_ceiling(tmp_path: Path) -> None:
    binary, why = ceiling.find_batched_bench()
    if binary is None:
        pytest.skip(why)
    output = tmp_path / "ceiling.json"
    result = _run("benchmarks.ceiling", "--rounds", "1", "--threads", "1", "--reply-tokens",
                  "16", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    _check_provenance(document, "benchmarks.ceiling")
    assert document["figures"]["aggregate_tps_8"] > 0
    assert document["figures"]["aggregate_tps_16"] > document["figures"]["aggregate_tps_1"]


def test_memory_at_equal_capacity_compares_ours_with_llama_server(tmp_path: Path) -> None:
    binary, why = servers.find_llama_server(None)
    if binary is None:
        pytest.skip(why)
    output = tmp_path / "capacity.json"
    result = _run("benchmarks.memory", "--only", "capacity", "--rounds", "1", "--parallel", "2",
                  "--n-ctx", "512", "--threads", "1", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    _check_provenance(document, "benchmarks.memory")
    systems = document["capacity"]["systems"]
    assert systems["chatstream_lite"]["layout"] == "--num-of-concurrent-executions 2 --n-ctx 512"
    assert systems["llama-server per-slot"]["layout"] == "-c 1024 -np 2 --no-kv-unified"
    assert systems["llama-server unified"]["layout"] == "-c 1024 -np 2 --kv-unified"
    assert all(s["status"] == "ok" and s["rss_loaded_mb"] > 0 for s in systems.values())


@pytest.mark.parametrize("policy", ["session_hash", "least_conn"])
def test_the_scale_out_example_renders_to_a_config_nginx_accepts(
        policy: str, tmp_path: Path) -> None:
    text = nginx_config(18080, [18081, 18082], tmp_path, policy=policy)
    assert ("hash $chatstream_route consistent;" in text) == (policy == "session_hash")
    assert ("        least_conn;\n" in text) == (policy == "least_conn")
    assert "127.0.0.1:8081" not in text and str(tmp_path) in text
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (Debian: apt-get install -y nginx)")
    (tmp_path / "nginx").mkdir()
    (tmp_path / "nginx.conf").write_text(text)
    checked = subprocess.run([nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c",
                              str(tmp_path / "nginx.conf")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_the_access_log_says_which_replica_answered_each_session(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(
        '1.2.3.4 "POST /chat_stream HTTP/1.1" 200 upstream="127.0.0.1:1" session=- route=r1\n'
        '1.2.3.4 "POST /chat_stream HTTP/1.1" 200 upstream="127.0.0.1:1" session=s1 route=s1\n'
        '1.2.3.4 "POST /chat_stream HTTP/1.1" 200 upstream="127.0.0.1:1, 127.0.0.1:2" '
        'session=s1 route=s1\n'
        '1.2.3.4 "POST /chat_stream HTTP/1.1" 200 upstream="127.0.0.1:2" session=s2 route=s2\n')
    lines = access_log(log)
    assert [line["upstream"] for line in lines] == ["127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:2",
                                                     "127.0.0.1:2"]
    assert lines[2]["tried"] == "127.0.0.1:1, 127.0.0.1:2"
    assert sessions_on_one_replica(lines) == "1/2"    # s1 moved when its replica went down


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


def test_cpu_share_counts_the_servers_threads_and_the_client(tmp_path: Path) -> None:
    output = tmp_path / "share.json"
    result = _run("benchmarks.cpu_share", "--systems", "chat_stream,openai", "--requests", "1",
                  "--max-tokens", "8", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    _check_provenance(document, "benchmarks.cpu_share")
    for name in ("chat_stream", "openai"):
        system = document["systems"][name]
        assert system["status"] == "ok" and system["tokens"] > 0
        share = system["cpu_ms_per_token"]
        assert share["main thread"] > 0 and share["client process"] > 0
        # llama.cpp's threads do most of the work: more than the event loop's.
        assert sum(v for k, v in share.items() if k.startswith("threads")) > share["main thread"]
    assert "| main thread |" in document["table"]


def test_the_grammar_sampler_benchmark_counts_refusals(tmp_path: Path) -> None:
    output = tmp_path / "grammar.json"
    result = _run("benchmarks.grammar", "--sampler-only", "--tokens", "8", "--out", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    _check_provenance(document, "benchmarks.grammar")
    costs = document["costs"]["llguidance"]       # per engine: the one there is
    assert set(costs["free text"]["refusals"]) == {0}
    assert {name for name in costs if "tool call" in name} and all(
        c["tokens"][0] > 0 and c["sample_ms"][0] > 0 for c in costs.values())
    assert sum(c["refusals"][0] for c in costs.values()) > 0


def test_kv_copy_times_both_ways_of_copying_a_sequence(tmp_path: Path) -> None:
    output = tmp_path / "kv_copy.json"
    result = _run("benchmarks.kv_copy", "--cells", "40,200", "--n-ctx", "256", "--repeats", "1",
                  "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    _check_provenance(document, "benchmarks.kv_copy")
    assert [row["cells"] for row in document["rows"]] == [40, 200]
    assert all(row[f"{way}_ms"] > 0 for row in document["rows"]
               for way in ("stream", "cells", "none"))


def test_direct_prefix_times_the_first_token_both_ways(tmp_path: Path) -> None:
    output = tmp_path / "prefix.json"
    result = _run("benchmarks.direct_prefix", "--rounds", "1", "--prompts", "2", "--output",
                  str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    _check_provenance(document, "benchmarks.direct_prefix")
    assert [len(document["times_ms"][way]) for way in ("reuse", "fresh")] == [2, 2]
    assert all(t > 0 for way in document["times_ms"].values() for t in way)
