"""Benchmark cases for the Triton MoE kernels (kernels/triton/moe.py), for harness.py.

moe_experts at the Moonlight-16B-A3B shape (E=64, k=6, H=2048, I=1408) and the Kimi K2.5
per-GPU shape under EP8 (384 experts / 8 = 48 held, k=8, H=7168, I=2048), bf16.

Bytes are the minimum that must move: the weights of the *distinct held experts the routing
touches* (3*I*H*2 bytes each, read once), x read and out written once, the routing read
once. The routing is drawn here with a fixed seed, so that count is exact for each case (the
expected count under uniform routing, E * (1 - (1 - k/E)^T) without EP, is given beside it
as `experts_expected`). FLOPs = 6 * I * H per held (token, expert) pair, padding excluded.

Kimi EP8: every rank sees all T tokens and computes only the pairs whose expert it holds
(rank 3 here: experts [144, 192)). At T=1 an average rank holds 1 of the token's 8 experts
(`kimi_ep8_t1`); the slowest rank of a step can hold all 8 (`kimi_ep8_t1_worst`).

One token takes the decode path (pick_config: two launches, no align / slot-sum); the
`*_aligned` cases time the general four-launch path on the same one-token inputs, so both
regimes are measured side by side in one run.

    python -m benchmarks.kernels.moe [--sweep | --sweep-decode | --profile]
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch

MOONLIGHT = dict(experts=64, top_k=6, hidden=2048, width=1408)
KIMI_EP8 = dict(experts=48, global_experts=384, top_k=8, hidden=7168, width=2048,
                expert_start=3 * 48)


def expected_distinct(experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts hit by `tokens` uniform top-k draws."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def _routing(tokens: int, global_experts: int, top_k: int, seed: int,
             held: range | None = None, local_per_token: int | None = None):
    """ids [T, k] int32 (distinct per token) and softmax-like weights [T, k] fp32, on the CPU.
    With `local_per_token`, each token takes exactly that many of its experts from `held`."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(tokens):
        if local_per_token is None:
            rows.append(torch.randperm(global_experts, generator=g)[:top_k])
            continue
        inside = torch.tensor(held)[torch.randperm(len(held), generator=g)[:local_per_token]]
        outside = torch.tensor([e for e in range(global_experts) if e not in held])
        outside = outside[torch.randperm(len(outside), generator=g)[:top_k - local_per_token]]
        rows.append(torch.cat([inside, outside])[torch.randperm(top_k, generator=g)])
    ids = torch.stack(rows).to(torch.int32)
    weights = torch.rand(tokens, top_k, generator=g).softmax(-1)
    return weights, ids


def experts_case(name: str, tokens: int, *, experts: int, top_k: int, hidden: int, width: int,
                 global_experts: int | None = None, expert_start: int = 0,
                 local_per_token: int | None = None, seed: int = 0,
                 aligned: bool = False) -> dict[str, Any]:
    """`aligned`: force the general (align + two GEMMs + slot sum) path, whatever the rule
    of pick_config would take."""
    global_experts = global_experts or experts
    held = range(expert_start, expert_start + experts)
    weights, ids = _routing(tokens, global_experts, top_k, seed, held, local_per_token)
    local = ids.long() - expert_start
    mask = (local >= 0) & (local < experts)
    touched = int(local[mask].unique().numel())
    pairs = int(mask.sum())
    nbytes = touched * 3 * width * hidden * 2 + 2 * tokens * hidden * 2 + ids.numel() * 8

    def inputs(device: torch.device) -> tuple:
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        w13 = (torch.randn(experts, 2 * width, hidden, device=device, dtype=torch.bfloat16)
               * hidden ** -0.5)
        w2 = (torch.randn(experts, hidden, width, device=device, dtype=torch.bfloat16)
              * width ** -0.5)
        return x, w13, w2, weights.to(device), ids.to(device), expert_start

    def build(device: torch.device) -> Callable[[], torch.Tensor]:
        from tscompile.kernels.triton import moe as tmoe

        args = inputs(device)
        if aligned:
            cfg = tmoe.aligned_config(tokens * top_k, experts, hidden, width)
            return lambda: tmoe.experts_with_config(*args, cfg)
        return lambda: tmoe.moe_experts_triton(*args)

    return {"name": name, "op": "moe_experts", "build": build, "inputs": inputs,
            "path": "aligned" if aligned else ("decode" if tokens == 1 else "aligned"),
            "bytes": nbytes,
            "flops": 6 * pairs * width * hidden, "tokens": tokens, "experts_touched": touched,
            "experts_expected": round(expected_distinct(global_experts, top_k, tokens)
                                      * experts / global_experts, 2),
            "shapes": f"x[{tokens},{hidden}] w13[{experts},{2 * width},{hidden}] "
                      f"w2[{experts},{hidden},{width}] k={top_k}"}


