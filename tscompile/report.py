"""`tscompile inspect`: a compiled program's summary — mesh, per-rank parameter and KV bytes,
the collectives each layer runs — as text or JSON. Reads only the manifest."""
from __future__ import annotations

from typing import Any

from tscompile.tsprog import Tsprog


def summary(prog: Tsprog) -> dict[str, Any]:
    m = prog.manifest
    layers: dict[str, list[str]] = m["collectives_per_layer"]
    per_kind: dict[str, int] = {}
    for c in m["schedule"]:
        per_kind[c["kind"]] = per_kind.get(c["kind"], 0) + 1
    sharded = sum(1 for t in m["tensors"].values() if t["dim"] is not None)
    return {
        "model": m["model"]["name"], "preset": m["model"]["preset"],
        "mesh": m["mesh"]["description"], "world_size": m["mesh"]["world_size"],
        "format_version": m["format_version"],
        "num_layers": len(m["kv_cache"]["layers"]),
        "param_elements_per_rank": m["param_elements_per_rank"],
        "param_bytes_per_rank": m["param_bytes_per_rank"],
        "tensors": len(m["tensors"]), "sharded_tensors": sharded,
        "kv_bytes_per_token_per_rank": m["kv_cache"]["bytes_per_token_per_rank"],
        "collectives": per_kind, "collectives_per_layer": layers,
        "fused_all_reduce_norm": m["fused_all_reduce_norm"],
        "passes": m["passes"],
        "quantization": m.get("quantization"),
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def _runs(layers: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """Collapse consecutive layers with the same collectives: 'layers 1-60'."""
    keys = sorted((k for k in layers if k != "top"), key=int)
    layers = {k: [s.replace(f"layers.{k}", "layers.N") for s in v] for k, v in layers.items()}
    out: list[tuple[str, list[str]]] = []
    start = prev = None
    for k in keys + [None]:
        if start is not None and (k is None or layers[k] != layers[start]
                                  or int(k) != int(prev) + 1):
            label = f"layer {start}" if start == prev else f"layers {start}-{prev}"
            out.append((label, layers[start]))
            start = None
        if k is not None and start is None:
            start = k
        prev = k
    if "top" in layers:
        out.append(("outside layers", layers["top"]))
    return out


def format_summary(s: dict[str, Any]) -> str:
    pb, kv = s["param_bytes_per_rank"], s["kv_bytes_per_token_per_rank"]
    lines = [
        f"{s['model']} ({s['preset'] or 'config.json'}), .tsprog format {s['format_version']}",
        f"mesh: {s['mesh']}",
        f"parameters per rank: {s['param_elements_per_rank'] / 1e6:.2f} M elements = "
        f"{_gib(pb['bfloat16'])} bf16 / {_gib(pb['float32'])} fp32 "
        f"({s['sharded_tensors']} of {s['tensors']} tensors sharded)",
        *([f"quantized: {len(s['quantization']['quantized_tensors'])} weights "
            f"{s['quantization']['quant_method']} block {s['quantization']['weight_block_size']}"
            f" (bytes above count them, and their fp32 scales, as stored)"]
          if s.get("quantization") else []),
        f"KV cache per token per rank: {kv['bfloat16']} B bf16 / {kv['float32']} B fp32 "
        f"({s['num_layers']} attention layers)",
        "collectives: " + (", ".join(f"{v} {k}" for k, v in sorted(s["collectives"].items()))
                           or "none") + f" ({s['fused_all_reduce_norm']} fused with add+norm)",
        "per layer:",
    ]
    for label, items in _runs(s["collectives_per_layer"]):
        lines.append(f"  {label}: " + ("; ".join(items) if items else "none"))
    lines.append("passes: " + ", ".join(f"{p['pass']} {p['seconds']:.3f}s" for p in s["passes"]))
    return "\n".join(lines)
