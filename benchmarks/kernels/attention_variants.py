"""Benchmark cases for the GQA attention variants (kernels/triton/gqa.py): sliding window,
sinks, soft-capping, each against the plain kernel on the same shape.

Shape: GPT-OSS-20B at TP1: 64 query heads, 8 KV heads, head dim 64, window 128 (its
alternate layers), bf16, page size 16, pages scattered (a random permutation of the pool).
Batch 1 and 32, context 8K and 32K. Variants: default (full causal), window, sinks,
softcap (30), window+sinks (GPT-OSS's sliding layers; its full layers are `sinks`).

Minimum bytes and FLOPs of one launch (what `harness.run_case` divides by), with
Lv = min(L, W) the keys a query sees and Hq, Hkv, D, e = 2 bytes:
* decode, B sequences of context L: bytes = 2 * B * Lv * Hkv * D * e (K and V of the keys
  read) + q and out (2 * B * Hq * D * e) + block-table entries (B * Lv / 16 * 4);
  FLOPs = 4 * B * Lv * Hq * D. Memory bound: the roof is the copy bandwidth. A windowed
  decode reads 256 KB per sequence, so at B = 1 it measures launch latency, not bandwidth
  (and its k input sets fit in L2: the harness caps them at 16).
* prefill, B sequences each with a chunk of n = tokens / B over a cached prefix L - n:
  FLOPs = 4 * Hq * D * sum over the chunk's queries of the keys each sees (causal: prefix +
  i + 1; windowed: min(that, W)); bytes = q + out + K/V of the keys the chunk sees
  (L, or n + W - 1 windowed), once. Full attention is compute bound (roof: bf16 mm);
  a 128-key window makes q/out dominate, so it lands near the memory side.
The harness reports both fractions and names the larger as the bound.

    python -m benchmarks.kernels.attention_variants                     # all, on a GPU
    python -m benchmarks.kernels.attention_variants --only decode --out results.json
    python -m benchmarks.kernels.attention_variants --list              # no GPU needed
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HQ, HKV, D, PAGE, WINDOW = 64, 8, 64, 16, 128
SOFTCAP = 30.0
ELEM = 2  # bf16
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "window": {"window": WINDOW},
    "sinks": {"sinks": True},
    "softcap": {"softcap": SOFTCAP},
    "window+sinks": {"window": WINDOW, "sinks": True},
}


def _inputs(batch: int, ctx: int, tokens: int, device: torch.device, spec: dict[str, Any]):
    nb = batch * -(-ctx // PAGE)
    cache = torch.randn(2, nb, PAGE, HKV, D, dtype=torch.bfloat16, device=device)
    tables = torch.randperm(nb, device=device).to(torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(tokens, HQ, D, dtype=torch.bfloat16, device=device)
    args = dict(spec)
    if args.get("sinks"):
        args["sinks"] = torch.randn(HQ, dtype=torch.bfloat16, device=device)
    return cache, tables, seq_lens, q, args


def decode_case(batch: int, ctx: int, variant: str) -> dict[str, Any]:
    spec = VARIANTS[variant]
    seen = min(ctx, spec.get("window", ctx))

    def build(device: torch.device) -> Callable[[], torch.Tensor]:
        from tscompile.kernels.triton.gqa import decode

        cache, tables, seq_lens, q, args = _inputs(batch, ctx, batch, device, spec)
        return lambda: decode(q, cache, tables, seq_lens, D ** -0.5, **args)

    return {"name": f"gqa_decode_{variant}_b{batch}_ctx{ctx // 1024}k", "build": build,
            "variant": variant, "kind": "decode", "batch": batch, "ctx": ctx,
            "shapes": f"q [{batch}, {HQ}, {D}], kv_cache [2, {batch * ctx // PAGE}, {PAGE}, "
                      f"{HKV}, {D}] bf16, {variant}",
            "bytes": 2 * batch * seen * HKV * D * ELEM + 2 * batch * HQ * D * ELEM
                     + batch * (seen // PAGE) * 4,
            "flops": 4 * batch * seen * HQ * D}


def prefill_case(batch: int, ctx: int, tokens: int, variant: str) -> dict[str, Any]:
    spec = VARIANTS[variant]
    chunk = max(1, tokens // batch)
    prefix = ctx - chunk
    window = spec.get("window", 0)
    seen = [prefix + i + 1 for i in range(chunk)]
    if window:
        seen = [min(s, window) for s in seen]
    keys_read = min(ctx, chunk + window - 1) if window else ctx

    def build(device: torch.device) -> Callable[[], torch.Tensor]:
        from tscompile.kernels.triton.gqa import prefill

        cache, tables, seq_lens, q, args = _inputs(batch, ctx, batch * chunk, device, spec)
        qsl = torch.arange(0, batch * chunk + 1, chunk, dtype=torch.int32, device=device)
        return lambda: prefill(q, cache, tables, qsl, seq_lens, D ** -0.5, **args)

    return {"name": f"gqa_prefill_{variant}_b{batch}x{chunk}_ctx{ctx // 1024}k",
            "build": build, "variant": variant, "kind": "prefill", "batch": batch,
            "ctx": ctx, "chunk": chunk,
            "shapes": f"q [{batch * chunk}, {HQ}, {D}], {batch} x {chunk}-token chunks over "
                      f"{prefix} cached, bf16, {variant}",
            "bytes": batch * (2 * chunk * HQ * D * ELEM + 2 * keys_read * HKV * D * ELEM
                              + keys_read // PAGE * 4),
            "flops": 4 * HQ * D * batch * sum(seen)}


def cases(batches: list[int], contexts: list[int], tokens: int,
          variants: list[str]) -> list[dict[str, Any]]:
    out = []
    for kind in ("decode", "prefill"):
        for b in batches:
            for ctx in contexts:
                for v in variants:
                    out.append(decode_case(b, ctx, v) if kind == "decode"
                               else prefill_case(b, ctx, tokens, v))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--ctx", type=int, nargs="+", default=[8192, 32768],
                    help="context length after the step, tokens")
    ap.add_argument("--prefill-tokens", type=int, default=4096,
                    help="query tokens of a prefill step, split evenly over the batch")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--only", help="comma-separated case-name substrings (e.g. decode,b32)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--list", action="store_true", help="print the cases and exit (no GPU)")
    args = ap.parse_args(argv)
    if "default" not in args.variants:
        args.variants = ["default", *args.variants]   # every variant is compared to it
    for c in args.ctx:
        if c < 1 or c % PAGE:
            ap.error(f"--ctx {c}: a positive multiple of the page size {PAGE}")
    return args


def _selected(args: argparse.Namespace) -> list[dict[str, Any]]:
    found = cases(args.batch, args.ctx, args.prefill_tokens, args.variants)
    if args.only:
        wanted = args.only.split(",")
        found = [c for c in found if all(w in c["name"] for w in wanted)]
    return found


def _vs_default(rows: list[dict[str, Any]]) -> None:
    """Each variant's time over the default's on the same shape (1.00 = as fast)."""
    base = {(r["kind"], r["batch"], r["ctx"]): r["us"] for r in rows
            if r.get("variant") == "default" and "us" in r}
    for r in rows:
        b = base.get((r.get("kind"), r.get("batch"), r.get("ctx")))
        if b and "us" in r:
            r["time_vs_default"] = round(r["us"] / b, 3)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    selected = _selected(args)
    if args.list:
        for c in selected:
            print(f"{c['name']:44s} {c['bytes'] / 1e6:10.2f} MB {c['flops'] / 1e9:12.2f} GFLOP")
        return
    if not torch.cuda.is_available():
        sys.exit("attention_variants: needs a CUDA device (use --list to see the cases)")
    from benchmarks.kernels import harness
    from tscompile.kernels import REGISTRY
    import triton

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    roof = harness.roofs(device)
    print(f"{props.name}: copy {roof['copy_GBps']} GB/s, bf16 mm {roof['bf16_mm_TFLOPs']} "
          f"TFLOP/s, L2 {l2 / 2**20:.0f} MiB", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    rows: list[dict[str, Any]] = []
    result = {"device": props.name, "date": time.strftime("%Y-%m-%d"), "commit": commit,
              "torch": torch.__version__, "triton": triton.__version__, "roofs": roof,
              "cases": rows}
    for case in selected:
        try:
            row = harness.run_case(case, device, l2, roof)
        except Exception as e:  # report the miss, keep measuring the rest
            row = {"name": case["name"], "variant": case["variant"], "kind": case["kind"],
                   "error": f"{type(e).__name__}: {e}"[:300]}
        row["family"] = "attention_variants"
        rows.append(row)
        _vs_default(rows)
        print(json.dumps(row), flush=True)
        result["kernels"] = REGISTRY.selections()
        if args.out:                        # after every case: a timeout keeps what ran
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'case':44s} {'us':>9s} {'roof':>6s} {'bound':>8s} {'vs default':>10s}")
    for r in rows:
        if "us" not in r:
            print(f"{r['name']:44s} error {r['error']}")
            continue
        frac = max(r["frac_copy_roof"], r["frac_mm_roof"])
        print(f"{r['name']:44s} {r['us']:9.1f} {frac:6.1%} {r['bound']:>8s} "
              f"{r.get('time_vs_default', float('nan')):10.2f}")


if __name__ == "__main__":
    main()
