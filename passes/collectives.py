"""Pass `insert_collectives`: where a value's placement differs from what its consumer
wants, insert the redistribution. The whole table, written once (DESIGN.md §Compile 4):

  row  from    to      does                               cost
  1    P       R       all_reduce                         2   (reduce-scatter + all-gather)
  2    P       S(d)    reduce_scatter(d)                  1
  3    S(d)    R       all_gather(d)                      1
  4    R       S(d)    local slice: narrow(d, rank*n, n)  1   (no communication, a copy)
  5    S(a)    S(b)    all_to_all(split b, concat a)      1
  6    R, S    P       not a redistribution (it would change the sum) ...
  7    R       P       ... except for an operand a rule counts once (Strategy.once, e.g. the
                       bias of a row-parallel linear): rank 0 keeps it, the others hold
                       zeros, `x * (rank == 0)` (local, exact; DTensor divides by the world
                       size instead). Never chosen by cost, so it costs INF here.
  S(d)xk (chunks) moves only by rows 4 and (for k = 1) 3.

What it is not: the choice of placements (propagate.py) or fusion (fuse.py).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from tscompile.annotations import Partial, Placement, Replicate, Shard
from tscompile.passes.ir import Stage, TensorVal, tensor_args

INF = float("inf")


def redistribute_cost(src: Placement, dst: Placement) -> float:
    if src == dst:
        return 0.0
    if isinstance(dst, Partial) or isinstance(src, tuple) or isinstance(dst, tuple):
        return INF                                               # row 6
    if isinstance(src, Partial):
        return 2.0 if isinstance(dst, Replicate) else 1.0        # rows 1, 2
    if isinstance(src, Shard) and src.chunks > 1:
        return INF                                               # chunked: row 4 only
    if isinstance(src, Shard) and isinstance(dst, Replicate):
        return 1.0                                               # row 3
    if isinstance(src, Replicate):
        return 1.0                                               # row 4
    return 1.0 if dst.chunks == 1 else INF                      # row 5


def rank_node(graph: fx.Graph) -> fx.Node:
    """The program's `rank` input (added once, after the other inputs)."""
    for n in graph.nodes:
        if n.op == "placeholder" and n.target == "rank":
            return n
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder("rank")
    node.meta.update(scope="", region=None, val=None, placement=None)
    return node


def _on_rank0(graph: fx.Graph) -> fx.Node:
    """`rank == 0`, computed once per program (after the rank input)."""
    rank = rank_node(graph)
    for u in rank.users:
        if u.op == "call_function" and u.target is operator.eq and u.args == (rank, 0):
            return u
    with graph.inserting_after(rank):
        node = graph.create_node("call_function", operator.eq, (rank, 0), name="on_rank0")
    node.meta.update(scope="", region=None, val=None, placement=None)
    return node


def _emit(graph: fx.Graph, x: fx.Node, src: Placement, dst: Placement, world: int
          ) -> tuple[fx.Node, str]:
    ops = torch.ops.tscompile
    if isinstance(src, Replicate) and isinstance(dst, Partial):        # row 7 (once)
        origin = x.args[0] if x.meta.get("boundary") is not None else x   # named after
        name = ("_".join(origin.target.split(".")[-2:]) if origin.op == "get_attr"
                else origin.name)
        return (graph.create_node("call_function", operator.mul, (x, _on_rank0(graph)),
                                  name=f"{name}_rank0"), "rank0")
    if isinstance(src, Partial) and isinstance(dst, Replicate):        # row 1
        return graph.call_function(ops.all_reduce.default, (x,)), "all_reduce"
    if isinstance(src, Partial) and isinstance(dst, Shard):            # row 2
        return graph.call_function(ops.reduce_scatter.default, (x, dst.dim)), "reduce_scatter"
    if isinstance(src, Shard) and isinstance(dst, Replicate):          # row 3
        return graph.call_function(ops.all_gather.default, (x, src.dim)), "all_gather"
    if isinstance(src, Replicate) and isinstance(dst, Shard):          # row 4
        size = x.meta["val"].shape[dst.dim]
        part = int(size) // (world * dst.chunks)
        rank = rank_node(graph)
        start = graph.call_function(operator.mul, (rank, part))
        start.meta.update(scope=x.meta.get("scope", ""), region=None, val=None)
        pieces = []
        for k in range(dst.chunks):
            s = start if k == 0 else graph.call_function(operator.add,
                                                         (start, k * int(size) // dst.chunks))
            s.meta.update(scope=x.meta.get("scope", ""), region=None, val=None)
            pieces.append(graph.call_function(torch.narrow, (x, dst.dim, s, part)))
        if dst.chunks == 1:
            return pieces[0], "slice"
        # Piece k is chunk k of x (size / chunks on dim d), of which this rank holds S(d).
        chunk = Shard(dst.dim)
        v = x.meta["val"]
        shape = tuple(size / dst.chunks if i == dst.dim else n for i, n in enumerate(v.shape))
        for p in pieces:
            p.meta.update(scope=x.meta.get("scope", ""), region=None,
                          val=TensorVal(shape, v.dtype), placement=chunk)
        cat = graph.call_function(torch.cat, (pieces, dst.dim))
        cat.meta["wants"] = tuple(chunk for _ in pieces)
        return cat, "slice"
    if isinstance(src, Shard) and isinstance(dst, Shard):              # row 5
        return (graph.call_function(ops.all_to_all.default, (x, dst.dim, src.dim)),
                "all_to_all")
    raise ValueError(f"no redistribution from {src} to {dst} for {x.name} "
                     f"(table rows 6 and chunked shards)")


def insert_collectives(stage: Stage) -> Stage:
    st = stage.copy("insert_collectives")
    graph = st.gm.graph
    world = st.mesh.world_size
    done: dict[tuple[fx.Node, Placement], fx.Node] = {}   # one collective per (value, target)
    for node in list(graph.nodes):
        wants = node.meta.get("wants")
        if wants is None:
            continue
        once = node.meta.get("once", ())
        for i, (a, want) in enumerate(zip(tensor_args(node), wants)):
            have = a.meta.get("placement")
            if have == want:
                continue
            if redistribute_cost(have, want) == INF and not (
                    i in once and isinstance(have, Replicate) and isinstance(want, Partial)):
                raise ValueError(f"{node.name} in {node.meta.get('scope') or '<root>'} needs "
                                 f"{a.name} as {want} but it is {have}: no redistribution")
            new = done.get((a, want))
            if new is None:
                with graph.inserting_before(node):
                    new, kind = _emit(graph, a, have, want, world)
                new.meta.setdefault("wants", (have,))      # a chunked slice set its own
                new.meta.update(scope=node.meta.get("scope", ""), region=None,
                                val=a.meta["val"], placement=want,
                                collective={"kind": kind, "from": str(have), "to": str(want),
                                            "value": a.name})
                done[(a, want)] = new
            node.replace_input_with(a, new)
    return st
