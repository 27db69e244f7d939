"""The decode-floor scheduler on a GPU: a burst of long prompts arriving while requests
decode, with and without `--decode-floor-tps`.

What it measures: the whole engine (scheduler, step graphs, sampling) on one compiled
program with dummy weights. `--decodes` requests are prefilled to `--context` tokens and
decoding; then `--prompts` new prompts of `--prompt-len` tokens arrive at once (an agent
turn burst). Until every new prompt has its first token (and `--tail` steps more), every
step's wall time is recorded, with its decode rows, prefill tokens and the planner's
predicted time. Reported per configuration: the decoders' inter-token times during the
burst (p50 / p90 / max against 1 / floor), the new prompts' time to first token, the
prefill tokens per second, the graph/eager step counts, and for the floor run the step-time
model (profiled at start-up) with its prediction error on the burst's steps.

    python -m benchmarks.decode_floor --model qwen3 --preset qwen3-8b --floor 70 \\
        [--decodes 16] [--context 4096] [--prompts 4] [--prompt-len 8192] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.runtime.engine import Engine, EngineConfig
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import AddRequest, SamplingParams


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PlanLog:
    """The engine's scheduler with each plan's shape recorded."""

    def __init__(self, sched):
        self.sched, self.plans = sched, []

    def __getattr__(self, name):
        return getattr(self.sched, name)

    def plan(self, now):
        p = self.sched.plan(now)
        nd = p["num_decodes"]
        self.plans.append((nd, int(p["query_lens"][nd:].sum()), p["predicted_s"]))
        return p


def run(program: RankProgram, cfg: EngineConfig, a, vocab: int, max_len: int) -> dict:
    eng = Engine(program, cfg, vocab_size=vocab, max_position_embeddings=max_len,
                 dtype=program.dtype, device=a.device)
    rng = np.random.default_rng(0)
    long = SamplingParams(max_tokens=max_len - a.context - 1, temperature=0.0, ignore_eos=True)
    for i in range(a.decodes):
        assert eng.add(AddRequest(f"d{i}", tuple(rng.integers(0, vocab, a.context).tolist()),
                                  long)) is None
    while eng.stats().running < a.decodes or any(
            eng.sched.state_of(eng.keys[f"d{i}"]) != "decoding" for i in range(a.decodes)):
        eng.step()
    for _ in range(8):
        eng.step()
    log = PlanLog(eng.sched)
    eng.sched = log
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(a.prompts):
        eng.add(AddRequest(f"p{i}", tuple(rng.integers(0, vocab, a.prompt_len).tolist()),
                           short))
    last = {f"d{i}": t0 for i in range(a.decodes)}
    itl, ttft, steps, eager0 = [], {}, [], eng.eager_steps
    tail = None
    while tail is None or tail > 0:
        sync()
        s = time.perf_counter()
        outs = eng.step()
        sync()
        e = time.perf_counter()
        steps.append(e - s)
        for o in outs:
            if o.rid in last and o.token_ids:
                itl.append(e - last[o.rid])
                last[o.rid] = e
            elif o.rid.startswith("p") and o.token_ids and o.rid not in ttft:
                ttft[o.rid] = e - t0
        if tail is None and len(ttft) == a.prompts:
            tail = a.tail
        elif tail is not None:
            tail -= 1
    burst_s = max(ttft.values())
    plans = log.plans[-len(steps):]
    mixed = [(t, p) for t, p in zip(steps, plans) if p[0] and p[1]]
    pred_err = [t / p[2] - 1 for t, p in mixed if p[2] > 0]
    q = np.quantile
    res = {"floor_tps": cfg.decode_floor_tps,
           "steps": len(steps), "eager_steps": eng.eager_steps - eager0,
           "itl_ms_p50": round(float(q(itl, 0.5)) * 1e3, 2),
           "itl_ms_p90": round(float(q(itl, 0.9)) * 1e3, 2),
           "itl_ms_max": round(max(itl) * 1e3, 2),
           "itl_fraction_within_floor": (round(float(np.mean(np.array(itl) <= 1 /
                                                               cfg.decode_floor_tps)), 3)
                                         if cfg.decode_floor_tps else None),
           "ttft_s_max": round(burst_s, 3), "ttft_s_mean": round(float(np.mean(
               list(ttft.values()))), 3),
           "prefill_tokens_per_s": round(a.prompts * a.prompt_len / burst_s),
           "mixed_steps": len(mixed),
           "mixed_step_ms_p50": round(float(q([t for t, _ in mixed], 0.5)) * 1e3, 2)
           if mixed else None,
           "mixed_prefill_tokens_p50": int(q([p[1] for _, p in mixed], 0.5)) if mixed else None,
           "measured_over_predicted_p50": round(float(q(pred_err, 0.5)) + 1, 3)
           if pred_err else None,
           "measured_over_predicted_max": round(max(pred_err) + 1, 3) if pred_err else None,
           "step_model": eng.step_model.to_dict() if eng.step_model else None,
           "profile": [{"decode_context": list(s.decode_context), "chunks": list(s.chunks),
                        "seconds": s.seconds} for s in eng.step_samples]}
    del eng
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3")
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--floor", type=float, default=70.0)
    ap.add_argument("--decodes", type=int, default=16)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--tail", type=int, default=8)
    ap.add_argument("--budget", type=int, default=4096, help="--max-num-batched-tokens")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run only)")
    ap.add_argument("--out")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = build(a.model, preset=a.preset, mesh=Mesh.build(1)).save(
        Path(tempfile.mkdtemp()) / f"{a.preset}.tsprog")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    program = RankProgram(path, 0, dummy_seed=0, dtype=dtype, device=a.device)
    c = program.config
    max_len = min(max(a.context, a.prompt_len) + 4096,
                  getattr(c, "max_position_embeddings", None) or 1 << 30)
    rows = []
    for floor in (0.0, a.floor):
        cfg = EngineConfig(max_num_seqs=a.decodes + a.prompts, max_num_batched_tokens=a.budget,
                           kv_cache_tokens=(a.decodes + a.prompts) * (max_len + 16),
                           page_size=16, max_model_len=max_len, decode_floor_tps=floor)
        rows.append(run(program, cfg, a, c.vocab_size, max_len))
        print({k: v for k, v in rows[-1].items() if k != "profile"}, flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    result = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
              "torch": torch.__version__,
              "host": platform.node(), "commit": commit, "model": f"{a.model}:{a.preset}",
              "dtype": str(dtype), "args": vars(a), "rows": rows}
    print(f"{'floor':>6} {'ITL p50':>8} {'p90':>8} {'max':>8} {'<=floor':>7} {'TTFT max':>8} "
          f"{'prefill t/s':>11} {'mixed':>5} {'eager':>5}")
    for r in rows:
        print(f"{r['floor_tps']:>6} {r['itl_ms_p50']:>8} {r['itl_ms_p90']:>8} "
              f"{r['itl_ms_max']:>8} {str(r['itl_fraction_within_floor']):>7} "
              f"{r['ttft_s_max']:>8} {r['prefill_tokens_per_s']:>11} {r['mixed_steps']:>5} "
              f"{r['eager_steps']:>5}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
