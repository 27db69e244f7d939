"""Engine decode-step time on a GPU: CUDA graphs against eager, against the bandwidth roof.

What it measures: the whole engine step (scheduler plan, inputs, forward, sampling, update)
for B requests decoding at a given context, once every request is past its prefill, with
decode CUDA graphs (the serving default) and with --enforce-eager, on one compiled program
with dummy weights. The roof is the bytes a decode step must read (every weight once, plus
each request's K/V) over the copy bandwidth measured in the same run.

    python -m benchmarks.decode_step --model qwen3 --preset qwen3-8b \\
        [--batches 1,8,32] [--context 2048] [--steps 64] [--out F.json]
        [--kernel-profile F.json]

For a mixture-of-experts model the roof counts the weights a step touches: every non-expert
weight, and of each routed-expert tensor [E, ...] the expected number of distinct experts that
B tokens choose under uniform routing, E * (1 - (1 - k/E)^B) (k at batch 1). The LM head is
counted (decode computes one row of logits per request); tables read a row per token are not
(RoPE's cos/sin, the embedding when the head does not share it).

`--kernel-profile` records 20 more steps of each configuration with torch.profiler: GPU
kernel time per step by kernel name (launches per step, microseconds per step), the GPU's
busy time per step, and the idle time between consecutive steps' kernels (host work the GPU
waits for).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import platform
import pstats
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.kernels import REGISTRY
from tscompile.runtime.engine import Engine, EngineConfig
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import AddRequest, SamplingParams


def step_times(program: RankProgram, cfg: EngineConfig, batch: int, context: int,
               steps: int, vocab: int, max_len: int, profile: str | None = None,
               kprofile: bool = False) -> tuple[list[float], dict | None]:
    """Per-step seconds of `steps` pure-decode steps; with `profile`, also a cProfile of
    20 more steps (host time by function) printed and written to that path."""
    eng = Engine(program, cfg, vocab_size=vocab, max_position_embeddings=max_len,
                 dtype=program.dtype, device="cuda")
    params = SamplingParams(max_tokens=max_len - context - 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = tuple((7 * i + 13 * j) % vocab for j in range(context))
        assert eng.add(AddRequest(f"r{i}", prompt, params)) is None
    for _ in range(10_000):                 # prefills, until one step decodes everyone
        if len(eng.step()) == batch and eng.stats().running == batch:
            break
    for _ in range(4):                      # warm decode
        eng.step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = eng.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert len(outs) == batch, "a step that is not a pure decode of the whole batch"
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            eng.step()
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        Path(profile).write_text(out.getvalue())
        print(out.getvalue()[:6000])
    kernels = kernel_profile(eng) if kprofile else None
    del eng
    return times, kernels


def kernel_profile(eng: Engine, steps: int = 20) -> dict:
    """GPU kernel time by name over `steps` engine steps, busy/idle per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return {"steps": steps, "error": "the profiler recorded no CUDA kernels"}
    by_name: dict[str, list[float]] = {}
    busy, cur_s, cur_e, gaps = 0.0, spans[0][0], spans[0][1], []
    for s0, e0, name in spans:
        by_name.setdefault(name, []).append(e0 - s0)
        if s0 > cur_e:
            busy += cur_e - cur_s
            gaps.append(s0 - cur_e)
            cur_s, cur_e = s0, e0
        else:
            cur_e = max(cur_e, e0)
    busy += cur_e - cur_s
    wall = spans[-1][1] - spans[0][0]
    gaps.sort(reverse=True)
    table = sorted(({"kernel": n[:120], "launches_per_step": round(len(v) / steps, 2),
                     "us_per_step": round(sum(v) / steps, 2)} for n, v in by_name.items()),
                   key=lambda r: -r["us_per_step"])
    return {"steps": steps, "kernels_per_step": round(len(spans) / steps, 1),
            "kernel_us_per_step": round(sum(e - s for s, e, _ in spans) / steps, 1),
            "gpu_busy_us_per_step": round(busy / steps, 1),
            "gpu_idle_us_per_step": round((wall - busy) / steps, 1),
            # The largest gaps are the ones between steps (the host's plan, inputs, outputs).
            "largest_gaps_us": [round(g, 1) for g in gaps[:steps]],
            "by_kernel": table}