def route_case(name: str, tokens: int, experts: int, top_k: int, scoring: str,
               groups: int = 1, topk_groups: int = 1, scale: float = 1.0) -> dict[str, Any]:
    def build(device: torch.device) -> Callable[[], Any]:
        from tscompile.kernels.triton.moe import moe_route_triton

        logits = torch.randn(tokens, experts, device=device)
        bias = torch.randn(experts, device=device) * 0.1 if scoring == "sigmoid" else None
        return lambda: moe_route_triton(logits, bias, top_k, scoring, True, groups,
                                        topk_groups, scale)

    return {"name": name, "op": "moe_route", "build": build,
            "bytes": tokens * experts * 4 + experts * 4 + tokens * top_k * 8, "flops": 0,
            "tokens": tokens, "shapes": f"logits[{tokens},{experts}] k={top_k} {scoring} "
                                        f"groups={groups}/{topk_groups}"}


CASES: list[dict[str, Any]] = [
    *(experts_case(f"moonlight_t{t}", t, **MOONLIGHT, seed=t) for t in (1, 4, 16, 64, 256)),
    experts_case("moonlight_t1_aligned", 1, **MOONLIGHT, seed=1, aligned=True),
    experts_case("kimi_ep8_t1", 1, **KIMI_EP8, local_per_token=1),
    experts_case("kimi_ep8_t1_aligned", 1, **KIMI_EP8, local_per_token=1, aligned=True),
    experts_case("kimi_ep8_t1_worst", 1, **KIMI_EP8, local_per_token=8),
    experts_case("kimi_ep8_t1_worst_aligned", 1, **KIMI_EP8, local_per_token=8, aligned=True),
    experts_case("kimi_ep8_t64", 64, **KIMI_EP8, seed=64),
    route_case("route_kimi_t1", 1, 384, 8, "sigmoid", scale=2.827),
    route_case("route_kimi_t256", 256, 384, 8, "sigmoid", scale=2.827),
    route_case("route_deepseek_v3_t256", 256, 256, 8, "sigmoid", 8, 4, 2.5),
    route_case("route_moonlight_t64", 64, 64, 6, "sigmoid", scale=2.446),
]


def _tiles(bm: int) -> list[tuple[int, int, int]]:
    """(block_n, block_k, stages) tried for one GEMM at row block bm."""
    return [(bn, bk, st) for bn in ((16, 32, 64) if bm <= 32 else (32, 64, 128))
            for bk in ((128, 256) if bm <= 32 else (64, 128)) for st in (3, 5)]


def _compile_worker(job: tuple) -> None:
    """Fill Triton's on-disk cache for these configs: the same hidden/width/k (the values the
    kernels specialise on) with 2 tiny experts, so the timing process only loads binaries."""
    hidden, width, top_k, cfgs = job
    from tscompile.kernels.triton import moe as tmoe

    dev = torch.device("cuda")
    x = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    w13 = torch.randn(2, 2 * width, hidden, device=dev, dtype=torch.bfloat16)
    w2 = torch.randn(2, hidden, width, device=dev, dtype=torch.bfloat16)
    ids = torch.zeros(1, top_k, dtype=torch.int32, device=dev)
    w = torch.ones(1, top_k, device=dev)
    for cfg in cfgs:
        try:
            tmoe.experts_with_config(x, w13, w2, w, ids, 0, cfg)
        except Exception:
            pass
    torch.cuda.synchronize()


