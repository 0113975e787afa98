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
from typing import Any

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
        *(Figure(f"aggregate_tps_{c}", f"aggregate tokens/s, {c} client{'s' * (c != 1)}")
          for c in concurrency),
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
    span = max(r.done or 0.0 for r in done) - min(r.sent for r in records)
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
    pairs = list(zip(raw["single"], direct_raw["single"], strict=False))
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


def _cell(system: dict[str, Any], fig: Figure, base: dict[str, Any] | None) -> str:
    if system["status"] != "ok":
        return "n/a"
    value = system["figures"].get(fig.key)
    ratio = "" if base is None else _ratio(value, base.get(fig.key))
    return _format(value, fig.decimals) + _spread(system, fig) + ratio


def _spread(system: dict[str, Any], fig: Figure) -> str:
    """" [min–max]" of a figure measured in more than one round."""
    low_high = system.get("spread", {}).get(fig.key)
    if system.get("rounds_ok", 1) < 2 or not low_high:
        return ""
    low, high = low_high
    counted = system.get("rounds_counted", {}).get(fig.key)
    of = f", {counted} of {system['rounds_ok']} rounds" if counted else ""
    return f" [{_format(low, fig.decimals)}–{_format(high, fig.decimals)}{of}]"


def markdown_table(systems: dict[str, dict[str, Any]], figures: list[Figure],
                   baseline: str = "direct") -> str:
    """One column per system, one row per figure; each value also as a ratio to `baseline`
    (with thread variants, "direct @2t" for the columns "... @2t"). Figures measured in
    several rounds are medians, with [min–max] after them."""
    names = list(systems)
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for fig in figures:
        cells = []
        for n in names:
            base_name = _baseline_of(n, baseline, systems)
            base = systems.get(base_name, {}).get("figures") if base_name != n else None
            cells.append(_cell(systems[n], fig, base))
        lines.append(f"| {fig.label} | " + " | ".join(cells) + " |")
    for label, key in (("same text as direct (greedy)", "same_text_as_direct"),
                       ("failed requests", "errors")):
        cells = [str(systems[n].get(key, "n/a")) if systems[n]["status"] == "ok" else "n/a"
                 for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = [f"- {name}: n/a ({s['reason']})" for name, s in systems.items() if s["status"] != "ok"]
    notes += [f"- {name}: {s['note']}" for name, s in systems.items() if s.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def _baseline_of(name: str, baseline: str, systems: dict[str, Any]) -> str:
    """`direct @2t` for `llama-server @2t` when thread variants are measured, else `direct`."""
    if " @" in name:
        variant = baseline + name[name.rindex(" @"):]
        if variant in systems:
            return variant
    return baseline


# -- the targets of issues 4 and 14 ------------------------------------------------------
OURS = ("chatstream_lite /chat_stream", "chatstream_lite /v1/chat/completions")
CEILING = "llama-batched-bench (ceiling)"
CEILING_SHARE = 0.9       # issue 14: our aggregate at 8 and 16 clients >= 0.9x the ceiling


def _fig(systems: dict[str, dict[str, Any]], name: str, key: str) -> float | None:
    system = systems.get(name)
    if not system or system["status"] != "ok":
        return None
    value = system["figures"].get(key)
    return value if isinstance(value, (int, float)) else None


def targets_table(systems: dict[str, dict[str, Any]], *, chunk_tokens: int,
                  long_prompt_tokens: int, llama_server_np: int, suffix: str = "") -> str:
    """Each speed target for each chatstream_lite route: measured, bound, met or not.

    `suffix` only labels the rows (" @2t": the systems given are one thread variant's)."""
    peer = "llama-server"
    rows: list[tuple[str, str, str, Any, Any, bool]] = []  # target, route, unit, value, bound, <=?
    for ours in (n for n in OURS if systems.get(n, {}).get("status") == "ok"):
        direct_tps, peer_tps = _fig(systems, "direct", "stream_tps"), _fig(systems, peer, "stream_tps")
        tps = _fig(systems, ours, "stream_tps")
        rows.append(("one stream ≥ 1.0× direct", ours, "tok/s", tps, direct_tps, False))
        rows.append(("one stream ≥ 0.95× llama-server", ours, "tok/s", tps,
                     None if peer_tps is None else 0.95 * peer_tps, False))
        direct_ttft = _fig(systems, "direct", "ttft_p50_ms")
        rows.append(("first token ≤ direct + 5 ms (p50, 1 client)", ours, "ms",
                     _fig(systems, ours, "ttft_p50_ms"),
                     None if direct_ttft is None else direct_ttft + 5, True))
        rows.append((f"aggregate, 8 clients ≥ 1.0× llama-server (-np {llama_server_np})", ours,
                     "tok/s", _fig(systems, ours, "aggregate_tps_8"),
                     _fig(systems, peer, "aggregate_tps_8"), False))
        for clients in (8, 16):
            bar = _fig(systems, CEILING, f"aggregate_tps_{clients}")
            rows.append((f"aggregate, {clients} clients ≥ {CEILING_SHARE}× the ceiling "
                         "(llama-batched-bench S_TG)", ours, "tok/s",
                         _fig(systems, ours, f"aggregate_tps_{clients}"),
                         None if bar is None else CEILING_SHARE * bar, False))
        rows.append(("≤ 1 token generated after a disconnect", ours, "tokens",
                     _fig(systems, ours, "tokens_after_disconnect"), 1, True))
        full = _fig(systems, ours, "long_prompt_ttft_ms")
        short = _fig(systems, ours, "ttft_p50_ms")
        chunk = None if full is None or short is None else (
            full * min(1.0, chunk_tokens / max(long_prompt_tokens, 1)) + short)
        rows.append(("abandoned prompt stops within one chunk (next request waits ≤ one "
                     f"{chunk_tokens}-token chunk + a short first token)", ours, "ms",
                     _fig(systems, ours, "wait_after_abort_ms"), chunk, True))
        rows.append((f"multi-turn first token at the last turn ≤ 1.0× llama-server "
                     f"(-np {llama_server_np})", ours, "ms",
                     _fig(systems, ours, "multiturn_ttft_last_ms"),
                     _fig(systems, peer, "multiturn_ttft_last_ms"), True))
    lines = ["| target | system | measured | bound | result |", "|---|---|---:|---:|---|"]
    for target, ours, unit, value, bound, at_most in rows:
        if value is None or bound is None:
            verdict = "n/a"
        else:
            met = value <= bound if at_most else value >= bound
            verdict = "met" if met else f"missed by {abs(value - bound):,.1f} {unit}"
        lines.append(f"| {target} | {ours}{suffix} | {_format(value, 1)} | {_format(bound, 1)} "
                     f"| {verdict} |")
    return "\n".join(lines)
