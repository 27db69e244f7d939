"""Scheduler planning time per step: 256 running requests at 64K context, no model.

What it measures: the C++ control plane's `plan()` (and `update()`) for a pure decode step
once every request is running: per request one token, one slot-mapping entry, and a new
block every page_size steps. Block tables live in the scheduler and are updated in place,
so the cost should be O(requests), not O(requests x context). The bar (issue 4): < 1 ms per
step on the 2-core development machine.

    python -m benchmarks.scheduler [--requests 256] [--context 65536] [--steps 200] [--out F]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from tscompile.runtime._scheduler import Scheduler


def run(requests: int, context: int, steps: int, page_size: int = 16) -> dict:
    # Requests admitted early decode while the later ones prefill (one per step): room for
    # `requests` tokens of that, plus the timed steps.
    max_len = context + requests + steps + page_size
    s = Scheduler(num_blocks=requests * (max_len // page_size + 1), page_size=page_size,
                  max_num_seqs=requests, max_num_batched_tokens=context + requests,
                  max_model_len=max_len, enable_prefix_caching=True)
    for r in range(requests):                 # distinct prompts: no sharing
        prompt = (np.arange(context, dtype=np.int64) * 7 + r * 1_000_003) % 150_000
        s.add_request(r, prompt.astype(np.int32), max_len)
    t0 = time.perf_counter()
    while True:                               # prefill everything (not timed)
        p = s.plan()
        s.update(np.zeros(p["num_sample"], np.int32))
        if not s.stats()["waiting"] and p["num_decodes"] == len(p["req_ids"]):
            break
    setup = time.perf_counter() - t0
    plan_ms, update_ms = [], []
    for _ in range(steps):
        t = time.perf_counter()
        p = s.plan()
        t1 = time.perf_counter()
        s.update(np.ones(p["num_sample"], np.int32))
        t2 = time.perf_counter()
        assert p["num_decodes"] == requests
        plan_ms.append((t1 - t) * 1e3)
        update_ms.append((t2 - t1) * 1e3)
    return {"requests": requests, "context": context, "page_size": page_size,
            "steps": steps, "prefill_setup_s": round(setup, 2),
            "plan_ms_median": round(statistics.median(plan_ms), 4),
            "plan_ms_p99": round(sorted(plan_ms)[int(0.99 * (steps - 1))], 4),
            "update_ms_median": round(statistics.median(update_ms), 4),
            "plan_plus_update_ms_median": round(statistics.median(
                [a + b for a, b in zip(plan_ms, update_ms)]), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = run(args.requests, args.context, args.steps)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result.update(machine=f"{platform.processor() or platform.machine()}, "
                          f"{__import__('os').cpu_count()} cores (CPU only)",
                  commit=commit, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
