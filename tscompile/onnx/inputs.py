"""How the exporter declares graph inputs: the symbolic dims a traced sample size stands for
(KV caches, AttentionMetadata fields) and the doc string of each parameter/buffer input (its
plan: kind, placement, global shape, the slice this rank holds, checkpoint keys).

What it is not: the bookkeeping of which inputs exist (`Exporter.tensor_input` and
`Exporter.scalar_input` do that) or any node emission.
"""
from __future__ import annotations

from typing import Any

# AttentionMetadata's batch dims (kernels/paged.py): the tracer runs them at fixed sample
# sizes, so graph.json holds numbers where the program takes any batch.
META_SHAPES = {"query_start_loc": ["B+1"], "seq_lens": ["B"], "block_tables": ["B", "MB"]}


def meta_shape(field: str, shape: list[Any] | None) -> list[Any] | None:
    """The symbolic shape of the `meta.<field>` input, or None to keep the traced `shape`."""
    contract = META_SHAPES.get(field)
    if contract is not None and shape is not None and len(contract) == len(shape) \
            and all(isinstance(d, int) for d in shape):
        return contract
    return None


def kv_dims(manifest: dict[str, Any], name: str, shape: list[Any] | None) -> list[Any] | None:
    """A KV cache's per-rank shape with the manifest's symbolic dims ("num_blocks",
    "page_size") in place of the sample sizes it was traced with."""
    for layer in (manifest.get("kv_cache", {}) or {}).get("layers", []):
        want = layer.get("shape")
        if layer.get("name") == name and shape is not None and want is not None \
                and len(want) == len(shape):
            return [w if isinstance(w, str) else d for w, d in zip(want, shape)]
    return shape


def tensor_doc(plans: dict[str, Any], name: str, rank: int, world: int) -> str:
    """e.g. "param S(0), global shape [64, 32] float32; rank 1 holds dim 0 [32:64];
    checkpoint model.layers.0.self_attn.q_proj.weight"."""
    plan = plans.get(name)
    if not plan:
        return "tensor (no plan in the manifest)"
    text = (f"{plan.get('kind', 'tensor')} {plan.get('placement', 'R')}, global shape "
            f"{plan.get('shape')} {plan.get('dtype', '')}")
    dim = plan.get("dim")
    if dim is not None:
        try:
            from tscompile.plan import ParamPlan
            ranges = ParamPlan.from_json(name, plan).ranges(rank, world)
            text += f"; rank {rank} holds dim {dim} " + ", ".join(
                f"[{a}:{b}]" for a, b in ranges)
        except Exception:
            pass
    keys = [p[0] for p in plan.get("pieces", [])]
    if keys:
        text += "; checkpoint " + ", ".join(keys[:4]) + (
            f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
    return text
