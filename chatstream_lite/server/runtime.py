"""`Runtime`: what every endpoint shares — the configuration, the engine's lifecycle,
admission, drain, health, metrics, the API key and the disconnect watcher.

    runtime = Runtime(engine, Config.of(max_queue_size=16))
    runtime.setup(app)                      # engine on the app's lifecycle, drain on shutdown
    job = runtime.submit(messages, params)  # admission: 429/503 or an admitted job
    runtime.request_rejected(endpoint, error) / runtime.request_finished(endpoint, exchange)

`ChatStream` and `OpenAIAPI` are two faces over one runtime (`OpenAIAPI(runtime)` needs no
`ChatStream`); neither reaches past it into the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Hashable

from aiohttp import web

from ..config import DEFAULTS, Config
from ..engine import Admission, Engine, Job, ModelInfo, PromptInput, SamplingParams
from ..errors import ChatStreamError, ServiceUnavailable, StartupError
from .auth import ApiKey
from .disconnects import DisconnectWatcher
from .exchange import Exchange
from .health import CheckResult, Health
from .metrics import Metrics

__all__ = ["Runtime"]

log = logging.getLogger(__name__)

class Runtime:
    """See the module docstring."""

    def __init__(self, engine: Engine, config: Config = DEFAULTS, *,
                 load_in_background: bool = False) -> None:
        self.engine = engine
        self.config = config
        self.admission = admission = Admission(engine, config.limits)
        self.shutdown_grace = config.limits.shutdown_grace
        self.stall_timeout = config.limits.stall_timeout
        self.load_in_background = load_in_background
        self.api_key = ApiKey(config.access.api_key, config.access.guarded_paths)
        generation, limits = config.generation, config.limits
        # Every request's defaults, and the ranges its own values are held to.
        self.defaults = SamplingParams(
            max_new_tokens=limits.max_new_tokens, temperature=generation.temperature,
            top_p=generation.top_p, top_k=generation.top_k,
            repeat_penalty=generation.repeat_penalty, seed=generation.seed,
            stop=generation.stop)
        self.metrics = Metrics(admission)
        self.health = Health()
        self.health.add_check("engine", self._engine_health)
        # One for every request of every endpoint (all on one loop).
        self.disconnects = DisconnectWatcher()
        self.load_error: BaseException | None = None
        self._loading: asyncio.Task[None] | None = None

    @property
    def model_info(self) -> ModelInfo | None:
        return self.engine.model_info

    def require_model(self) -> ModelInfo:
        info = self.engine.model_info
        if info is None:
            raise ServiceUnavailable("The model is not loaded yet.")
        return info

    # -- lifecycle --------------------------------------------------------------------------
    def setup(self, app: web.Application) -> None:
        app.cleanup_ctx.append(self._engine_context)
        app.on_shutdown.append(lambda _app: self.drain())

    async def _engine_context(self, app: web.Application) -> AsyncIterator[None]:
        self._loading = asyncio.create_task(self._start_engine())
        if not self.load_in_background:
            await self._loading
        yield
        if not self._loading.done():
            log.info("waiting for the model to finish loading before closing it")
        await asyncio.gather(self._loading, return_exceptions=True)
        await self.engine.close()
        self.admission.close()

    async def _start_engine(self) -> None:
        try:
            info = await self.engine.start(died=self.admission.engine_died)
        except Exception as error:
            self.load_error = error
            if self.load_in_background:
                if isinstance(error, StartupError):   # its message says it all
                    log.error("the model failed to load: %s", error)
                else:
                    log.exception("the model failed to load; every request gets 503")
            raise
        log.info("model ready: %s (n_ctx=%d, GPU offload %s)", info.name, info.n_ctx,
                 "on" if info.gpu_offload else "off")

    async def wait_loaded(self) -> None:
        """Return once the model is loaded (raise what failed, if it did); call it after
        the app has started."""
        if self._loading is None:
            raise RuntimeError("the app has not started: setup(app), then start the app")
        await asyncio.shield(self._loading)

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting (new requests get 503), give admitted requests `grace` seconds
        to finish, then cancel the rest; returns once every one of them has ended."""
        await self.admission.drain(self.shutdown_grace if grace is None else grace)

    @property
    def draining(self) -> bool:
        return self.admission.draining

    # -- requests ---------------------------------------------------------------------------
    def submit(self, messages: PromptInput, params: SamplingParams, *,
               cache_key: Hashable | None = None, drop_oldest: bool = True) -> Job:
        return self.admission.submit(messages, params, cache_key=cache_key,
                                     drop_oldest=drop_oldest)

    def request_rejected(self, endpoint: str, error: ChatStreamError) -> None:
        """A request refused before streaming (4xx, 429, 503): no callback, nothing changed."""
        self.metrics.request_rejected(endpoint, error)

    def request_finished(self, endpoint: str, exchange: Exchange) -> None:
        """An admitted request has ended (its callback, if any, already ran)."""
        exchange.log_line(endpoint)
        self.metrics.request_finished(endpoint, exchange)

    # -- /health ----------------------------------------------------------------------------
    async def _engine_health(self) -> CheckResult:
        engine, info = self.engine, self.engine.model_info
        stalled = (engine.ready and self.admission.running > 0
                   and time.monotonic() - engine.last_progress > self.stall_timeout)
        if self.draining:
            state = "draining"  # shutting down: a load balancer should stop sending here
        elif stalled:
            # Work waits and no step has ended for stall_timeout seconds: the model is
            # wedged (or the machine is starved); take this replica out of rotation.
            state = "stalled"
        elif engine.ready:
            state = "ready"
        elif engine.failure is not None:
            state = f"thread died: {engine.failure!r}"  # for good: restart the server
        elif self.load_error is not None:
            state = f"failed: {self.load_error}"
        elif info is None:
            state = "loading"
        else:
            state = "stopped"
        return CheckResult(engine.ready and not self.draining and not stalled, {
            "model": info.path.stem if info else None,
            "gpu_offload": info.gpu_offload if info else False,
            "running": self.admission.running,
            "queued": self.admission.queued,
            "max_queue_size": self.admission.max_queue_size,
            "engine": state,
            # 0..1 of the weights loaded, where the engine reports it (llama.cpp does).
            "load_progress": _rounded(getattr(engine, "load_progress", None)),
        })


def _rounded(fraction: float | None) -> float | None:
    return None if fraction is None else round(fraction, 3)
