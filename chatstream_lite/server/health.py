"""`GET /health`: named checks gathered into one JSON answer, 200 when all pass, else 503.

    {"status": "ok", "model": ..., "running": 0, ..., "checks": {"engine": true, ...}}

    health = Health()
    health.add_check("engine", engine_check)        # ChatStream adds this one itself
    health.add_check("redis", redis_check)          # e.g. a session store
    app.router.add_get("/health", health.handle)

A check is an async function returning a `CheckResult`: whether it passes, and the fields it
adds to the body. A check that raises or takes longer than `CHECK_TIMEOUT` fails with
`{name: {"status": "error", "error": ...}}`, so a dependency that hangs can never hang the probe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

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
    """The checks behind `/health`, run in the order they were added."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add_check(self, name: str, check: Check) -> None:
        if name in self._checks:
            raise ValueError(f"a health check named {name!r} exists already")
        self._checks[name] = check

    async def report(self) -> tuple[bool, dict[str, Any]]:
        """Whether every check passes, and the body: `{"status": "ok" | "unavailable", ...}`."""
        results = await asyncio.gather(*(self._run(n, c) for n, c in self._checks.items()))
        ok = all(result.ok for result in results)
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable"}
        for result in results:
            body.update(result.fields)
        body["checks"] = {name: result.ok
                          for name, result in zip(self._checks, results, strict=True)}
        return ok, body

    async def handle(self, request: web.Request) -> web.Response:
        ok, body = await self.report()
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
