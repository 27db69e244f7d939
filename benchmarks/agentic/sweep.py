"""The concurrency sweep: one server, levels 1, 2, 4, ... 32, a warm-up, files on disk.

What it is: resolve the model (/v1/models), run an uncounted warm-up once, then each
concurrency level with the client (each level starts from the workload's first session, so
every level replays the same shapes), and write into the output folder:

    requests.csv   one row per request (raw; metrics can be recomputed from it)
    summary.json   metadata (server URL, model, tsrun's kernel per op, gpus, date, git
                   commit, workload, client settings) + per-level metrics + the headline at
                   the TPS/user floors + the "ceiling" block (ceiling.py: the roofline
                   ceiling for this workload, model and card, and the fraction of it measured
                   at each floor) when a model and roofs are given
    pareto.png     TPS/user against output TPM/GPU

What it is not: a server launcher (start tsrun, vLLM, ... yourself and pass --url).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from . import ceiling as CE
from . import client as C
from . import metrics as M
from . import plot as P
from .workload import Session, describe

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class SweepConfig:
    out: str
    levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    gpus: int = 1                        # GPUs serving the model (TPM is divided by it)
    label: str | None = None             # curve name (default: the model id)
    warmup_sessions: int = 2             # run concurrently before the first level, not counted
    warmup_turns: int = 2
    floors: tuple[float, ...] = M.FLOORS

    def __post_init__(self):
        if not self.levels or any(c < 1 for c in self.levels):
            raise ValueError(f"levels must be concurrencies >= 1, got {self.levels}")
        if self.gpus < 1:
            raise ValueError(f"gpus must be >= 1, got {self.gpus}")
        if self.warmup_sessions < 0 or self.warmup_turns < 1:
            raise ValueError(f"warm-up needs sessions >= 0 and turns >= 1, got "
                             f"{self.warmup_sessions} and {self.warmup_turns}")


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                               timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None
            else None}


def server_models(cfg: C.ClientConfig) -> list[str]:
    r = httpx.get(cfg.url.rstrip("/") + "/v1/models", headers=C.headers(cfg), timeout=30)
    r.raise_for_status()
    return [m["id"] for m in r.json().get("data") or []]


def server_kernels(cfg: C.ClientConfig) -> dict[str, str] | None:
    """tsrun's kernel per op (`tsrun_kernel_info` on /metrics); None from another server."""
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(cfg.url.rstrip("/") + "/metrics", headers=C.headers(cfg), timeout=30)
    if r.status_code != 200:
        return None
    found = {s.labels["op"]: s.labels["backend"]
             for fam in text_string_to_metric_families(r.text) if fam.name == "tsrun_kernel_info"
             for s in fam.samples}
    return found or None


def metadata(ccfg: C.ClientConfig, scfg: SweepConfig, model: str, models: list[str],
             sessions: list[Session], workload: dict[str, Any], tag: str) -> dict[str, Any]:
    client = {k: v for k, v in dataclasses.asdict(ccfg).items() if k != "api_key"}
    return {"label": scfg.label or model, "server_url": ccfg.url, "model": model,
            "server_models": models, "server_kernels": server_kernels(ccfg), "gpus": scfg.gpus,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_commit(), "run_tag": tag, "levels": list(scfg.levels),
            "warmup": {"sessions": scfg.warmup_sessions, "turns": scfg.warmup_turns},
            "client": client, "workload": {**workload, "shape": describe(sessions)},
            "host": {"platform": platform.platform(), "python": sys.version.split()[0]}}


@dataclass(frozen=True, slots=True)
class CeilingSpec:
    """What the ceiling needs besides the workload: the model's sizes and the card's roofs."""
    model: CE.ModelStats
    roofs: CE.Roofs
    kv_pool_tokens: float | None = None
    gpu_memory_bytes: float | None = None


