"""`GET /health` and `GET /ready`: named checks gathered into one JSON answer.

    {"status": "ok", "model": ..., "running": 0, ..., "checks": {"engine": true, ...}}

    health = Health()
    health.add_check("engine", engine_check)        # ChatStream adds this one itself
    health.add_check("session_store", store_check, critical=False)
    app.router.add_get("/health", health.handle)        # 200 while every critical check passes
    app.router.add_get("/ready", health.handle_ready)   # 200 only while every check passes

A check is an async function returning a `CheckResult`: whether it passes, and the fields it
adds to the body. A check that raises or takes longer than `CHECK_TIMEOUT` fails with
`{name: {"status": "error", "error": ...}}`, so a dependency that hangs can never hang the probe.

Two views, because load balancers differ in what they should act on. `/health` fails (503,
`"status": "unavailable"`) only when a critical check fails: the replica cannot serve at
all. A failing non-critical check, such as the session store that every replica shares,
makes it `"status": "degraded"` with 200: the replica still serves what does not need it,
and a probe that failed there would take every replica out of rotation at once. `/ready`
is the strict view: 503 while any check fails, for deployments that want a replica out
of rotation whenever part of it cannot serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["CHECK_TIMEOUT", "Check", "CheckResult", "Health"]

log = logging.getLogger(__name__)

# Seconds. Checks keep their own, shorter timeouts (Redis: 2 s); this one only makes sure a
# check that hangs anyway cannot hang the probe.
CHECK_TIMEOUT = 5.0


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    fields: dict[str, Any] = field(default_factory=dict)


Check = Callable[[], Awaitable[CheckResult]]


class Health:
    """The checks behind `/health` and `/ready`, run in the order they were added."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}
        self._optional: set[str] = set()

    def add_check(self, name: str, check: Check, *, critical: bool = True) -> None:
        """`critical=False`: when it fails, `/health` says "degraded" with 200, `/ready` 503."""
        if name in self._checks:
            raise ValueError(f"a health check named {name!r} exists already")
        self._checks[name] = check
        if not critical:
            self._optional.add(name)

    async def report(self, *, strict: bool = False) -> tuple[bool, dict[str, Any]]:
        """Whether the replica passes (every critical check; `strict`: every check), and
        the body: `{"status": "ok" | "degraded" | "unavailable", ..., "checks": {...}}`."""
        results = await asyncio.gather(*(self._run(n, c) for n, c in self._checks.items()))
        passed = dict(zip(self._checks, (result.ok for result in results), strict=True))
        serving = all(ok for name, ok in passed.items() if name not in self._optional)
        status = ("unavailable" if not serving else "ok" if all(passed.values())
                  else "degraded")
        body: dict[str, Any] = {"status": "unavailable" if strict and status != "ok"
                                else status}
        for result in results:
            body.update(result.fields)
        body["checks"] = passed
        return (status == "ok") if strict else serving, body

    async def handle(self, request: web.Request) -> web.Response:
        """`GET /health`: 200 while the replica serves (degraded included), else 503."""
        return await self._answer(strict=False)

    async def handle_ready(self, request: web.Request) -> web.Response:
        """`GET /ready`: 200 only while every check passes, else 503."""
        return await self._answer(strict=True)

    async def _answer(self, *, strict: bool) -> web.Response:
        ok, body = await self.report(strict=strict)
        return web.json_response(body, status=200 if ok else 503,
                                 headers={"Cache-Control": "no-store"})

    @staticmethod
    async def _run(name: str, check: Check) -> CheckResult:
        try:
            return await asyncio.wait_for(check(), CHECK_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - a failing check is an answer, not a crash
            reason = "timed out" if isinstance(error, asyncio.TimeoutError) else str(error)
            log.warning("health check %s failed: %s", name, reason)
            return CheckResult(False, {name: {"status": "error", "error": reason}})
