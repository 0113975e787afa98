"""From raw records to figures, and figures to a Markdown table with ratios to `direct`.

    figures, errors = compute_figures(raw)
    print(markdown_table(results, order))

Definitions (the same for every system; times measured by the client):
- one stream, tokens/s: (tokens - 1) / (last piece - first piece), median of the runs;
- first token: from sending the request to its first non-empty piece of text;
- aggregate tokens/s at C clients: all tokens / (last stream's end - first request sent);
- multi-turn: mean first-token time of all users at the last turn (and at the first);
- tokens after disconnect: tokens the server generated for the request minus the tokens the
  client had received when it closed the connection;
- long prompt: first token of a long prompt (cold), and how long a one-token request sent
  right after another client left halfway through a long prompt waits for its token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .measure import Record, mean, percentile


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    decimals: int = 1


def figure_list(concurrency: tuple[int, ...], turns: int) -> list[Figure]:
    top = max(concurrency)
    return [
        Figure("stream_tps", "one stream, tokens/s"),
        Figure("ttft_p50_ms", "first token p50, ms (1 client)"),
        Figure("ttft_p95_ms", "first token p95, ms (1 client)"),
        *(Figure(f"aggregate_tps_{c}", f"aggregate tokens/s, {c} clients") for c in concurrency),
        Figure(f"ttft_p50_ms_{top}", f"first token p50, ms ({top} clients)"),
        Figure(f"ttft_p95_ms_{top}", f"first token p95, ms ({top} clients)"),
        Figure("multiturn_ttft_first_ms", "multi-turn: mean first token at turn 1, ms"),
        Figure("multiturn_ttft_last_ms", f"multi-turn: mean first token at turn {turns}, ms"),
        Figure("tokens_after_disconnect", "tokens generated after a disconnect", 0),
        Figure("long_prompt_ttft_ms", "long prompt: first token, ms", 0),
        Figure("wait_after_abort_ms", "long prompt abandoned halfway: next request waits, ms", 0),
        Figure("rss_loaded_mb", "RSS after warm-up, MiB", 0),
        Figure("rss_peak_mb", "RSS peak, MiB", 0),
    ]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _aggregate(records: list[Record]) -> float | None:
    done = [r for r in records if r.ok and r.done is not None]
    if not done or len(done) < len(records):
        return None
    span = max(r.done for r in done) - min(r.sent for r in records)  # type: ignore[type-var]
    return sum(r.tokens for r in done) / span if span > 0 else None


def compute_figures(raw: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The figures of one system, and how many of its requests failed."""
    figures: dict[str, Any] = {}
    errors = 0

    def take(items: list[dict[str, Any]]) -> list[Record]:
        nonlocal errors
        records = [Record.from_json(item) for item in items]
        errors += sum(1 for r in records if not r.ok)
        return records

    if "single" in raw:
        single = take(raw["single"])
        figures["stream_tps"] = percentile([r.stream_rate for r in single], 50)  # type: ignore[misc]
        ttfts = [_ms(r.ttft) for r in single if r.ok]
        figures["ttft_p50_ms"] = percentile(ttfts, 50)  # type: ignore[arg-type]
        figures["ttft_p95_ms"] = percentile(ttfts, 95)  # type: ignore[arg-type]
        figures["single_tokens"] = [r.tokens for r in single]
    if "concurrency" in raw:
        levels = raw["concurrency"]
        for clients, items in levels.items():
            records = take(items)
            figures[f"aggregate_tps_{clients}"] = _aggregate(records)
            ttfts = [_ms(r.ttft) for r in records if r.ok]
            figures[f"ttft_p50_ms_{clients}"] = percentile(ttfts, 50)  # type: ignore[arg-type]
            figures[f"ttft_p95_ms_{clients}"] = percentile(ttfts, 95)  # type: ignore[arg-type]
    if "multiturn" in raw:
        turns = [take(turn) for turn in raw["multiturn"]]
        per_turn = [mean([_ms(r.ttft) for r in turn]) for turn in turns]
        figures["multiturn_ttft_per_turn_ms"] = per_turn
        figures["multiturn_ttft_first_ms"] = per_turn[0] if per_turn else None
        figures["multiturn_ttft_last_ms"] = per_turn[-1] if per_turn else None
    if "disconnect" in raw:
        test = raw["disconnect"]
        received = test["record"]["tokens"]
        generated = test.get("generated")
        figures["tokens_received_before_disconnect"] = received
        figures["tokens_after_disconnect"] = (
            None if generated is None else max(generated - received, 0))
        figures["tokens_after_disconnect_source"] = test.get("source")
    if "long_prompt" in raw:
        test = raw["long_prompt"]
        full = take([test["full"]])[0]
        figures["long_prompt_ttft_ms"] = _ms(full.ttft)
        if "probe" in test:
            figures["wait_after_abort_ms"] = _ms(take([test["probe"]])[0].ttft)
    return figures, errors


def same_text(raw: dict[str, Any], direct_raw: dict[str, Any] | None) -> str | None:
    """How many single-stream replies are exactly direct's (greedy: all should be)."""
    if direct_raw is None or "single" not in raw or "single" not in direct_raw:
        return None
    pairs = list(zip(raw["single"], direct_raw["single"]))
    equal = sum(1 for a, b in pairs if a.get("text") == b.get("text"))
    return f"{equal}/{len(pairs)}"


def _format(value: Any, decimals: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:,.{decimals}f}"
    return str(value)


def _ratio(value: Any, base: Any) -> str:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or base == 0:
        return ""
    return f" ({value / base:.2f}×)"


def markdown_table(systems: dict[str, dict[str, Any]], figures: list[Figure],
                   baseline: str = "direct") -> str:
    """One column per system, one row per figure; each value also as a ratio to `baseline`."""
    names = list(systems)
    base = systems.get(baseline, {}).get("figures", {})
    lines = ["| figure | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = []
    for fig in figures:
        def cell(system: dict[str, Any], fig: Figure = fig) -> str:
            if system["status"] != "ok":
                return "n/a"
            value = system["figures"].get(fig.key)
            text = _format(value, fig.decimals)
            return text + ("" if system is systems.get(baseline) else _ratio(value, base.get(fig.key)))
        rows.append((fig.label, cell))
    rows.append(("same text as direct (greedy)",
                 lambda s: s.get("same_text_as_direct") or "n/a" if s["status"] == "ok" else "n/a"))
    rows.append(("failed requests", lambda s: str(s.get("errors", 0)) if s["status"] == "ok" else "n/a"))
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(systems[n]) for n in names) + " |")
    notes = [f"- {name}: n/a ({s['reason']})" for name, s in systems.items() if s["status"] != "ok"]
    notes += [f"- {name}: {s['note']}" for name, s in systems.items() if s.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))