def ceiling_block(spec: CeilingSpec | None, scfg: SweepConfig, sessions: list[Session],
                  levels: list[dict[str, Any]] | None = None,
                  headline: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    if spec is None:
        return {"reason": "not computed: pass the model (--ceiling-preset or --ceiling-program) "
                          "and the roofs (--roofs FILE, --measure-roofs, or --bw and --flops)"}
    return CE.block(spec.model, CE.workload_stats(sessions, "the replayed workload"),
                    spec.roofs, gpus=scfg.gpus, kv_pool_tokens=spec.kv_pool_tokens,
                    gpu_memory_bytes=spec.gpu_memory_bytes, floors=scfg.floors,
                    levels=levels, headline=headline)


def run_sweep(ccfg: C.ClientConfig, scfg: SweepConfig, sessions: list[Session],
              workload: dict[str, Any] | None = None,
              ceiling: CeilingSpec | None = None) -> dict[str, Any]:
    ceiling_block(ceiling, scfg, sessions)      # bad ceiling inputs fail before the levels
    out = Path(scfg.out)
    out.mkdir(parents=True, exist_ok=True)
    models = server_models(ccfg)
    model = ccfg.model or (models[0] if models else None)
    if model is None:
        raise RuntimeError(f"{ccfg.url}/v1/models lists no model; pass --model")
    tag = "r" + os.urandom(3).hex()       # fresh per run: no prefix hits from an earlier run
    meta = metadata(ccfg, scfg, model, models, sessions, workload or {}, tag)

    if scfg.warmup_sessions:
        wcfg = dataclasses.replace(ccfg, sessions=scfg.warmup_sessions, duration=None)
        warm = C.run(wcfg, sessions, scfg.warmup_sessions, tag=f"{tag}-warmup",
                     max_turns=scfg.warmup_turns, model=model)
        bad = [r.error for r in warm if r.error]
        if bad:
            raise RuntimeError(f"warm-up against {ccfg.url} failed ({len(bad)} of "
                               f"{len(warm)} requests): {bad[0]}")
    records: list[C.RequestRecord] = []
    levels = []
    for c in scfg.levels:
        recs = C.run(ccfg, sessions, c, tag=tag, model=model)
        records += recs
        lv = M.summarize_level(recs, scfg.gpus)
        levels.append(lv)
        print(format_level(lv), file=sys.stderr, flush=True)
    M.write_csv(out / "requests.csv", records)
    headline = M.headline(levels, scfg.floors)
    summary = {"metadata": meta, "levels": levels, "headline": headline,
               "ceiling": ceiling_block(ceiling, scfg, sessions, levels, headline)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    P.pareto([summary], out / "pareto.png", scfg.floors)
    return summary


def _f(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def format_level(lv: dict[str, Any]) -> str:
    return (f"c={lv['concurrency']:>3} req={lv['completed']}/{lv['requests']} "
            f"err={lv['errors']} TPS/user={_f(lv['tps_user_mean'])} "
            f"TTFT p50/p99={_f(lv['ttft_p50_s'], 1e3, 0)}/{_f(lv['ttft_p99_s'], 1e3, 0)}ms "
            f"ITL p50/p99={_f(lv['itl_p50_s'], 1e3)}/{_f(lv['itl_p99_s'], 1e3)}ms "
            f"out TPM/GPU={_f(lv['output_tpm_per_gpu'], 1, 0)} "
            f"prompt TPM/GPU cached/uncached={_f(lv['cached_prompt_tpm_per_gpu'], 1, 0)}/"
            f"{_f(lv['uncached_prompt_tpm_per_gpu'], 1, 0)} "
            f"hit={_f(lv['prefix_cache_hit_rate'], 100)}%"
            + (f" tool_calls={_f(lv['tool_call_responses'], 100)}%"
               if lv.get("tool_requests") else ""))


def format_headline(summary: dict[str, Any]) -> str:
    lines = []
    for h in summary["headline"].values():
        v = h["output_tpm_per_gpu"]
        lines.append(f"output TPM/GPU at {h['floor_tps_user']:g} TPS/user: "
                     + (f"{v:.0f} (between c={h['between_concurrency']})" if v is not None
                        else f"null ({h['reason']})"))
    for fr in ((summary.get("ceiling") or {}).get("fraction_of_ceiling") or {}).values():
        lines.append(CE.format_fraction(fr))
    return "\n".join(lines)
