"""llama.cpp's CPU kernels on every CPU of our kind: the extra-buffer policy from a (faked) build
and CPU, the self-check against a child that dies of a real signal, the fallback and the
refusal, the line a fatal signal leaves, and a real prompt decoded with the default settings
(on a CPU with AMX, that is the batch that used to kill the process)."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

from chatstream_lite import ChatStream
from chatstream_lite.cpu import Cpu
from chatstream_lite.engine.llama.kernel_check import (
    CheckResult,
    KernelFault,
    run_check,
    settle,
)
from chatstream_lite.engine.llama.kernels import Machine, choose

from .conftest import GREEDY, ROOT, build_full_app, free_port, start_server, subprocess_env

pytestmark = pytest.mark.timeout(120)

# What llama_print_system_info() says for a native build on an AMX Xeon (seen on one) and on
# an AVX2-only AMD machine; only the features' names matter.
AMX_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | "
             "FMA = 1 | BMI2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | "
             "AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
AVX2_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
              "BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
AMX_CPU = Cpu("Intel(R) Xeon(R) Processor", frozenset(
    "fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8".split()))
AVX2_CPU = Cpu("AMD EPYC", frozenset("fpu avx2 fma".split()))
UNKNOWN_CPU = Cpu("unknown CPU", None)


# -- the policy, from faked build and CPU ------------------------------------------------------
def test_an_amx_build_on_an_amx_cpu_loads_without_extra_buffers_and_says_why() -> None:
    policy = choose(Machine(AMX_BUILD, AMX_CPU))
    assert not policy.extra_buffers and not policy.check
    text = policy.describe()
    assert "AMX_INT8 = 1" in text and "amx_tile" in text and "CPU_REPACK" in text


def test_an_amx_build_on_a_cpu_without_amx_keeps_extra_buffers() -> None:
    policy = choose(Machine(AMX_BUILD, AVX2_CPU))
    assert policy.extra_buffers and not policy.check


def test_a_build_without_amx_kernels_keeps_extra_buffers_on_any_cpu() -> None:
    for cpu in (AMX_CPU, AVX2_CPU, UNKNOWN_CPU):
        policy = choose(Machine(AVX2_BUILD, cpu))
        assert policy.extra_buffers and not policy.check


def test_unreadable_cpu_flags_count_as_amx_for_an_amx_build() -> None:
    assert not choose(Machine(AMX_BUILD, UNKNOWN_CPU)).extra_buffers


def test_extra_buffers_forced_on_where_amx_would_run_are_checked_first() -> None:
    policy = choose(Machine(AMX_BUILD, AMX_CPU), extra_buffers="on")
    assert policy.extra_buffers and policy.check
    assert not choose(Machine(AMX_BUILD, AMX_CPU), "on", kernel_check="off").check
    # Elsewhere `on` is the default state, and nothing known faults: no check unless asked.
    assert not choose(Machine(AVX2_BUILD, AVX2_CPU), extra_buffers="on").check
    assert choose(Machine(AVX2_BUILD, AVX2_CPU), kernel_check="on").check


def test_extra_buffers_off_is_off_everywhere() -> None:
    for machine in (Machine(AMX_BUILD, AMX_CPU), Machine(AVX2_BUILD, AVX2_CPU)):
        assert not choose(machine, extra_buffers="off").extra_buffers


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="extra_buffers"):
        choose(Machine(AVX2_BUILD, AVX2_CPU), extra_buffers="maybe")
    with pytest.raises(ValueError, match="kernel_check"):
        choose(Machine(AVX2_BUILD, AVX2_CPU), kernel_check="sometimes")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n"
                       "flags\t\t: fpu avx2 amx_tile avx512f\n\nprocessor\t: 1\n")
    cpu = Cpu.detect(cpuinfo)
    assert cpu.name == "Test CPU 9000" and cpu.has("amx_tile") and not cpu.has("amx_int8")
    assert cpu.describe() == "Test CPU 9000, flags amx_tile avx512f avx2"
    assert Cpu.detect(tmp_path / "missing").flags is None


# -- settling on the check's verdict ------------------------------------------------------------
def _checks(*results: CheckResult) -> tuple[list[bool], object]:
    asked: list[bool] = []
    queue = list(results)

    def check(extra_buffers: bool) -> CheckResult:
        asked.append(extra_buffers)
        return queue.pop(0)
    return asked, check


def test_a_child_that_dies_with_extra_buffers_falls_back_to_them_off() -> None:
    policy = choose(Machine(AMX_BUILD, AMX_CPU), extra_buffers="on")
    asked, check = _checks(CheckResult(-signal.SIGILL, 0.5), CheckResult(0, 0.5))
    settled = settle(policy, Machine(AMX_BUILD, AMX_CPU), check)  # type: ignore[arg-type]
    assert asked == [True, False]
    assert not settled.extra_buffers and "SIGILL" in settled.reason


def test_a_child_that_dies_either_way_refuses_to_start_with_one_clear_line() -> None:
    policy = choose(Machine(AMX_BUILD, AMX_CPU), extra_buffers="on")
    _, check = _checks(CheckResult(-signal.SIGILL, 0.5), CheckResult(-signal.SIGSEGV, 0.5))
    with pytest.raises(KernelFault) as refused:
        settle(policy, Machine(AMX_BUILD, AMX_CPU), check)  # type: ignore[arg-type]
    message = str(refused.value)
    assert "\n" not in message
    assert "SIGSEGV" in message and "amx_tile" in message and "GGML_NATIVE=OFF" in message


def test_a_check_that_fails_without_a_signal_does_not_decide() -> None:
    policy = choose(Machine(AVX2_BUILD, AVX2_CPU), kernel_check="on")
    for result in (CheckResult(None, 300.0), CheckResult(2, 0.1, "not a GGUF file")):
        asked, check = _checks(result)
        assert settle(policy, Machine(AVX2_BUILD, AVX2_CPU), check) == policy  # type: ignore[arg-type]
        assert asked == [True]


# -- the real child ----------------------------------------------------------------------------
def test_the_check_child_decodes_the_model_and_reports_a_real_signal(model_path: str) -> None:
    safe = run_check(Path(model_path), extra_buffers=False, n_threads=1, n_gpu_layers=0)
    assert safe.ok, safe.describe()
    killed = run_check(Path(model_path), extra_buffers=False, n_threads=1, n_gpu_layers=0,
                       die_with=signal.SIGILL)
    assert killed.signal == signal.SIGILL
    assert killed.describe() == "died of SIGILL (Illegal instruction)"


async def _reply(chat_stream: ChatStream) -> tuple[int, str]:
    server = await start_server(chat_stream, build_full_app)
    try:
        async with server.client() as client, client.post(
                "/chat_stream", json={"user_input": "Count from one to five.",
                                      "max_new_tokens": 8, **GREEDY}) as response:
            return response.status, await response.text()
    finally:
        await server.runner.cleanup()


async def test_the_engine_falls_back_when_the_check_child_dies_with_extra_buffers(
        model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    chat_stream = ChatStream(model_path, n_ctx=256, max_new_tokens=8, extra_buffers="on",
                             kernel_check="on")
    engine = chat_stream.engine
    engine.faults.kernel_check_signal = (  # type: ignore[attr-defined]
        lambda extra_buffers: signal.SIGILL if extra_buffers else None)
    with caplog.at_level(logging.INFO, logger="chatstream_lite"):
        status, text = await _reply(chat_stream)
    assert status == 200 and text
    assert engine.kernels is not None and not engine.kernels.extra_buffers  # type: ignore[attr-defined]
    assert any("died of SIGILL" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)


@pytest.mark.model
def test_a_server_whose_check_dies_either_way_exits_with_one_line() -> None:
    """The CLI, with the check's fault hook set in its process: exit 1, the reason in one log
    line, no traceback."""
    port = free_port()
    script = textwrap.dedent(f"""
        import signal, sys
        from chatstream_lite import cli
        from chatstream_lite.engine.llama import engine
        started = engine.LlamaEngine.__init__
        def init(self, config):
            started(self, config)
            self.faults.kernel_check_signal = lambda extra_buffers: signal.SIGSEGV
        engine.LlamaEngine.__init__ = init
        sys.exit(cli.main(["--port", "{port}", "--kernel-check", "on", "--n-ctx", "256",
                           "--max-new-tokens", "8"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=subprocess_env(), timeout=90)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if "failed to load" in line]
    assert len(lines) == 1 and "SIGSEGV" in lines[0] and "cannot serve here" in lines[0]
    assert "Traceback" not in done.stderr


# -- a fatal signal leaves its stack and what to do ---------------------------------------------
def test_a_fatal_signal_prints_the_stack_and_one_line_of_advice() -> None:
    script = textwrap.dedent("""
        import os, signal
        from chatstream_lite import crash_report
        assert crash_report.install("try --extra-buffers off")
        def decode():
            os.kill(os.getpid(), signal.SIGILL)
        decode()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=subprocess_env(), timeout=30)
    assert done.returncode == -signal.SIGILL
    assert "Fatal Python error: Illegal instruction" in done.stderr
    assert 'in decode' in done.stderr        # the Python stack, down to the faulting call
    assert ("chatstream_lite: the process died of Illegal instruction. try --extra-buffers off"
            in done.stderr)


def test_a_normal_exit_leaves_no_crash_report() -> None:
    script = "from chatstream_lite import crash_report; crash_report.install('advice')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=subprocess_env(), timeout=30)
    assert done.returncode == 0 and done.stderr == ""


async def test_a_server_killed_by_a_signal_mid_reply_names_it_and_the_cpu() -> None:
    """`python -m chatstream_lite --mock` whose engine kills the process at the first token,
    as a faulting kernel would."""
    port = free_port()
    script = textwrap.dedent(f"""
        import os, signal, sys
        from chatstream_lite import cli
        from chatstream_lite.engine import mock
        started = mock.MockEngine.__init__
        def init(self, *args, **kwargs):
            started(self, *args, **kwargs)
            self.faults.before_token = lambda index: os.kill(os.getpid(), signal.SIGSEGV)
        mock.MockEngine.__init__ = init
        sys.exit(cli.main(["--port", "{port}", "--mock"]))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(100):
                try:
                    async with client.get(f"http://127.0.0.1:{port}/health") as health:
                        if health.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            with pytest.raises(aiohttp.ClientError):
                async with client.post(f"http://127.0.0.1:{port}/chat_stream",
                                       json={"user_input": "Hi"}) as response:
                    await response.read()
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in stderr
    advice = [line for line in stderr.splitlines()
              if line.startswith("chatstream_lite: the process died of Segmentation fault")]
    assert len(advice) == 1
    assert Cpu.detect().describe() in advice[0] and "--extra-buffers off" in advice[0]


# -- the real kernels, default settings ---------------------------------------------------------
async def test_the_default_settings_decode_a_prompt_on_this_cpu(model_path: str) -> None:
    """On a CPU with AMX and a native build, this prompt is the batch that killed the process
    before the policy (SIGILL or SIGSEGV in ggml_backend_amx_mul_mat)."""
    machine = Machine.detect()
    chat_stream = ChatStream(model_path, n_ctx=256, max_new_tokens=8)
    status, text = await _reply(chat_stream)
    assert status == 200 and text
    kernels = chat_stream.engine.kernels  # type: ignore[attr-defined]
    assert kernels.extra_buffers == (not (machine.build_has_amx and machine.cpu_has_amx))
