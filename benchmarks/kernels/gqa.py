"""Benchmark cases for the Triton paged GQA kernels (kernels/triton/gqa.py).

Shapes: Llama-3.1-8B at TP1 (32 query heads, 8 KV heads, head dim 128, bf16, page size 16),
plus head dim 64 (Llama-3.2-1B's heads). Block tables are a random permutation of the pool
(pages scattered as after many allocations), caches and queries random normal.

Minimum bytes and FLOPs of one launch (what `harness.py` divides by):
* decode, B sequences of L tokens: bytes = K and V read once (2 * B * L * Hkv * D * 2)
  + q and out (2 * B * Hq * D * 2) + block tables (B * L / 16 * 4); FLOPs = 4 * B * L * Hq * D.
  Memory bound: the roof is the copy bandwidth.
* prefill, one chunk of n tokens over a cached prefix of P: FLOPs = 4 * Hq * D * (n * P +
  n * (n + 1) / 2) (causal: the diagonal block counts its lower triangle only); bytes = q +
  out + K/V of the P + n context, once. Compute bound: the roof is the bf16 matrix rate.

    python -m benchmarks.kernels.harness --only gqa       # every case against the roofs
    python -m benchmarks.kernels.gqa --sweep              # launch-config sweep, one table
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

HQ, HKV, PAGE = 32, 8, 16
ELEM = 2  # bf16


def _cache(tokens_per_seq: int, batch: int, d: int, device: torch.device):
    nb = batch * -(-tokens_per_seq // PAGE)
    cache = torch.randn(2, nb, PAGE, HKV, d, dtype=torch.bfloat16, device=device)
    tables = torch.randperm(nb, device=device).to(torch.int32).view(batch, -1)
    return cache, tables


def decode_case(batch: int, ctx: int, d: int = 128, **launch: Any) -> dict[str, Any]:
    def build(device: torch.device) -> Callable[[], torch.Tensor]:
        from tscompile.kernels.triton.gqa import decode

        cache, tables = _cache(ctx, batch, d, device)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(batch, HQ, d, dtype=torch.bfloat16, device=device)
        return lambda: decode(q, cache, tables, seq_lens, d ** -0.5, **launch)

    return {"name": f"gqa_decode_b{batch}_ctx{ctx // 1024}k_d{d}", "build": build,
            "shapes": f"q [{batch}, {HQ}, {d}], kv_cache [2, {batch * ctx // PAGE}, {PAGE}, "
                      f"{HKV}, {d}] bf16",
            "bytes": 2 * batch * ctx * HKV * d * ELEM + 2 * batch * HQ * d * ELEM
                     + batch * (ctx // PAGE) * 4,
            "flops": 4 * batch * ctx * HQ * d}


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def prefill_case(chunk: int, prefix: int, d: int = 128, tag: str = "",
                 **launch: Any) -> dict[str, Any]:
    total = prefix + chunk

    def build(device: torch.device) -> Callable[[], torch.Tensor]:
        from tscompile.kernels.triton.gqa import prefill

        cache, tables = _cache(total, 1, d, device)
        qsl = torch.tensor([0, chunk], dtype=torch.int32, device=device)
        seq_lens = torch.tensor([total], dtype=torch.int32, device=device)
        q = torch.randn(chunk, HQ, d, dtype=torch.bfloat16, device=device)
        return lambda: prefill(q, cache, tables, qsl, seq_lens, d ** -0.5, **launch)

    return {"name": f"gqa_prefill_{_k(chunk)}_over_{_k(prefix)}_d{d}{tag}",
            "build": build,
            "shapes": f"q [{chunk}, {HQ}, {d}], prefix {prefix}, bf16",
            "bytes": 2 * chunk * HQ * d * ELEM + 2 * total * HKV * d * ELEM + total // PAGE * 4,
            "flops": 4 * HQ * d * (chunk * prefix + chunk * (chunk + 1) // 2)}


CASES: list[dict[str, Any]] = [
    decode_case(32, 8192),
    decode_case(8, 32768),
    decode_case(1, 131072),
    decode_case(64, 4096),
    decode_case(32, 8192, d=64),
    prefill_case(4096, 0),
    prefill_case(4096, 16384),
    prefill_case(4096, 16384, d=64),
    # Short chunks over long cached prefixes (an agent's next turn): the split-KV kernel
    # (default) against the plain one (splits=1).
    *(prefill_case(c, p, tag=t, **kw) for c in (16, 128, 512, 2048) for p in (8192, 32768)
      for t, kw in (("", {}), ("_plain", {"splits": 1}))),
]


def _sweep(which: str) -> None:
    """Time each case under alternative launch configurations (tuning aid)."""
    from benchmarks.kernels.harness import _time_graph

    device = torch.device("cuda")
    peak = {"decode": 3.0e12, "prefill": 790e12}          # H100 copy roof, bf16 mm roof

    def row(case: dict[str, Any], label: str) -> None:
        kind = "decode" if "decode" in case["name"] else "prefill"
        try:
            t = _time_graph([case["build"](device)])
        except Exception as e:  # a config that does not compile: report it, go on
            print(f"{case['name']:36s} {label:34s} error {type(e).__name__}: {e}"[:160])
            return
        rate = (case["bytes"] if kind == "decode" else case["flops"]) / t
        print(f"{case['name']:36s} {label:34s} {t * 1e6:9.1f} us  "
              f"{rate / peak[kind]:6.1%} of roof", flush=True)
        torch.cuda.empty_cache()

    decodes = [(32, 8192, 128), (8, 32768, 128), (1, 131072, 128), (64, 4096, 128)]
    for batch, ctx, d in decodes if which in ("all", "decode") else []:
        row(decode_case(batch, ctx, d), "default")
        for bn, nw, ns in [(32, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3)]:
            row(decode_case(batch, ctx, d, block_n=bn, num_warps=nw, num_stages=ns),
                f"block_n={bn} warps={nw} stages={ns}")
        from tscompile.kernels.triton.gqa import num_splits
        for per_sm in (2, 8):
            s = num_splits(batch, HKV, ctx, device, programs_per_sm=per_sm)
            row(decode_case(batch, ctx, d, splits=s), f"splits={s} ({per_sm}/SM)")
    prefills = [(4096, 0, 128), (4096, 16384, 128), (4096, 16384, 64)]
    for chunk, prefix, d in prefills if which in ("all", "prefill") else []:
        row(prefill_case(chunk, prefix, d), "default")
        for bm, bn, nw, ns in [(128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                               (128, 128, 8, 3), (64, 64, 4, 3)]:
            row(prefill_case(chunk, prefix, d, block_m=bm, block_n=bn, num_warps=nw,
                             num_stages=ns), f"bm={bm} bn={bn} warps={nw} stages={ns}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", choices=("all", "decode", "prefill"),
                    help="time alternative launch configs")
    args = ap.parse_args()
    if args.sweep:
        _sweep(args.sweep)
    else:
        from benchmarks.kernels import harness
        import sys
        sys.argv = [sys.argv[0], "--only", "gqa"]
        harness.main()
