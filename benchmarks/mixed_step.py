"""A mixed engine step (decodes + one prefill chunk) on a GPU: graph replay against eager,
against the pure-decode step plus the chunk's FLOPs at the matmul roof.

What it measures: the program's forward (no scheduler, no sampler) for B decode rows at a
given context next to one prefill chunk of C new tokens (prefix 0), replayed from the
`StepGraphs` bucket that holds it and run eagerly on the same inputs; the pure B-decode
step (graph) and the chunk alone (graph); the capture time and memory of all buckets. The
floor of the mixed step is the decode step plus the chunk's FLOPs (2 x matmul parameters x C,
plus causal attention 2 x 2 x C^2/2 x heads x head_dim per layer) over the bf16 matmul roof
measured in the same run. It also checks the graph's logits equal the eager ones.

    python -m benchmarks.mixed_step --model qwen3 --preset qwen3-8b \\
        [--decodes 1,32] [--context 2048] [--chunks 512,2048] [--out F.json]
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

import torch

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.kernels import build_metadata
from tscompile.runtime.cuda_graphs import StepGraphs
from tscompile.runtime.program import RankProgram
from tscompile.runtime.step_io import StepInputs


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return sorted(ts)[len(ts) // 2]


def _field(cfg, *names: str) -> int:
    for n in names:
        if getattr(cfg, n, None):
            return getattr(cfg, n)
    raise AttributeError(f"{type(cfg).__name__} has none of {names}")


def make_step(decodes: int, context: int, chunk: int, page: int, vocab: int) -> StepInputs:
    """Decodes first, each over `context` positions in its own blocks, then one chunk."""
    tables, nxt = [], 0
    lens = [context] * decodes + ([chunk] if chunk else [])
    for n in lens:
        k = -(-n // page)
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
    q = [1] * decodes + ([chunk] if chunk else [])
    meta = build_metadata(q, lens, tables, page, device="cuda")
    t = sum(q)
    ids = torch.randint(0, vocab, (t,), device="cuda")
    pos = torch.tensor([context - 1] * decodes + list(range(chunk)), device="cuda")
    return StepInputs(ids, pos, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3")
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--decodes", default="1,32")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--chunks", default="512,2048")
    ap.add_argument("--out")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from benchmarks.kernels.harness import roofs

    dev = torch.device("cuda")
    roof = roofs(dev)
    path = build(a.model, preset=a.preset, mesh=Mesh.build(1)).save(
        Path(tempfile.mkdtemp()) / f"{a.preset}.tsprog")
    program = RankProgram(path, 0, dummy_seed=0, dtype=torch.bfloat16, device=dev)
    c = program.config
    decodes = [int(x) for x in a.decodes.split(",")]
    chunks = [int(x) for x in a.chunks.split(",")]
    page = 16
    max_len = max(a.context, max(chunks)) + 16
    blocks = max(decodes) * -(-a.context // page) + -(-max(chunks) // page) + 8
    program.bind_kv_caches(blocks + 1, page, dtype=torch.bfloat16, device=dev)
    for cache in program.caches:
        cache.normal_(0, 0.5)
    # Matmul parameters (every 2-D weight but the embedding and LM head) give the
    # chunk's GEMM FLOPs.
    # (The LM head runs on each sequence's last token only: not a per-token cost.)
    mm_params = sum(t.numel() for n, t in program.tensors.items()
                    if t.dim() == 2 and "embed" not in n and "lm_head" not in n)
    heads = _field(c, "num_heads", "num_attention_heads")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    layers = _field(c, "num_layers", "num_hidden_layers")

    t0 = time.perf_counter()
    free0 = torch.cuda.mem_get_info(dev)[0]
    graphs = StepGraphs(program, max_batch=max(decodes), max_blocks=-(-max_len // page),
                        page_size=page, scratch_block=blocks, device=dev,
                        sizes=sorted(set(decodes)), prefill_sizes=sorted(set(chunks)))
    capture_s = time.perf_counter() - t0
    capture_mib = (free0 - torch.cuda.mem_get_info(dev)[0]) / 2**20

    rows = []
    for d in decodes:
        dec = make_step(d, a.context, 0, page, c.vocab_size)
        t_dec = _time(lambda: graphs(dec))
        for ch in chunks:
            mixed = make_step(d, a.context, ch, page, c.vocab_size)
            alone = make_step(0, a.context, ch, page, c.vocab_size)
            bucket, why = graphs.bucket(mixed)
            assert bucket is not None, why
            g_logits = graphs(mixed).float().clone()
            e_logits = program(mixed.input_ids, mixed.positions, mixed.meta).float()
            err = ((g_logits - e_logits).abs().max() / e_logits.abs().max()).item()
            t_graph = _time(lambda: graphs(mixed))
            t_eager = _time(lambda: program(mixed.input_ids, mixed.positions, mixed.meta))
            t_alone = _time(lambda: graphs(alone))
            flops = 2 * mm_params * ch + 2 * ch * ch * heads * head_dim * layers
            chunk_roof = flops / (roof["bf16_mm_TFLOPs"] * 1e12)
            floor = t_dec + 1.25 * chunk_roof
            rows.append({"decodes": d, "context": a.context, "chunk": ch,
                         "bucket": [bucket.decodes, bucket.prefill],
                         "graph_ms": round(t_graph * 1e3, 3), "eager_ms": round(t_eager * 1e3, 3),
                         "decode_only_graph_ms": round(t_dec * 1e3, 3),
                         "chunk_only_graph_ms": round(t_alone * 1e3, 3),
                         "chunk_flops": flops, "chunk_roof_ms": round(chunk_roof * 1e3, 3),
                         "target_ms": round(floor * 1e3, 3), "meets_target": t_graph <= floor,
                         "graph_vs_eager_rel_err": err})
            print(rows[-1], flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "host": platform.node(), "commit": commit, "model": f"{a.model}:{a.preset}",
              "dtype": "bfloat16", "roofs": roof, "matmul_params": mm_params,
              "graphs_captured": len(graphs.graphs), "capture_s": round(capture_s, 1),
              "capture_MiB": round(capture_mib), "rows": rows}
    print(f"captured {len(graphs.graphs)} graphs in {capture_s:.1f} s, {capture_mib:.0f} MiB")
    print(f"{'dec':>4} {'chunk':>6} {'graph':>8} {'eager':>8} {'dec only':>8} {'chunk only':>10} "
          f"{'target':>8} {'ok':>3} {'err':>8}")
    for r in rows:
        print(f"{r['decodes']:>4} {r['chunk']:>6} {r['graph_ms']:>8} {r['eager_ms']:>8} "
              f"{r['decode_only_graph_ms']:>8} {r['chunk_only_graph_ms']:>10} "
              f"{r['target_ms']:>8} {str(r['meets_target'])[0]:>3} "
              f"{r['graph_vs_eager_rel_err']:>8.1e}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
