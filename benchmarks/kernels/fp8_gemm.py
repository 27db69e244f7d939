"""Block-scaled FP8 linear (kernels/triton/fp8.py) against its roofs and bf16, in one run.

Roofs, measured first on the same GPU: the FP8 matmul roof (torch._scaled_mm, 8192^3 e4m3
with per-tensor scales, bf16 out: the fastest FP8 GEMM torch has; rowwise scales beside
it), the bf16 matmul roof and the copy-bandwidth roof (harness.roofs: bf16 8192^3 mm, 2 GiB
copy, bytes = read + write).

Cases (x bf16, weight [N, K] e4m3 in 128 x 128 blocks, no bias), real linears:
  Qwen3-8B (hidden 4096, 32 q / 8 kv heads of 128, intermediate 12288): qkv 6144 x 4096,
  o 4096 x 4096, gate_up 24576 x 4096, down 4096 x 12288; DeepSeek-V3 (hidden 7168): q_b
  24576 x 1536, o 7168 x 16384, kv_a 576 x 7168, shared-expert down 7168 x 2048.
* prefill, M = 512, 2048, 4096 tokens (the W8A8 path): FLOPs = 2 M N K; TFLOP/s and the
  fraction of the FP8 roof, beside bf16 F.linear (fraction of the bf16 roof) and the
  same shape's per-tensor torch._scaled_mm (`scaled_mm_tensorwise`: no block scales, the
  upper bound of what block scaling can reach). The Triton path is timed with the separate
  quantize launch (`triton`, what the op runs) and with the quantization fused into the
  GEMM (`triton_fused`); `act_quant` times the quantize launch alone.
* decode, M = 1, 8 (the weight-only path): bytes = the stored bytes, N K (fp8) + scales
  + x + out (bf16: 2 N K + x + out); us, GB/s and the fraction of the copy roof.
Every case is checked against the reference before it is timed: `max_abs_err` and
`rel_err` (Frobenius) against the fp32 product of the dequantized weight and x, and, for
the W8A8 path, `rel_err_qact` against the same product on the quantized activations (the
kernel's own rounding removed: what is left is accumulation order and the output cast).
Timing: harness._time_graph (warm-up first, which compiles Triton; then k launches over k
independent input sets, k chosen so they exceed 4x L2, captured in one CUDA graph; the
median replay over k).

    python -m benchmarks.kernels.fp8_gemm --out benchmarks/results/kernels/h200_fp8_gemm.json
    python -m benchmarks.kernels.fp8_gemm --only decode --sweep     # tile sweep, printed
    TRITON_INTERPRET=1 python -m benchmarks.kernels.fp8_gemm --smoke --out /tmp/f.json  # CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

SHAPES = {  # name: (N, K)
    "qwen3_8b_qkv": (6144, 4096),
    "qwen3_8b_o": (4096, 4096),
    "qwen3_8b_gate_up": (24576, 4096),
    "qwen3_8b_down": (4096, 12288),
    "dsv3_q_b": (24576, 1536),
    "dsv3_o": (7168, 16384),
    "dsv3_kv_a": (576, 7168),
    "dsv3_shared_down": (7168, 2048),
}
PREFILL_M = (512, 2048, 4096)
DECODE_M = (1, 8)
SMOKE_SHAPES = {"tiny_256x512": (256, 512), "tiny_200x300": (200, 300)}
SMOKE_PREFILL_M = (80,)
SMOKE_DECODE_M = (1, 3)
BLOCK = [128, 128]
ROW_KEYS = ("name", "regime", "variant", "M", "N", "K", "us", "TFLOPs", "GBps", "bytes",
            "flops", "frac_fp8_roof", "frac_bf16_roof", "frac_copy_roof", "max_abs_err",
            "rel_err", "rel_err_qact", "sets_in_graph", "error")


def _weights(n: int, k: int, device: torch.device, gen: torch.Generator):
    from tscompile.kernels.fp8 import quantize_fp8_block

    w = torch.randn(n, k, generator=gen, device=device) * k ** -0.5
    return quantize_fp8_block(w)


def _inputs(m: int, n: int, k: int, device: torch.device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    wq, ws = _weights(n, k, device, gen)
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    return x, wq, ws


def check(m: int, n: int, k: int, device: torch.device, regime: str) -> dict[str, float]:
    """Errors of the Triton op at this shape against the fp32 oracle (one input set)."""
    from tscompile.kernels.fp8 import dequantize_fp8_block
    from tscompile.kernels.triton import fp8 as tfp8

    x, wq, ws = _inputs(m, n, k, device, seed=1234)
    out = tfp8.fp8_block_linear_triton(x, wq, ws, None, BLOCK).float()
    w = dequantize_fp8_block(wq, ws, BLOCK)
    ref = x.float() @ w.t()
    res = {"max_abs_err": (out - ref).abs().max().item(),
           "rel_err": ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()}
    if regime == "prefill":
        q, s = tfp8.quantize_act_reference(x)
        xq = (q.float().view(m, -1) * s.t().repeat_interleave(128, 1)[:, :k])
        refq = xq @ w.t()
        res["rel_err_qact"] = ((out - refq).norm() / refq.norm().clamp_min(1e-30)).item()
    return res


def variants(regime: str, m: int, n: int, k: int,
             device: torch.device) -> dict[str, tuple[Callable, float, float]]:
    """variant -> (builder(seed) -> zero-arg closure, bytes, flops)."""
    from tscompile.kernels.fp8 import dequantize_fp8_block
    from tscompile.kernels.triton import fp8 as tfp8

    flops = 2.0 * m * n * k
    scales = -(-n // 128) * -(-k // 128) * 4
    act = m * k * 2 + m * n * 2
    fp8_bytes, bf16_bytes = n * k + scales + act, 2 * n * k + act

    def triton_default(seed):
        x, wq, ws = _inputs(m, n, k, device, seed)
        return lambda: tfp8.fp8_block_linear_triton(x, wq, ws, None, BLOCK)

    def triton_fused(seed):
        x, wq, ws = _inputs(m, n, k, device, seed)
        cfg = dataclasses.replace(tfp8.prefill_config(m, n, k), fuse_quant=True)
        return lambda: tfp8.fp8_block_linear_triton(x, wq, ws, None, BLOCK, prefill=cfg)

    def act_quant(seed):
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        return lambda: tfp8.quantize_act(x)

    def bf16(seed):
        x, wq, ws = _inputs(m, n, k, device, seed)
        w = dequantize_fp8_block(wq, ws, BLOCK, torch.bfloat16)
        del wq, ws
        return lambda: torch.nn.functional.linear(x, w)

    def scaled_mm(seed):
        x, wq, _ = _inputs(m, n, k, device, seed)
        xq = x.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        return lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                        out_dtype=torch.bfloat16)

    out = {"triton": (triton_default, fp8_bytes, flops)}
    if regime == "prefill":
        out["triton_fused"] = (triton_fused, n * k + scales + act, flops)
        out["act_quant"] = (act_quant, 3 * m * k + m * -(-k // 128) * 4, 0.0)
        if device.type == "cuda":
            out["scaled_mm_tensorwise"] = (scaled_mm, n * k + m * k + 2 * m * n, flops)
    out["bf16"] = (bf16, bf16_bytes, flops)
    return out


def _time_cuda(build: Callable, nbytes: float, l2: int) -> tuple[float, int]:
    from benchmarks.kernels.harness import _time_graph

    free, _ = torch.cuda.mem_get_info()
    k = max(1, min(16, int(4 * l2 // max(nbytes, 1)) + 1))
    k = max(1, min(k, int(0.3 * free // max(3 * nbytes, 1))))
    fns = [build(seed) for seed in range(k)]
    t = _time_graph(fns)
    del fns
    torch.cuda.empty_cache()
    return t, k


def _time_wall(build: Callable) -> tuple[float, int]:
    fn = build(0)
    fn()                                   # warm-up (the interpreter has no compile step)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, 1


def fp8_roofs(device: torch.device, size: int = 8192) -> dict[str, float | None]:
    """FP8 matmul roof: torch._scaled_mm on size^3 e4m3, bf16 out, per-tensor and rowwise
    scales (either may be missing on this torch / GPU: None and the reason)."""
    from benchmarks.kernels.harness import _time_graph

    a = torch.randn(size, size, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device=device).to(torch.float8_e4m3fn)
    out: dict[str, Any] = {}
    one = torch.ones((), device=device)
    ra = torch.ones(size, 1, device=device)
    rb = torch.ones(1, size, device=device)
    for key, sa, sb in (("fp8_mm_tensorwise_TFLOPs", one, one),
                        ("fp8_mm_rowwise_TFLOPs", ra, rb)):
        try:
            t = _time_graph([lambda sa=sa, sb=sb: torch._scaled_mm(
                a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)], replays=30)
            out[key] = round(2 * size ** 3 / t / 1e12, 1)
        except Exception as e:                                  # noqa: BLE001
            out[key] = None
            out[key.replace("TFLOPs", "error")] = f"{type(e).__name__}: {e}"[:200]
    best = [v for k2, v in out.items() if k2.endswith("TFLOPs") and v]
    out["fp8_mm_TFLOPs"] = max(best) if best else None
    return out


def cases(smoke: bool, only: str | None) -> list[dict[str, Any]]:
    shapes = SMOKE_SHAPES if smoke else SHAPES
    rows = []
    for regime, ms in (("prefill", SMOKE_PREFILL_M if smoke else PREFILL_M),
                       ("decode", SMOKE_DECODE_M if smoke else DECODE_M)):
        for name, (n, k) in shapes.items():
            for m in ms:
                case = {"name": f"{name}_m{m}", "regime": regime, "M": m, "N": n, "K": k}
                if only and not any(w in case["name"] or w == regime for w in only.split(",")):
                    continue
                rows.append(case)
    return rows


def _frac(v: float | None, roof: float | None) -> float | None:
    return None if v is None or not roof else round(v / roof, 3)


def run(smoke: bool, only: str | None, out: Path | None) -> dict[str, Any]:
    from tscompile.kernels import REGISTRY
    from tscompile.kernels.registry import Query

    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (TRITON_INTERPRET)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit,
        "torch": torch.__version__, "triton": triton.__version__, "smoke": smoke,
        "timing": "cuda graph over k input sets" if cuda else "wall clock, one call",
        "roofs": {"copy_GBps": None, "bf16_mm_TFLOPs": None, "fp8_mm_TFLOPs": None},
        "selected": None, "rows": []}
    l2 = 50 * 2 ** 20
    if cuda:
        from benchmarks.kernels.harness import roofs

        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", l2)
        result["roofs"] = {**roofs(device), **fp8_roofs(device)}
        r = result["roofs"]
        print(f"{props.name}: copy {r['copy_GBps']} GB/s, bf16 mm {r['bf16_mm_TFLOPs']} "
              f"TFLOP/s, fp8 mm {r['fp8_mm_TFLOPs']} TFLOP/s (tensorwise "
              f"{r.get('fp8_mm_tensorwise_TFLOPs')}, rowwise "
              f"{r.get('fp8_mm_rowwise_TFLOPs')}), L2 {l2 / 2**20:.0f} MiB", flush=True)
    roof = result["roofs"]
    try:
        impl = REGISTRY.select("fp8_block_linear", Query(device, torch.bfloat16))
        result["selected"] = impl.backend
    except RuntimeError as e:
        result["selected"] = f"none: {e}"[:300]
    print(f"{'case':<28} {'variant':<21} {'us':>9} {'TFLOP/s':>8} {'GB/s':>7} "
          f"{'fp8roof':>7} {'bf16roof':>8} {'copyroof':>8} {'rel_err':>8} {'max_err':>8}",
          flush=True)
    for case in cases(smoke, only):
        m, n, k, regime = case["M"], case["N"], case["K"], case["regime"]
        try:
            errs = check(m, n, k, device, regime)
        except Exception as e:                                  # noqa: BLE001
            errs = {"error": f"check: {type(e).__name__}: {e}"[:300]}
        for variant, (build, nbytes, flops) in variants(regime, m, n, k, device).items():
            row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
            row.update(case, variant=variant, bytes=nbytes, flops=flops)
            if variant == "triton":
                row.update(errs)
            try:
                t, sets = _time_cuda(build, nbytes, l2) if cuda else _time_wall(build)
                tflops, gbs = flops / t / 1e12, nbytes / t / 1e9
                row.update(us=round(t * 1e6, 2), TFLOPs=round(tflops, 2), GBps=round(gbs, 1),
                           sets_in_graph=sets,
                           frac_fp8_roof=_frac(tflops, roof.get("fp8_mm_TFLOPs"))
                           if flops else None,
                           frac_bf16_roof=_frac(tflops, roof.get("bf16_mm_TFLOPs"))
                           if flops else None,
                           frac_copy_roof=_frac(gbs, roof.get("copy_GBps")))
            except Exception as e:                              # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            result["rows"].append(row)
            _print_row(row)
            if out:                    # after every row: a timeout keeps what ran
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
    result["kernels"] = REGISTRY.selections()
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print_row(r: dict[str, Any]) -> None:
    if r.get("error") and r.get("us") is None:
        print(f"{r['name']:<28} {r['variant']:<21} ERROR {r['error']}", flush=True)
        return
    print(f"{r['name']:<28} {r['variant']:<21} {_fmt(r['us'], '9.2f')} "
          f"{_fmt(r['TFLOPs'], '8.1f')} {_fmt(r['GBps'], '7.0f')} "
          f"{_fmt(r['frac_fp8_roof'], '7.3f')} {_fmt(r['frac_bf16_roof'], '8.3f')} "
          f"{_fmt(r['frac_copy_roof'], '8.3f')} {_fmt(r['rel_err'], '8.1e')} "
          f"{_fmt(r['max_abs_err'], '8.1e')}" + (f"  [{r['error']}]" if r.get("error") else ""),
          flush=True)


def sweep(only: str | None) -> None:
    """Tile alternatives per case (CUDA): prints us per config, the picked one first."""
    from benchmarks.kernels.harness import _time_graph
    from tscompile.kernels.triton import fp8 as tfp8

    device = torch.device("cuda")
    sms = tfp8.sm_count(device)
    for case in cases(False, only):
        m, n, k = case["M"], case["N"], case["K"]
        sets = [_inputs(m, n, k, device, s) for s in range(2 if n * k > 2 ** 26 else 4)]
        if case["regime"] == "prefill":
            base = tfp8.prefill_config(m, n, k)
            alts = [base] + [dataclasses.replace(base, block_m=bm, block_n=bn, warps=w,
                                                 stages=st, group_m=g)
                             for bm, bn, w, st, g in (
                                 (128, 128, 8, 3, 8), (128, 128, 8, 5, 8),
                                 (128, 128, 4, 4, 8), (128, 256, 8, 3, 8),
                                 (256, 128, 8, 3, 8), (64, 128, 4, 4, 8),
                                 (128, 64, 4, 4, 8), (128, 128, 8, 4, 16))]
            kw = "prefill"
            flops = 2 * m * n * k
        else:
            base = tfp8.decode_config(m, n, k, sms)
            sp = base.split_k
            alts = [base] + [dataclasses.replace(base, block_n=bn, ksub=ks, split_k=spl,
                                                 stages=st, warps=w, cuda_cores=cc)
                             for cc, bn, ks, spl, st, w in (
                                 (True, 16, 2, sp, 4, 4), (True, 32, 4, sp, 4, 4),
                                 (True, 64, 2, sp, 4, 8), (True, 32, 2, sp, 6, 4),
                                 (True, 32, 2, 2 * sp, 4, 4), (True, 64, 4, sp, 3, 8),
                                 (False, 16, 2, sp, 4, 4), (False, 32, 4, sp, 4, 4),
                                 (False, 64, 2, sp, 4, 4), (False, 32, 2, 2 * sp, 4, 4),
                                 (False, 16, 4, sp, 6, 4))
                             if m == 1 or not cc]
            kw = "decode"
            nbytes = n * k + m * k * 2 + m * n * 2
        for cfg in dict.fromkeys(alts):
            try:
                t = _time_graph([lambda a=a: tfp8.fp8_block_linear_triton(
                    *a, None, BLOCK, **{kw: cfg}) for a in sets])
            except Exception as e:                              # noqa: BLE001
                print(f"{case['name']} {cfg}: {type(e).__name__}", flush=True)
                continue
            perf = (f"{flops / t / 1e12:7.1f} TFLOP/s" if kw == "prefill"
                    else f"{nbytes / t / 1e9:7.0f} GB/s")
            print(f"{case['name']:<24} {t * 1e6:9.2f} us {perf} "
                  f"{'(picked) ' if cfg == base else ''}{cfg}", flush=True)
        del sets
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON results path")
    ap.add_argument("--only", help="comma-separated case-name substrings or prefill/decode")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, CPU interpreter allowed (TRITON_INTERPRET=1)")
    ap.add_argument("--sweep", action="store_true", help="tile sweep (CUDA), printed only")
    args = ap.parse_args(argv)
    if args.sweep:
        sweep(args.only)
        return None
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("fp8_gemm: no CUDA device; use --smoke (with TRITON_INTERPRET=1) on the CPU")
    return run(args.smoke, args.only, args.out)


if __name__ == "__main__":
    main()
