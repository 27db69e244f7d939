"""Per-level serving metrics from request records, the headline at a TPS/user floor, CSV I/O.

What it is: pure functions from `RequestRecord`s to numbers. Definitions (per concurrency
level; only requests that completed without error count toward throughput and latency):

    TPOT(r)     = (last chunk time - first chunk time) / (output_tokens - 1)   # mean ITL of r
    TPS/user    = mean over requests of 1 / TPOT(r)   (requests with >= 2 output tokens)
    TTFT        = request sent -> first content chunk;            p50 / p99 over requests
    ITL         = gaps between consecutive content chunks;        p50 / p99 over all gaps
    window      = first request start -> last request end (minutes)
    output TPM/GPU        = sum(output_tokens) / window / gpus
    prompt TPM/GPU        = sum(prompt_tokens) / window / gpus, split into
                            cached (usage.prompt_tokens_details.cached_tokens) + uncached
    prefix-cache hit rate = sum(cached) / sum(prompt)
    tool-call responses   = completed requests that sent tools and ended with finish_reason
                            "tool_calls" / completed requests that sent tools (None when
                            none did); `tool_calls` counts the calls streamed back

Output and prompt throughput are separate numbers and never added together; cached prompt
tokens are reported apart so a prefix-cache-heavy run cannot pass for compute. ITL is per
streamed chunk: a server that packs k tokens in a chunk shows one gap for k tokens (TPOT does
not have that bias, it uses the usage count). The headline interpolates output TPM/GPU
linearly in TPS/user between the two levels that bracket the floor. What it is not: the
plot (plot.py) or the client.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from .client import RequestRecord

FLOORS = (70.0, 200.0)          # TPS/user floors of the headline (DESIGN.md)


def percentile(xs: Iterable[float], q: float) -> float | None:
    a = np.asarray(list(xs), dtype=float)
    return float(np.percentile(a, q)) if a.size else None


def mean(xs: Iterable[float]) -> float | None:
    a = list(xs)
    return sum(a) / len(a) if a else None


def output_tokens(r: RequestRecord) -> int:
    """From usage; a server without a usage chunk falls back to the chunk count."""
    return r.output_tokens if r.output_tokens is not None else len(r.token_times)


def tpot(r: RequestRecord) -> float | None:
    n = output_tokens(r)
    if n < 2 or len(r.token_times) < 2 or r.token_times[-1] <= r.token_times[0]:
        return None
    return (r.token_times[-1] - r.token_times[0]) / (n - 1)


def summarize_level(records: list[RequestRecord], gpus: int) -> dict[str, Any]:
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if not records:
        raise ValueError("no requests at this level: nothing to summarize")
    ok = [r for r in records if r.error is None]
    window = max(r.start + r.latency for r in records) - min(r.start for r in records)
    per_min_gpu = 60.0 / max(window, 1e-9) / gpus
    tpots = [t for r in ok if (t := tpot(r))]
    tps = [1.0 / t for t in tpots]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    out = sum(output_tokens(r) for r in ok)
    known = [r for r in ok if r.prompt_tokens is not None]
    prompt = sum(r.prompt_tokens for r in known)
    cached_known = bool(known) and all(r.cached_tokens is not None for r in known)
    cached = sum(r.cached_tokens or 0 for r in known) if cached_known else None
    errors = [r.error for r in records if r.error]
    with_tools = [r for r in ok if r.tools]

    def rate(n: int | None) -> float | None:
        return n * per_min_gpu if n is not None else None
    return {
        "concurrency": records[0].level,
        "requests": len(records), "completed": len(ok), "errors": len(errors),
        "error_examples": list(dict.fromkeys(errors))[:3],
        "sessions": len({r.session for r in records}),
        "short_replies": sum(output_tokens(r) < r.max_tokens for r in ok),
        "window_s": window,
        "tps_user_mean": mean(tps), "tps_user_p50": percentile(tps, 50),
        "tps_user_p10": percentile(tps, 10),
        "tpot_mean_s": mean(tpots),
        "ttft_p50_s": percentile([r.ttft for r in ok if r.ttft is not None], 50),
        "ttft_p99_s": percentile([r.ttft for r in ok if r.ttft is not None], 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "output_tokens": out, "output_tpm_per_gpu": rate(out),
        "prompt_tokens": prompt, "prompt_tpm_per_gpu": rate(prompt),
        "cached_prompt_tokens": cached,
        "uncached_prompt_tokens": prompt - cached if cached is not None else None,
        "cached_prompt_tpm_per_gpu": rate(cached),
        "uncached_prompt_tpm_per_gpu": rate(prompt - cached) if cached is not None else None,
        "prefix_cache_hit_rate": cached / prompt if cached is not None and prompt else None,
        "mean_prompt_tokens": prompt / len(known) if known else None,
        "tool_requests": len(with_tools),
        "tool_call_responses": (sum(r.finish_reason == "tool_calls" for r in with_tools)
                                / len(with_tools)) if with_tools else None,
        "tool_calls": sum(r.tool_calls for r in with_tools),
    }


def at_floor(levels: list[dict[str, Any]], floor: float) -> dict[str, Any]:
    """Output TPM/GPU where TPS/user crosses `floor`, interpolated linearly (in TPS/user)
    between consecutive levels (by concurrency); the best crossing if it crosses more than
    once. None with a reason when the floor lies outside the measured range."""
    pts = sorted((lv["concurrency"], lv["tps_user_mean"], lv["output_tpm_per_gpu"])
                 for lv in levels if lv.get("tps_user_mean") is not None
                 and lv.get("output_tpm_per_gpu") is not None)
    res: dict[str, Any] = {"floor_tps_user": floor, "output_tpm_per_gpu": None,
                           "between_concurrency": None, "reason": None}
    if not pts:
        res["reason"] = "no level measured TPS/user (no request with >= 2 output tokens)"
        return res
    best: tuple[float, list[int]] | None = None
    for (ca, xa, ya), (cb, xb, yb) in zip(pts, pts[1:]):
        if min(xa, xb) <= floor <= max(xa, xb) and xa != xb:
            y = ya + (floor - xa) * (yb - ya) / (xb - xa)
            if best is None or y > best[0]:
                best = (y, [ca, cb])
    for c, x, y in pts:                       # a level exactly on the floor
        if math.isclose(x, floor) and (best is None or y > best[0]):
            best = (y, [c, c])
    if best is not None:
        res["output_tpm_per_gpu"], res["between_concurrency"] = best
        return res
    lo = min(pts, key=lambda p: p[1])
    hi = max(pts, key=lambda p: p[1])
    if lo[1] > floor:
        res["reason"] = (f"every level is above the floor (lowest {lo[1]:.1f} TPS/user at "
                         f"concurrency {lo[0]}): measure higher concurrency to reach it")
    else:
        res["reason"] = (f"no level reaches the floor (best {hi[1]:.1f} TPS/user at "
                         f"concurrency {hi[0]})")
    return res


def headline(levels: list[dict[str, Any]], floors: Iterable[float] = FLOORS
             ) -> dict[str, dict[str, Any]]:
    return {f"{f:g}": at_floor(levels, f) for f in floors}


# --- raw per-request CSV ------------------------------------------------------------------

_COLUMNS = [f.name for f in fields(RequestRecord)]


def write_csv(path: str | Path, records: list[RequestRecord]) -> Path:
    """One row per request; `token_times` as space-separated seconds since the request."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_COLUMNS + ["tpot_s"])
        w.writeheader()
        for r in records:
            row = {c: getattr(r, c) for c in _COLUMNS}
            row["token_times"] = " ".join(f"{t:.6f}" for t in r.token_times)
            row["tpot_s"] = tpot(r)
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def read_csv(path: str | Path) -> list[RequestRecord]:
    ints = {"level", "turn", "max_tokens", "output_tokens", "prompt_tokens", "cached_tokens",
            "tools", "tool_calls"}
    floats = {"start", "latency", "ttft"}
    out = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            kw: dict[str, Any] = {}
            for c in _COLUMNS:
                v = row.get(c)
                if v is None:                  # a column an older CSV lacks: its default
                    continue
                if c == "token_times":
                    kw[c] = [float(t) for t in v.split()]
                elif v == "":
                    kw[c] = None
                else:
                    kw[c] = int(v) if c in ints else float(v) if c in floats else v
            out.append(RequestRecord(**kw))
    return out


def summarize(records: list[RequestRecord], gpus: int) -> list[dict[str, Any]]:
    """One summary per concurrency level, in level order."""
    by_level: dict[int, list[RequestRecord]] = {}
    for r in records:
        by_level.setdefault(r.level, []).append(r)
    return [summarize_level(by_level[c], gpus) for c in sorted(by_level)]
