"""The Pareto plot: TPS/user (x) against output TPM/GPU (y), one curve per engine or config.

What it is: a PNG from one or more sweep summaries (summary.json), each a labelled curve of
its concurrency levels, with the TPS/user floors drawn as vertical lines and each curve's
headline (output TPM/GPU at the floor) marked. A summary with a "ceiling" block
(ceiling.py) also gets its roofline ceiling as a dashed line of the same colour, labelled
"<label> ceiling", and the measured curve's legend entry carries the headline fractions
("(of ceiling: x% at 70, y% at 200 TPS/user)"). Up and to the right is better; the floor
reading is where a curve crosses a line. What it is not: a metric computation (metrics.py);
only output tokens are plotted (prompt throughput is in the JSON, never on this axis).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")            # files only, no display (CI, device machine)
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import FLOORS  # noqa: E402


def load_summary(path: str | Path) -> dict[str, Any]:
    d = json.loads(Path(path).read_text())
    if "levels" not in d:
        raise ValueError(f"{path}: not a sweep summary (no 'levels'); hint: pass the "
                         f"summary.json a sweep wrote")
    return d


def _pct(fr: dict[str, Any] | None) -> str:
    return "-" if not fr or fr.get("fraction") is None else f"{100 * fr['fraction']:.0f}%"


def ceiling_xy(ceiling: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The ceiling curve to draw: its points up to F_max, then straight down to 0 there."""
    top = ceiling.get("tps_user_max")
    pts = [(p["tps_user"], p["output_tpm_per_gpu"]) for p in ceiling.get("curve") or ()
           if top is None or p["tps_user"] <= top * (1 + 1e-9)]
    pts.sort()
    if top is not None and pts:
        pts.append((top, 0.0))
    return [x for x, _ in pts], [y for _, y in pts]


def figure(summaries: list[dict[str, Any]], floors: tuple[float, ...] = FLOORS,
           title: str | None = None):
    """The Pareto figure (matplotlib Figure); `pareto` writes it."""
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    top = 0.0
    xmax = 0.0
    for s in summaries:
        meta = s.get("metadata", {})
        label = meta.get("label") or meta.get("model") or "run"
        ceiling = s.get("ceiling") or {}
        pts = [(lv["tps_user_mean"], lv["output_tpm_per_gpu"], lv["concurrency"])
               for lv in s["levels"] if lv.get("tps_user_mean") is not None]
        fracs = ceiling.get("fraction_of_ceiling")
        shown = label
        if fracs:
            shown += " (of ceiling: " + ", ".join(
                f"{_pct(fr)} at {k}" for k, fr in fracs.items()) + " TPS/user)"
        color = None
        if pts:
            xs, ys, _ = zip(*pts)
            top = max(top, *ys)
            xmax = max(xmax, *xs)
            (line,) = ax.plot(xs, ys, marker="o", label=shown)
            color = line.get_color()
            for x, y, c in pts:
                ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=color)
            for h in (s.get("headline") or {}).values():
                if h.get("output_tpm_per_gpu") is not None:
                    ax.plot([h["floor_tps_user"]], [h["output_tpm_per_gpu"]], marker="*",
                            markersize=12, color=color)
        cx, cy = ceiling_xy(ceiling)
        if cx:
            ax.plot(cx, cy, linestyle="--", linewidth=1.5, color=color,
                    label=f"{label} ceiling")
            top = max(top, *cy)
            xmax = max(xmax, *cx)
    for f in floors:
        ax.axvline(f, color="grey", linestyle="--", linewidth=1)
        ax.text(f, 1.0, f" {f:g} TPS/user", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8, color="grey")
    gpus = sorted({s.get("metadata", {}).get("gpus") for s in summaries} - {None})
    ax.set_xlabel("TPS/user (1 / mean inter-token time, tokens/s)")
    ax.set_ylabel(f"output tokens / minute / GPU (gpus={','.join(map(str, gpus)) or '?'})")
    ax.set_title(title or "Agentic replay: output throughput per GPU against per-user speed")
    ax.set_xlim(0, max(xmax, *floors) * 1.08)
    ax.set_ylim(0, top * 1.12 or 1.0)          # room for the c=N labels
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def pareto(summaries: list[dict[str, Any]], path: str | Path,
           floors: tuple[float, ...] = FLOORS, title: str | None = None) -> Path:
    fig = figure(summaries, floors, title)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
