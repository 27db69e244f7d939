"""Pass `fuse_kernels`: per-rank kernel fusions that involve no collective, for the launches
a decode step is made of (at batch 1 each kernel moves a few KB and costs its launch):

    s = add(x, r); y = rms_norm(s, w, eps)    =>  y, s = fused_add_rms_norm(x, r, w, eps)
    y = rope(rms_norm(x, w, eps), pos, tab, i) =>  y = rms_norm_rope(x, w, eps, pos, tab, i)

The first is the residual stream of every pre-norm layer where no all-reduce precedes the
add (tensor parallelism 1, or the all-reduce already fused by `fuse`); the second is a
per-head QK-norm followed by RoPE (Qwen3, GLM-4.5), one kernel for both and no copy when
the heads are a strided slice of a packed projection (`pack_linears`).
Both fused ops' references are the sequences they replace, so numbers do not change on the
CPU; the Triton backends round where the unfused kernels do.
What it is not: the all-reduce fusions (`fuse`), or a general elementwise fuser.
`TSCOMPILE_NO_KERNEL_FUSION=1` skips this pass and `pack_linears` (A/B measurements).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from tscompile.passes.fuse import take_over
from tscompile.passes.ir import Stage, TensorVal


def _is(node: object, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _same_tensor(a: object, b: object) -> bool:
    va = a.meta.get("val") if isinstance(a, fx.Node) else None
    vb = b.meta.get("val") if isinstance(b, fx.Node) else None
    return (isinstance(va, TensorVal) and isinstance(vb, TensorVal)
            and va.shape == vb.shape and va.dtype == vb.dtype)


def _place_params_before(f: fx.Node, args) -> None:
    """get_attr arguments defined after `f` (the norm's weight) move up to just before it."""
    order = {n: i for i, n in enumerate(f.graph.nodes)}
    for a in args:
        if isinstance(a, fx.Node) and a.op == "get_attr" and order[a] > order[f]:
            f.prepend(a)


def _fuse_add_norm(graph: fx.Graph) -> int:
    ops = torch.ops.tscompile
    done = 0
    for add in list(graph.nodes):
        if not (_is(add, operator.add) and len(add.args) == 2 and not add.kwargs
                and _same_tensor(*add.args) and _same_tensor(add, add.args[0])):
            continue
        norms = [u for u in add.users if _is(u, ops.rms_norm.default) and u.args[0] is add]
        if not norms:
            continue
        norm = norms[0]
        x, r = add.args
        w, eps = norm.args[1], norm.args[2]
        with graph.inserting_before(add):
            f = graph.call_function(ops.fused_add_rms_norm.default, (x, r, w, eps))
            y = graph.call_function(operator.getitem, (f, 0))
            s = graph.call_function(operator.getitem, (f, 1))
        _place_params_before(f, (w,))
        f.meta.update(scope=add.meta.get("scope", ""), region=None,
                      val=(norm.meta["val"], add.meta["val"]),
                      placement=(norm.meta["placement"], add.meta["placement"]),
                      wants=(*add.meta["wants"], norm.meta["wants"][1]))
        take_over(f, (y, norm), (s, add))
        done += 1
    return done


def _fuse_norm_rope(graph: fx.Graph) -> int:
    ops = torch.ops.tscompile
    done = 0
    for rope in list(graph.nodes):
        if not _is(rope, ops.rope.default) or rope.kwargs:
            continue
        norm = rope.args[0]
        if not _is(norm, ops.rms_norm.default) or len(norm.users) != 1 or norm.kwargs:
            continue
        x, w, eps = norm.args
        positions, table, interleaved = rope.args[1:]
        with graph.inserting_before(rope):
            f = graph.call_function(ops.rms_norm_rope.default,
                                    (x, w, eps, positions, table, interleaved))
        f.meta.update({k: v for k, v in rope.meta.items() if k != "wants"})
        f.meta["wants"] = (*norm.meta["wants"], *rope.meta["wants"][1:])
        rope.replace_all_uses_with(f)
        graph.erase_node(rope)
        graph.erase_node(norm)
        done += 1
    return done


def fuse_kernels(stage: Stage) -> Stage:
    from tscompile import envs
    st = stage.copy("fuse_kernels")
    if envs.TSCOMPILE_NO_KERNEL_FUSION.get():
        st.facts["fused_kernels"] = {"add_rms_norm": 0, "rms_norm_rope": 0}
        return st
    graph = st.gm.graph
    st.facts["fused_kernels"] = {"add_rms_norm": _fuse_add_norm(graph),
                                 "rms_norm_rope": _fuse_norm_rope(graph)}
    graph.lint()
    st.gm.recompile()
    return st