def _sweep(device: torch.device, only: str | None = None) -> None:
    """Tile sweep for the experts cases: for each block_m, first the w13 GEMM's tiles (w2's
    fixed at pick_config's), then the w2 GEMM's with the best w13 tiles. The two kernels
    run one after the other, so their times add and can be tuned apart."""
    import dataclasses
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from benchmarks.kernels.harness import _time_graph
    from tscompile.kernels.triton import moe as tmoe

    cases = [c for c in CASES if c["op"] == "moe_experts" and c["path"] == "aligned"
             and (not only or only in c["name"])]
    jobs, seen = [], set()
    for case in cases:
        spec = KIMI_EP8 if "kimi" in case["name"] else MOONLIGHT
        for bm in _bms(case):
            if (spec["hidden"], bm) in seen:
                continue
            seen.add((spec["hidden"], bm))
            cfgs = [tmoe.MoeConfig(bm, bn, bk, 4, st, bn, bk, 4, st) for bn, bk, st in _tiles(bm)]
            jobs += [(spec["hidden"], spec["width"], spec["top_k"], cfgs[j::4]) for j in range(4)]
    with ProcessPoolExecutor(12, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_compile_worker, jobs))
    print(f"precompiled {len(jobs)} jobs", flush=True)

    for case in cases:
        x, w13, w2, w, i, start = case["inputs"](device)
        base = tmoe.aligned_config(i.numel(), w13.shape[0], x.shape[1], w13.shape[1] // 2)

        def timed(cfg):
            try:
                return _time_graph([lambda: tmoe.experts_with_config(x, w13, w2, w, i, start,
                                                                     cfg)])
            except Exception:            # e.g. out of shared memory / registers
                return float("inf")

        t_base = timed(base)
        print(f"{case['name']}: picked {t_base * 1e6:.1f} us "
              f"({case['bytes'] / t_base / 1e9:.0f} GB/s) {base}", flush=True)
        best = (t_base, base)
        for bm in _bms(case):
            cfg = dataclasses.replace(base, block_m=bm)
            for k in (1, 2):
                trials = [(timed(c), c) for c in (
                    dataclasses.replace(cfg, **{f"block_n{k}": bn, f"block_k{k}": bk,
                                                f"stages{k}": st}) for bn, bk, st in _tiles(bm))]
                t, cfg = min(trials, key=lambda r: r[0])
            print(f"   bm={bm}: {t * 1e6:7.1f} us ({case['bytes'] / t / 1e9:.0f} GB/s) {cfg}",
                  flush=True)
            best = min(best, (t, cfg), key=lambda r: r[0])
        print(f"   best {best[0] * 1e6:.1f} us {best[1]}", flush=True)
        del x, w13, w2
        torch.cuda.empty_cache()


def _sweep_decode(device: torch.device, only: str | None = None, w13: bool = False) -> None:
    """Tiles of the one-token path: (with `w13`) the w13 launch's (block_n1, block_k1,
    stages1, warps1) with decode_config's w2 tiles, then the w2-and-sum launch's (block_n2,
    block_k2, stages2, warps2) with the best w13 tiles. Two input sets per timing (> L2),
    in one CUDA graph."""
    import dataclasses

    from benchmarks.kernels.harness import _time_graph
    from tscompile.kernels.triton import moe as tmoe

    cases = [c for c in CASES if c["op"] == "moe_experts" and c["path"] == "decode"
             and (not only or only in c["name"])]
    tiles1 = [(32, 256, 3, 4), (64, 128, 4, 4)] if w13 else []
    tiles2 = [(16, 512, 3, 4), (16, 256, 8, 4), (16, 256, 5, 4), (8, 512, 6, 4),
              (32, 256, 6, 8)]
    for case in cases:
        sets = [case["inputs"](device) for _ in range(2)]
        hidden, width = sets[0][0].shape[1], sets[0][1].shape[1] // 2
        base = tmoe.decode_config(hidden, width)

        def timed(cfg):
            try:
                return _time_graph([lambda a=a: tmoe.experts_with_config(*a, cfg)
                                    for a in sets])
            except Exception as e:       # e.g. out of shared memory / registers
                print(f"   {cfg}: {type(e).__name__}", flush=True)
                return float("inf")

        def show(tag, t, cfg):
            print(f"{case['name']} {tag}: {t * 1e6:7.1f} us "
                  f"({case['bytes'] / t / 1e9:.0f} GB/s) n1={cfg.block_n1} k1={cfg.block_k1} "
                  f"s1={cfg.stages1} n2={cfg.block_n2} k2={cfg.block_k2} s2={cfg.stages2} "
                  f"w2={cfg.warps2}",
                  flush=True)

        best = (timed(base), base)
        show("picked", *best)
        for k, tiles in ((1, tiles1), (2, tiles2)):
            start = best[1]
            for bn, bk, st, warps in tiles:
                cfg = dataclasses.replace(start, **{f"block_n{k}": bn, f"block_k{k}": bk,
                                                    f"stages{k}": st, f"warps{k}": warps})
                if cfg == start:
                    continue
                t = timed(cfg)
                show(f"w{'13' if k == 1 else '2'}", t, cfg)
                best = min(best, (t, cfg), key=lambda r: r[0])
        show("best", *best)
        del sets
        torch.cuda.empty_cache()


def _profile(device: torch.device, only: str | None = None, tiles: str | None = None) -> None:
    """Per-kernel GPU time (torch.profiler / CUPTI) of each experts case, 4 input sets.
    `tiles` "bn1,bk1,stages1,bn2,bk2,stages2" overrides pick_config's (block_m kept)."""
    import dataclasses
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    from tscompile.kernels.triton import moe as tmoe

    if tiles:
        bn1, bk1, st1, bn2, bk2, st2 = (int(v) for v in tiles.split(","))
        pick = tmoe.pick_config
        tmoe.moe_experts_triton.__globals__["pick_config"] = lambda *a: dataclasses.replace(
            pick(*a), block_n1=bn1, block_k1=bk1, stages1=st1, block_n2=bn2, block_k2=bk2,
            stages2=st2)
    for case in CASES:
        if case["op"] != "moe_experts" or (only and only not in case["name"]):
            continue
        sets = [case["inputs"](device) for _ in range(2 if case["bytes"] > 5e8 else 4)]

        def run(a, aligned=case["path"] == "aligned" and case["tokens"] == 1):
            if aligned:      # the general path on one token (pick_config takes decode)
                x, w13 = a[0], a[1]
                return tmoe.experts_with_config(*a, tmoe.aligned_config(
                    a[4].numel(), w13.shape[0], x.shape[1], w13.shape[1] // 2))
            return tmoe.moe_experts_triton(*a)

        for a in sets:
            run(a)
        torch.cuda.synchronize()
        reps = 10
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                for a in sets:
                    run(a)
            torch.cuda.synchronize()
        per = defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[ev.name] += ev.device_time / (reps * len(sets))
        total = sum(per.values())
        print(f"{case['name']}: kernels {total:.1f} us ({case['bytes'] / total / 1e3:.0f} GB/s) "
              + ", ".join(f"{k.split('_kernel')[0].lstrip('_')} {v:.1f}" for k, v in per.items()),
              flush=True)
        del sets
        torch.cuda.empty_cache()


def _bms(case: dict[str, Any]) -> tuple[int, ...]:
    return (16, 32, 64) if case["tokens"] < 256 else (32, 64, 128)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-decode", action="store_true", help="one-token path tiles")
    ap.add_argument("--sweep-w13", action="store_true", help="with --sweep-decode: w13 too")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", help="case-name substring (with --sweep or --profile)")
    ap.add_argument("--tiles", help="with --profile: bn1,bk1,stages1,bn2,bk2,stages2")
    args = ap.parse_args()
    if args.profile:
        _profile(torch.device("cuda"), args.only, args.tiles)
    elif args.sweep:
        _sweep(torch.device("cuda"), args.only)
    elif args.sweep_decode:
        _sweep_decode(torch.device("cuda"), args.only, w13=args.sweep_w13)
    else:
        from benchmarks.kernels.harness import main

        sys.argv = [sys.argv[0], "--only", "moe"]
        main()
