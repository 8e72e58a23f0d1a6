"""Speculative decoding figures for ``jserve bench``, read from the server's ``/metrics``.

Where it sits: ``server.bench.run_bench`` reads the server's four ``jserve:spec_decode_*``
counters (exported only when ``speculative_config`` is set, server/metrics.py) before and after
each concurrency run and reports the run's difference::

    acceptance rate        = accepted draft tokens / draft tokens verified
    mean accepted length   = tokens emitted by verify rows / verify rows (1 + accepted per row)

Counters are summed over their labels (one series per model). A server without them (no
speculation, or no HTTP metrics endpoint) gives no figures, and the table shows none.
"""

from __future__ import annotations

from typing import Any

SPEC_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                 "spec_decode_num_accepted_tokens", "spec_decode_num_emitted_tokens")


def parse_spec_counters(text: str) -> dict[str, float] | None:
    """Prometheus exposition text -> the four counters' totals, or None when any is absent."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("jserve:spec_decode_"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("jserve:").removesuffix("_total")
        if name in SPEC_COUNTERS:
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[-1])
            except ValueError:
                continue
    return out if len(out) == len(SPEC_COUNTERS) else None


async def read_spec_counters(client: Any, url: str) -> dict[str, float] | None:
    """GET ``url`` with ``client`` (an ``httpx.AsyncClient``) -> the counters, or None when the
    endpoint is unreachable or has none."""
    try:
        r = await client.get(url)
    except Exception:   # noqa: BLE001 - no metrics endpoint: no figures, the run goes on
        return None
    return parse_spec_counters(r.text) if r.status_code == 200 else None


def spec_summary(before: dict[str, float] | None, after: dict[str, float] | None
                 ) -> dict[str, float] | None:
    """A run's figures from the counters before and after it (None without both, or when no
    draft was verified)."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in SPEC_COUNTERS}
    drafts, draft_tokens = d["spec_decode_num_drafts"], d["spec_decode_num_draft_tokens"]
    if drafts <= 0 or draft_tokens <= 0:
        return None
    return {"verify_rows": drafts, "draft_tokens": draft_tokens,
            "accepted_tokens": d["spec_decode_num_accepted_tokens"],
            "acceptance_rate": d["spec_decode_num_accepted_tokens"] / draft_tokens,
            "mean_accepted_length": d["spec_decode_num_emitted_tokens"] / drafts}


def format_spec(s: dict[str, float]) -> str:
    """One table line for a run's figures."""
    return (f"      speculative decoding: acceptance rate {s['acceptance_rate']:.3f}, mean accepted "
            f"length {s['mean_accepted_length']:.2f} ({int(s['draft_tokens'])} draft tokens in "
            f"{int(s['verify_rows'])} verify rows)")
