"""The benchmark's scenarios, run the same way against every system (a `Target`).

    raw = await run_scenarios(target, Plan.full(), STAGES)

returns plain data (records as JSON, times relative to the start of the run) that
`report.py` turns into figures. The stages, in order:

- `single`: one stream at a time, fresh session each (tokens/s of one stream, first token);
- `concurrency`: C fresh users send at once, for each C of the plan (aggregate tokens/s);
- `multiturn`: users chatting in turn with long system prompts (first token per turn);
- `disconnect`: a client closes after a few tokens (tokens the server generated after);
- `long_prompt`: a client leaves halfway through a long prompt; how long the next one waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from .clients import Target, User
from .measure import Record, Tokenizer
from .workload import PROMPTS, QUESTIONS, Plan, long_prompt, system_prompt

STAGES = ("single", "concurrency", "multiturn", "disconnect", "long_prompt")
WARMUP_TOKENS = 8


async def run_scenarios(target: Target, plan: Plan, tokenizer: Tokenizer,
                        stages: tuple[str, ...] = STAGES, say: Callable[[str], None] = print,
                        warmed_up: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run `stages` in order; `warmed_up()` is called after the warm-up request."""
    origin = time.perf_counter()

    def out(records: list[Record], with_text: bool = False) -> list[dict[str, Any]]:
        tokenizer.count_records(records)
        return [r.to_json(origin, with_text) for r in records]

    raw: dict[str, Any] = {}
    await _one(target, PROMPTS[-1], WARMUP_TOKENS)  # loads pages, compiles graphs
    warmed_up()
    if "single" in stages:
        say("  single stream")
        raw["single"] = out([await _one(target, PROMPTS[i % len(PROMPTS)], plan.max_tokens)
                             for i in range(plan.single_runs)], with_text=True)
    if "concurrency" in stages:
        raw["concurrency"] = {}
        for clients in plan.concurrency:
            say(f"  {clients} concurrent clients")
            raw["concurrency"][str(clients)] = out(await _concurrent(target, clients, plan))
    if "multiturn" in stages:
        say(f"  {plan.users} users x {plan.turns} turns")
        raw["multiturn"] = [out(turn) for turn in await _multiturn(target, plan)]
    if "disconnect" in stages:
        say("  disconnect after a few tokens")
        raw["disconnect"] = await _disconnect(target, plan, out)
    if "long_prompt" in stages:
        say("  disconnect during a long prompt")
        raw["long_prompt"] = await _long_prompt(target, plan, out)
    return raw


async def _one(target: Target, text: str, max_tokens: int, close_after: int | None = None,
               system: str | None = None) -> Record:
    user = target.user(system)
    try:
        return await user.send(text, max_tokens, close_after)
    finally:
        await user.close()


async def _concurrent(target: Target, clients: int, plan: Plan) -> list[Record]:
    users = [target.user() for _ in range(clients)]
    try:
        return list(await asyncio.gather(*(
            user.send(PROMPTS[i % len(PROMPTS)], plan.max_tokens) for i, user in enumerate(users)
        )))
    finally:
        await asyncio.gather(*(user.close() for user in users))


async def _multiturn(target: Target, plan: Plan) -> list[list[Record]]:
    """User 1 turn 1, user 2 turn 1, ..., user N turn T: each waits for the previous reply."""
    users: list[User] = [target.user(system_prompt(u, plan.system_rules)) for u in range(plan.users)]
    try:
        turns = []
        for turn in range(plan.turns):
            question = QUESTIONS[turn % len(QUESTIONS)]
            turns.append([await user.send(question, plan.turn_tokens) for user in users])
        return turns
    finally:
        await asyncio.gather(*(user.close() for user in users))


Out = Callable[..., list[dict[str, Any]]]


async def _disconnect(target: Target, plan: Plan, out: Out) -> dict[str, Any]:
    marker = await target.tokens.marker()
    record = await _one(target, PROMPTS[1], plan.max_tokens, close_after=plan.disconnect_after)
    generated, source = await target.tokens.generated_since(marker)
    return {"record": out([record], with_text=True)[0], "generated": generated, "source": source}


async def _long_prompt(target: Target, plan: Plan, out: Out) -> dict[str, Any]:
    """How long a short request waits after a client left in the middle of a long prompt.

    First a long prompt is run to its first token (its full prompt time, cold). Then another
    long prompt (different from its first words, so nothing is reused) is abandoned halfway
    through that time, and a short request is sent at once: if the server stops the
    abandoned prompt within one chunk, the short request waits about one chunk.
    """
    full = await _one(target, "Archive A. " + long_prompt(plan.long_prompt_paragraphs), 1)
    result: dict[str, Any] = {"full": out([full])[0]}
    if not full.ok:
        return result
    half = (full.first - full.sent) / 2  # type: ignore[operator]
    abandoned = asyncio.create_task(
        _one(target, "Archive B. " + long_prompt(plan.long_prompt_paragraphs), 1))
    await asyncio.sleep(half)
    abandoned.cancel()  # the client goes away: aiohttp closes the connection
    try:
        await abandoned
    except asyncio.CancelledError:
        pass
    probe = await _one(target, PROMPTS[2], 1)
    result.update({"abandoned_after": half, "probe": out([probe])[0]})
    return result
