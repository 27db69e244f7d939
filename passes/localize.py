"""Pass `localize`: the global-shape SPMD graph -> the graph one rank runs.

* boundary markers are removed (they were constraints, not computation);
* every sharded value's shape is divided on its sharded dim (node.meta['val'] becomes the
  per-rank shape, as the dumps and the ONNX export show);
* literal sizes in view/reshape/split along a sharded dim are divided by the group size
  (model code that writes -1 needs nothing), and so are the bounds of a slice that takes
  one chunk of a fused projection (qkv[..., H:2H] of an S(-1)x3 [q ; k ; v]);
* expert parallel `moe_experts` learns which experts it holds: expert_start = rank * E_local;
* every sharded parameter must divide: the error names the parameter, dim, size and group.
What it is not: a memory planner; buffers are allocated by the runtime from the plan.
"""
from __future__ import annotations

import operator

import torch

from tscompile.annotations import Shard
from tscompile.passes.collectives import rank_node
from tscompile.passes.ir import Stage, TensorVal
from tscompile.passes.propagate import PlacementError
from tscompile.passes.rules.view import chunk_of


def _local(v, p, world):
    if isinstance(v, tuple):
        return tuple(_local(x, q, world) for x, q in zip(v, p))
    if not isinstance(v, TensorVal) or not isinstance(p, Shard):
        return v
    return TensorVal(tuple(s / world if i == p.dim else s for i, s in enumerate(v.shape)),
                     v.dtype)


def _check_params(st: Stage) -> None:
    world = st.mesh.world_size
    for n in st.gm.graph.nodes:
        p = n.meta.get("placement")
        if n.op != "get_attr" or not isinstance(p, Shard):
            continue
        size = int(n.meta["val"].shape[p.dim])
        if size % (world * p.chunks):
            region = n.meta.get("region") or ("<root>", "tp")
            per = f"{p.chunks} chunks x {world}" if p.chunks > 1 else str(world)
            raise PlacementError(
                f"cannot shard {n.target} dim {p.dim} (size {size}) over group {region[1]} "
                f"of {world} ranks in {region[0]}: {size} % {per} != 0; hint: choose a "
                f"group size that divides {size}")


def _chunk_slice(src, idx, world):
    """The per-rank index of a slice taking one chunk of src's chunked dim: src holds its
    part of every chunk, back to back, so chunk j is [j*C/world, (j+1)*C/world)."""
    p, shape = src.meta["placement"], src.meta["val"].shape
    items = list(idx) if isinstance(idx, tuple) else [idx]
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    d = 0
    for k, i in enumerate(items):
        if i is Ellipsis:
            d += len(shape) - used
            continue
        if i is None:
            continue
        if d == p.dim:
            j = chunk_of(i, shape[d], p.chunks)
            if j is not None:
                width = int(shape[d]) // p.chunks // world
                items[k] = slice(j * width, (j + 1) * width)
            break
        d += 1
    return tuple(items) if isinstance(idx, tuple) else items[0]


def localize(stage: Stage) -> Stage:
    st = stage.copy("localize")
    graph = st.gm.graph
    world = st.mesh.world_size
    _check_params(st)
    for n in list(graph.nodes):
        if n.meta.get("boundary") is not None:
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)
    for n in graph.nodes:
        p = n.meta.get("placement")
        if n.op in ("call_method", "call_function") and isinstance(p, Shard):
            name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
            if name in ("view", "reshape"):
                # x.view(a, b), x.view((a, b)), torch.reshape(x, (a, b)): keep the form
                packed = isinstance(n.args[1], (list, tuple))
                sizes = list(n.args[1] if packed else n.args[1:])
                s = sizes[p.dim]
                if isinstance(s, int) and s != -1:
                    sizes[p.dim] = s // world
                    n.args = (n.args[0], tuple(sizes)) if packed else (n.args[0], *sizes)
        if isinstance(p, tuple) and n.op in ("call_method", "call_function") and \
                getattr(n.target, "__name__", n.target) == "split":
            src = n.args[0].meta.get("placement")
            dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
            if isinstance(src, Shard) and src.dim == dim % n.args[0].meta["val"].ndim:
                sizes = n.args[1]
                n.args = (n.args[0], [s // world for s in sizes] if isinstance(
                    sizes, (list, tuple)) else sizes // world, *n.args[2:])
        if n.op == "call_function" and n.target is operator.getitem and \
                isinstance(n.args[0].meta.get("placement"), Shard) and \
                n.args[0].meta["placement"].chunks > 1:
            n.args = (n.args[0], _chunk_slice(n.args[0], n.args[1], world))
        if n.op == "call_function" and n.target is torch.ops.tscompile.moe_experts.default:
            w13 = n.args[1]
            if w13.meta.get("placement") == Shard(0):
                local = int(w13.meta["val"].shape[0]) // world
                with graph.inserting_before(n):
                    start = graph.call_function(operator.mul, (rank_node(graph), local))
                start.meta.update(scope=n.meta.get("scope", ""), region=None, val=None)
                n.args = (*n.args[:5], start)
    for n in graph.nodes:
        if "val" in n.meta and "placement" in n.meta:
            n.meta["val"] = _local(n.meta["val"], n.meta["placement"], world)
    graph.lint()
    st.gm.recompile()
    return st
