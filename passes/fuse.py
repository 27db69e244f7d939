"""Pass `fuse`: all_reduce + residual add + RMSNorm (or LayerNorm) -> one
`all_reduce_add_rms_norm` (`all_reduce_add_layer_norm`).

The pattern is where every TP decoder layer lands its reductions (DESIGN.md §Compile 6):

    a  = all_reduce(p)            # P -> R, the attention or MLP partial sum
    s  = add(x, a)                # the residual stream (x R)
    y  = rms_norm(s, w, eps)      # the next sublayer's input norm
 =>
    y, s = all_reduce_add_rms_norm(p, x, w, eps)

The same for a LayerNorm over the last dim with a weight (`torch.nn.functional.layer_norm`,
as nn.LayerNorm traces), bias or not:

    y = layer_norm(s, (H,), weight=w, bias=b, eps=e)
 =>
    y, s = all_reduce_add_layer_norm(p, x, w, b, e)

A fused kernel can then do the reduction and the norm in one pass over the hidden vector
(one read of p, x; one write of s, y). The reference implementation is the unfused
sequence, so the fusion never changes numbers on the CPU. An all-reduce with no such
consumer (e.g. the last layer's, followed by an index into the logits rows) stays plain.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from tscompile.passes.ir import Stage, tensor_args


def _is(node: fx.Node, target) -> bool:
    return node.op == "call_function" and node.target is target


def _wants_of(node: fx.Node, arg: fx.Node):
    """The placement `node` wants for its tensor input `arg` (meta["wants"] follows the
    order of its tensor inputs)."""
    return node.meta["wants"][tensor_args(node).index(arg)]


def _norm_args(norm: fx.Node, add: fx.Node) -> tuple[object, tuple] | None:
    """(fused op, its arguments after (p, x)) when `norm` normalises `add` as the fusion
    needs (over the last dim, with a weight), else None."""
    ops = torch.ops.tscompile
    if not norm.args or norm.args[0] is not add:
        return None
    if _is(norm, ops.rms_norm.default):
        return ops.all_reduce_add_rms_norm.default, (norm.args[1], norm.args[2])
    if _is(norm, F.layer_norm):
        a = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), norm.args))
        a.update(norm.kwargs)
        shape, w = a.get("normalized_shape"), a.get("weight")
        last = add.meta["val"].shape[-1]
        if not isinstance(w, fx.Node) or tuple(shape or ()) != (last,):
            return None
        return ops.all_reduce_add_layer_norm.default, (w, a.get("bias"), a.get("eps", 1e-5))
    return None


def take_over(f: fx.Node, *pairs: tuple[fx.Node, fx.Node]) -> None:
    """Each (getitem of fused node f, node it replaces): the getitem takes the old node's
    meta and users, then the old node is erased (in the order given)."""
    for new, old in pairs:
        new.meta.update({k: v for k, v in old.meta.items() if k != "wants"})
        new.meta["wants"] = (f.meta["placement"],)
        old.replace_all_uses_with(new)
    for _, old in pairs:
        f.graph.erase_node(old)


def fuse(stage: Stage) -> Stage:
    st = stage.copy("fuse")
    graph = st.gm.graph
    ops = torch.ops.tscompile
    fused = 0
    for ar in list(graph.nodes):
        if not _is(ar, ops.all_reduce.default) or len(ar.users) != 1:
            continue
        add = next(iter(ar.users))
        if not (_is(add, operator.add) and len(add.args) == 2 and ar in add.args):
            continue
        x = add.args[0] if add.args[1] is ar else add.args[1]
        norms = [(u, m) for u in add.users if (m := _norm_args(u, add)) is not None]
        if not norms:
            continue
        norm, (op, params) = norms[0]
        with graph.inserting_before(add):
            f = graph.call_function(op, (ar.args[0], x, *params))
            y = graph.call_function(operator.getitem, (f, 0))
            s = graph.call_function(operator.getitem, (f, 1))
        # The weight (and bias) are defined before `add`'s users but maybe after `add`.
        for w in params:
            if isinstance(w, fx.Node) and w.op == "get_attr":
                f.prepend(w)
        f.meta.update(scope=add.meta.get("scope", ""), region=None,
                      val=(norm.meta["val"], add.meta["val"]),
                      placement=(norm.meta["placement"], add.meta["placement"]),
                      wants=(ar.meta["wants"][0], add.meta["wants"][0],
                             *(_wants_of(norm, p) for p in params if isinstance(p, fx.Node))),
                      collective=dict(ar.meta["collective"], kind=op._schema.name.split("::")[1]))
        take_over(f, (y, norm), (s, add))
        graph.erase_node(ar)
        fused += 1
    graph.lint()
    st.gm.recompile()
    st.facts["fused_all_reduce_norm"] = fused
    return st