def active_weight_bytes(program: RankProgram, batch: int) -> int:
    """Weight bytes one decode step of `batch` tokens reads (see the module docstring)."""
    c = program.config
    experts = getattr(c, "n_routed_experts", None) or getattr(c, "num_experts", 0) or 0
    k = getattr(c, "num_experts_per_tok", 0) or 0
    frac = 1.0 if not experts else (1 - (1 - k / experts) ** batch)
    total = 0.0
    untied = "lm_head.weight" in program.tensors
    for name, t in program.tensors.items():
        b = t.numel() * t.element_size()
        # Tables read a row per token: RoPE's cos/sin and an embedding the head does not share.
        if name.endswith("cos_sin_cache") or (untied and name == "embed_tokens.weight"):
            continue
        if name.endswith("kv_cache"):        # the bound KV pool: the step reads its rows only
            continue
        routed = experts and name.rsplit(".", 1)[-1] in ("w13", "w2") and t.shape[0] == experts
        total += b * frac if routed else b
    return int(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3")
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, help="the engine's (block tables are this "
                    "wide; the decode kernels size their splits from it); default context + "
                    "steps + 512")
    ap.add_argument("--quant", choices=("fp8-block",), help="build with `--quant` (FP8 "
                    "block-scaled Linears; dummy weights stored FP8)")
    ap.add_argument("--out")
    ap.add_argument("--graphs-only", action="store_true", help="skip the --enforce-eager runs")
    ap.add_argument("--kernel-profile", help="torch.profiler kernel table of every "
                                             "configuration into this JSON file")
    ap.add_argument("--profile", help="cProfile 20 steps of each configuration into "
                                      "PREFIX_b<batch>_<graphs|eager>.txt")
    a = ap.parse_args()
    # INFO: the start-up lines name each op's kernel; a reference fallback on CUDA warns.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from benchmarks.kernels.harness import roofs

    device = torch.device("cuda")
    roof = roofs(device)
    path = build(a.model, preset=a.preset, mesh=Mesh.build(1), quant=a.quant).save(
        Path(tempfile.mkdtemp()) / f"{a.preset}.tsprog")
    t0 = time.perf_counter()
    program = RankProgram(path, 0, dummy_seed=0, dtype=torch.bfloat16, device=device)
    prog = program.prog
    load_s = time.perf_counter() - t0
    c = program.config
    weight_bytes = sum(t.numel() * t.element_size() for t in program.tensors.values())
    kv = prog.manifest["kv_cache"]["elements_per_token_per_rank"] * 2
    batches = [int(b) for b in a.batches.split(",")]
    max_len = a.max_model_len or a.context + a.steps + 512   # room for the decodes
    rows, profiles = [], []
    for b in batches:
        for eager in (False,) if a.graphs_only else (False, True):
            cfg = EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=8192,
                               kv_cache_tokens=max(batches) * (max_len + 16), page_size=16,
                               max_model_len=max_len, enforce_eager=eager)
            prof = (f"{a.profile}_b{b}_{'eager' if eager else 'graphs'}.txt"
                    if a.profile else None)
            times, kern = step_times(program, cfg, b, a.context, a.steps, c.vocab_size,
                                     max_len, prof, bool(a.kernel_profile))
            med = statistics.median(times)
            need = active_weight_bytes(program, b) + b * (a.context + a.steps // 2) * kv
            rows.append({"batch": b, "context": a.context, "cuda_graphs": not eager,
                         "step_ms_median": round(med * 1e3, 3),
                         "step_ms_p90": round(sorted(times)[int(0.9 * len(times))] * 1e3, 3),
                         "tokens_per_s_per_user": round(1 / med, 1),
                         "roof_ms": round(need / (roof["copy_GBps"] * 1e9) * 1e3, 3),
                         "fraction_of_roof": round(need / (roof["copy_GBps"] * 1e9) / med, 3),
                         "bytes_per_step": need})
            print(rows[-1], flush=True)
            if kern is not None:
                profiles.append({"batch": b, "cuda_graphs": not eager, **kern})
                print({k: v for k, v in kern.items() if k != "by_kernel"}, flush=True)
                for r in kern.get("by_kernel", [])[:25]:
                    print(f"  {r['us_per_step']:>9} us {r['launches_per_step']:>7} x  "
                          f"{r['kernel'][:90]}", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "host": platform.node(), "commit": commit, "model": f"{a.model}:{a.preset}",
              "dtype": "bfloat16", "weight_bytes": weight_bytes, "kv_bytes_per_token": kv,
              "dummy_weight_load_s": round(load_s, 1), "roofs": roof, "rows": rows,
              "kernels": REGISTRY.selections()}
    print(f"{'batch':>5} {'graphs':>6} {'step ms':>8} {'roof ms':>8} {'of roof':>7} {'tok/s/user':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {str(r['cuda_graphs']):>6} {r['step_ms_median']:>8} "
              f"{r['roof_ms']:>8} {r['fraction_of_roof']:>7} {r['tokens_per_s_per_user']:>10}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    if a.kernel_profile:
        Path(a.kernel_profile).write_text(json.dumps({"commit": commit, "device": result[
            "device"], "model": result["model"], "context": a.context,
            "profiles": profiles}, indent=1))


if __name__ == "__main__":
    main()
