"""Kernel benchmark harness: measure the card's roofs, then time every kernel case against
them, in one run on one GPU.

Method (../.library/device/METHOD.md): the copy-bandwidth roof is a device-to-device
`copy_` of 2 GiB (bytes = read + write); the matrix roof is a bf16 8192^3 `mm`. Each case's
closure is captured k times in one CUDA graph over k independent input sets (k chosen so the
sets together exceed 4x the L2 cache, so no launch reads warm data), replayed many times;
the time per launch is the median replay time / k. Achieved GB/s and TFLOP/s come from the
case's own minimum-bytes and FLOP counts; the bound is the larger fraction of roof.

    python -m benchmarks.kernels.harness [--only mla,gqa] [--out benchmarks/results/X.json]

Case modules (benchmarks/kernels/<family>.py) expose CASES: dicts with a name, a builder
`f(device) -> zero-arg closure`, and the bytes and FLOPs of one launch.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tscompile.kernels import REGISTRY

FAMILIES = ("norm_rope_act", "gqa", "mla", "moe")


def _time_graph(fns: list[Callable[[], Any]], replays: int = 20) -> float:
    """Median seconds per launch of fns captured back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:                       # warm-up (compiles Triton, allocates)
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times) / len(fns)


def _triton_copy(src: torch.Tensor, dst: torch.Tensor) -> Callable[[], None]:
    import triton
    import triton.language as tl

    @triton.jit
    def copy(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)

    n, block = src.numel(), 8192
    return lambda: copy[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block, num_warps=8)


def roofs(device: torch.device) -> dict[str, float]:
    """Copy roof: the better of cudaMemcpy (torch copy_) and a plain Triton copy over 2 GiB
    (bytes = read + write); matrix roof: bf16 8192^3 torch.mm."""
    src = torch.randn(2**30, dtype=torch.bfloat16, device=device)   # 2 GiB
    dst = torch.empty_like(src)
    memcpy = _time_graph([lambda: dst.copy_(src)], replays=30)
    tcopy = _time_graph([_triton_copy(src, dst)], replays=30)
    nbytes = 2 * src.numel() * src.element_size()
    copy_gbs = nbytes / min(memcpy, tcopy) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t = _time_graph([lambda: torch.mm(a, b)], replays=30)
    return {"copy_GBps": round(copy_gbs, 1), "memcpy_GBps": round(nbytes / memcpy / 1e9, 1),
            "triton_copy_GBps": round(nbytes / tcopy / 1e9, 1),
            "bf16_mm_TFLOPs": round(2 * m**3 / t / 1e12, 1)}


def _field(case: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in case:
            return case[n]
    for k, v in case.items():
        if any(n in k for n in names):
            return v
    raise KeyError(f"case {case.get('name')} has none of {names}")


def run_case(case: dict[str, Any], device: torch.device, l2_bytes: int,
             roof: dict[str, float]) -> dict[str, Any]:
    build = _field(case, "build", "make", "fn")
    nbytes = float(_field(case, "bytes"))
    flops = float(_field(case, "flops"))
    free, _ = torch.cuda.mem_get_info(device)
    k = max(1, min(16, int(4 * l2_bytes // max(nbytes, 1)) + 1))
    k = max(1, min(k, int(0.5 * free // max(nbytes, 1))))
    fns = [build(device) for _ in range(k)]
    t = _time_graph(fns)
    del fns
    torch.cuda.empty_cache()
    gbs, tflops = nbytes / t / 1e9, flops / t / 1e12
    fb, ff = gbs / roof["copy_GBps"], tflops / roof["bf16_mm_TFLOPs"]
    return {"name": case["name"], "us": round(t * 1e6, 2), "GBps": round(gbs, 1),
            "TFLOPs": round(tflops, 2), "frac_copy_roof": round(fb, 3),
            "frac_mm_roof": round(ff, 3), "bound": "memory" if fb >= ff else "compute",
            "bytes": nbytes, "flops": flops, "sets_in_graph": k,
            **{k2: v for k2, v in case.items() if isinstance(v, (int, float, str))
               and k2 not in ("name", "bytes", "flops")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated families or case-name substrings")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    roof = roofs(device)
    print(f"{props.name}: copy {roof['copy_GBps']} GB/s, bf16 mm {roof['bf16_mm_TFLOPs']} "
          f"TFLOP/s, L2 {l2 / 2**20:.0f} MiB", flush=True)
    wanted = args.only.split(",") if args.only else None
    rows: list[dict[str, Any]] = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    import triton
    result = {"device": props.name, "date": time.strftime("%Y-%m-%d"), "commit": commit,
              "torch": torch.__version__, "triton": triton.__version__, "roofs": roof,
              "cases": rows}
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"benchmarks.kernels.{fam}")
        except ModuleNotFoundError as e:
            print(f"skip {fam}: {e}")
            continue
        for case in mod.CASES:
            if wanted and not any(w == fam or w in case["name"] for w in wanted):
                continue
            try:
                row = run_case(case, device, l2, roof)
            except Exception as e:  # report the miss, keep measuring the rest
                row = {"name": case["name"], "error": f"{type(e).__name__}: {e}"[:300]}
            row["family"] = fam
            rows.append(row)
            print(json.dumps(row), flush=True)
            result["kernels"] = REGISTRY.selections()   # what the public ops dispatched to
            if args.out:                    # after every case: a timeout keeps what ran
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
