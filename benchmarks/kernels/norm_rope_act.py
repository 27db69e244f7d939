"""Benchmark cases for the Triton rms_norm, fused_add_rms_norm, rope and silu_and_mul.

`CASES` (read by `benchmarks/kernels/harness.py`): real shapes, bf16 activations.
  rms_norm / fused_add_rms_norm: Kimi K2.5 hidden 7168 and Llama-3-8B 4096, T = 1, 64, 4096.
  rope: MLA's rope part (128 and 64 heads x 64, GPT-J pairs, also q_pe as the strided view
        of [T, Nh, 128 + 64] the model passes) and Llama's 32 heads x 128 (NeoX halves).
  silu_and_mul: I = 18432 / 4 = 4608 (Kimi's dense MLP at tp 4) and 14336 (Llama-3-8B).
Bytes are the minimum that must move: each input read once, each output written once (the
norm weight once, one fp32 table row and one int64 position per token for rope). FLOPs:
rms_norm 4 per element, fused_add 5, rope 3 per rotated element, silu_and_mul 5 per output.
Each case also has `build_reference` (the torch reference on the same inputs) and `check`
(compares the two on the GPU).

    python -m benchmarks.kernels.norm_rope_act [--sweep] [--out FILE]

checks every case, times Triton against the reference with the harness's method and prints
a table; `--sweep` also times the launch knobs (warps, tile sizes) of each kernel.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import torch

from tscompile.kernels import REGISTRY

BF16 = torch.bfloat16
EPS = 1e-6


def _impls():
    from tscompile.kernels.activation import silu_and_mul_reference
    from tscompile.kernels.norm import fused_add_rms_norm_reference, rms_norm_reference
    from tscompile.kernels.rope import rope_reference
    from tscompile.kernels.triton.activation import silu_and_mul_triton
    from tscompile.kernels.triton.norm import fused_add_rms_norm_triton, rms_norm_triton
    from tscompile.kernels.triton.rope import rope_triton
    return {"rms_norm": (rms_norm_triton, rms_norm_reference),
            "fused_add_rms_norm": (fused_add_rms_norm_triton, fused_add_rms_norm_reference),
            "rope": (rope_triton, rope_reference),
            "silu_and_mul": (silu_and_mul_triton, silu_and_mul_reference)}


def _norm_inputs(t: int, h: int, fused: bool) -> Callable[[torch.device], tuple]:
    def make(device):
        x = torch.randn(t, h, device=device, dtype=BF16)
        w = (1 + 0.1 * torch.randn(h, device=device)).to(BF16)
        if fused:
            return x, torch.randn(t, h, device=device, dtype=BF16), w, EPS
        return x, w, EPS
    return make


def _rope_inputs(t: int, heads: int, head_dim: int, interleaved: bool,
                 nope: int = 0) -> Callable[[torch.device], tuple]:
    """nope > 0: x is q[..., nope:] of a [T, heads, nope + head_dim] tensor (MLA's q_pe)."""
    def make(device):
        from tscompile.kernels.rope import rope_cos_sin_cache
        q = torch.randn(t, heads, nope + head_dim, device=device, dtype=BF16)
        pos = torch.randint(0, 8192, (t,), device=device)
        table = rope_cos_sin_cache(head_dim, 8192, 50000.0).to(device)
        return q[..., nope:], pos, table, interleaved
    return make


def _silu_inputs(t: int, inter: int) -> Callable[[torch.device], tuple]:
    def make(device):
        return (3 * torch.randn(t, 2 * inter, device=device)).to(BF16),
    return make


def _case(op: str, name: str, inputs: Callable, nbytes: int, flops: int,
          **facts: Any) -> dict[str, Any]:
    def build(device, which=0):
        fn = _impls()[op][which]
        args = inputs(device)
        return lambda: fn(*args)

    def check(device) -> dict[str, float]:
        fast, ref = _impls()[op]
        args = inputs(device)
        got, want = fast(*args), ref(*args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        out = {}
        for i, (g, w) in enumerate(zip(got, want)):
            if g.shape != w.shape or g.dtype != w.dtype:
                raise AssertionError(f"{name}: output {i} is {g.dtype}{list(g.shape)}, "
                                     f"reference {w.dtype}{list(w.shape)}")
            diff = (g.float() - w.float()).abs()
            ulp = (w.float().abs() * torch.finfo(w.dtype).eps).clamp_min(1e-30)
            out[f"out{i}_max_ulp"] = round((diff / ulp).max().item(), 3)
            out[f"out{i}_frac_diff"] = round((diff > 0).float().mean().item(), 6)
            out[f"out{i}_nan"] = int(torch.isnan(g).sum().item())
        return out

    return {"name": name, "op": op, "build": build,
            "build_reference": lambda device: build(device, 1), "check": check,
            "bytes": nbytes, "flops": flops, **facts}


def _cases() -> list[dict[str, Any]]:
    e = 2  # bf16
    cases = []
    for model, h in (("kimi", 7168), ("llama8b", 4096)):
        for t in (1, 64, 4096):
            cases.append(_case("rms_norm", f"rms_norm_{model}_h{h}_t{t}", _norm_inputs(t, h, False),
                               2 * t * h * e + h * e, 4 * t * h, T=t, H=h))
            cases.append(_case("fused_add_rms_norm", f"fused_add_rms_norm_{model}_h{h}_t{t}",
                               _norm_inputs(t, h, True), 4 * t * h * e + h * e, 5 * t * h,
                               T=t, H=h))
    for label, heads, d, inter, nope in (("mla_h128_d64", 128, 64, True, 0),
                                        ("mla_h64_d64", 64, 64, True, 0),
                                        ("llama_h32_d128", 32, 128, False, 0)):
        for t in (1, 64, 4096):
            cases.append(_case("rope", f"rope_{label}_t{t}", _rope_inputs(t, heads, d, inter, nope),
                               2 * t * heads * d * e + t * (d * 4 + 8), 3 * t * heads * d,
                               T=t, heads=heads, head_dim=d))
    t = 4096  # the strided q_pe view the MLA layer really passes
    cases.append(_case("rope", f"rope_mla_h128_d64_qpe_view_t{t}",
                       _rope_inputs(t, 128, 64, True, nope=128),
                       2 * t * 128 * 64 * e + t * (64 * 4 + 8), 3 * t * 128 * 64,
                       T=t, heads=128, head_dim=64))
    for label, inter in (("kimi_tp4_i4608", 18432 // 4), ("llama8b_i14336", 14336)):
        for t in (1, 64, 4096):
            cases.append(_case("silu_and_mul", f"silu_and_mul_{label}_t{t}", _silu_inputs(t, inter),
                               3 * t * inter * e, 5 * t * inter, T=t, I=inter))
    return cases


CASES = _cases()

# Launch knobs to sweep (module attribute -> values); each value is timed on the T = 64 and
# T = 4096 cases of its op family.
SWEEP = {
    "norm": [{"VECS_PER_THREAD": v} for v in (1, 2, 4)],
    "rope": [{"TILE_ELEMS": te, "NUM_WARPS": w} for te, w in ((1024, 4), (2048, 4), (4096, 4),
                                                                  (4096, 8), (8192, 8))],
    "activation": [{"VECS_PER_THREAD": v, "NUM_WARPS": w} for v, w in ((1, 2), (1, 4), (2, 2),
                                                                       (2, 4), (1, 8))],
}
FAMILY_OPS = {"norm": ("rms_norm", "fused_add_rms_norm"), "rope": ("rope",),
              "activation": ("silu_and_mul",)}


def main() -> None:
    import importlib

    from benchmarks.kernels import harness

    ap = argparse.ArgumentParser(description="check and time the norm/rope/act Triton kernels")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--only", help="substring of the case names")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    roof = harness.roofs(device)
    print(f"{props.name}: {roof}", flush=True)
    cases = [c for c in CASES if not args.only or args.only in c["name"]]
    rows = []
    for case in cases:
        row = {"name": case["name"], **case["check"](device)}
        fast = harness.run_case(case, device, l2, roof)
        ref = harness.run_case({**case, "build": case["build_reference"]}, device, l2, roof)
        row.update(us=fast["us"], GBps=fast["GBps"], frac_roof=fast["frac_copy_roof"],
                   ref_us=ref["us"], speedup=round(ref["us"] / fast["us"], 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    sweep_rows = []
    if args.sweep:
        for fam, settings in SWEEP.items():
            mod = importlib.import_module(f"tscompile.kernels.triton.{fam}")
            saved = {k: getattr(mod, k) for k in settings[0]}
            for s in settings:
                for k, v in s.items():
                    setattr(mod, k, v)
                for case in cases:
                    if case["op"] in FAMILY_OPS[fam] and case["T"] in (64, 4096):
                        r = harness.run_case(case, device, l2, roof)
                        sweep_rows.append({"name": case["name"], **s, "us": r["us"],
                                           "frac_roof": r["frac_copy_roof"]})
                        print("sweep", json.dumps(sweep_rows[-1]), flush=True)
            for k, v in saved.items():
                setattr(mod, k, v)
    print(f"\n{props.name}  copy roof {roof['copy_GBps']} GB/s")
    print(f"{'case':44s} {'us':>8s} {'GB/s':>7s} {'roof':>5s} {'ref us':>8s} {'x':>5s} "
          f"{'max ulp':>7s} {'diff%':>6s}")
    for r in rows:
        print(f"{r['name']:44s} {r['us']:8.2f} {r['GBps']:7.0f} {r['frac_roof']:5.2f} "
              f"{r['ref_us']:8.2f} {r['speedup']:5.2f} {r['out0_max_ulp']:7.2f} "
              f"{100 * r['out0_frac_diff']:6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": props.name, "roofs": roof, "cases": rows, "sweep": sweep_rows,
                       "kernels": REGISTRY.selections()}, f, indent=1)


if __name__ == "__main__":
    main()
