"""Pass `fuse`: all_reduce + residual add + RMSNorm -> one `all_reduce_add_rms_norm`.

The pattern is where every TP decoder layer lands its reductions (DESIGN.md §Compile 6):

    a  = all_reduce(p)            # P -> R, the attention or MLP partial sum
    s  = add(x, a)                # the residual stream (x R)
    y  = rms_norm(s, w, eps)      # the next sublayer's input norm
 =>
    y, s = all_reduce_add_rms_norm(p, x, w, eps)

A fused kernel can then do the reduction and the norm in one pass over the hidden vector
(one read of p, x; one write of s, y). The reference implementation is the unfused
sequence, so the fusion never changes numbers on the CPU. An all-reduce with no such
consumer (e.g. the last layer's, followed by an index into the logits rows) stays plain.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from tscompile.passes.ir import Stage


def _is(node: fx.Node, target) -> bool:
    return node.op == "call_function" and node.target is target


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
        norms = [u for u in add.users if _is(u, ops.rms_norm.default) and u.args[0] is add]
        if not norms:
            continue
        norm = norms[0]
        with graph.inserting_before(add):
            f = graph.call_function(ops.all_reduce_add_rms_norm.default,
                                    (ar.args[0], x, norm.args[1], norm.args[2]))
            y = graph.call_function(operator.getitem, (f, 0))
            s = graph.call_function(operator.getitem, (f, 1))
        # The weight is defined before `add`'s users but maybe after `add`: move it up.
        w = norm.args[1]
        if w.op == "get_attr":
            f.prepend(w)
        f.meta.update(scope=add.meta.get("scope", ""), region=None,
                      val=(norm.meta["val"], add.meta["val"]),
                      placement=(norm.meta["placement"], add.meta["placement"]),
                      wants=(ar.meta["wants"][0], add.meta["wants"][0], norm.meta["wants"][1]),
                      collective=dict(ar.meta["collective"], kind="all_reduce_add_rms_norm"))
        for new, old in ((y, norm), (s, add)):
            new.meta.update({k: v for k, v in old.meta.items() if k != "wants"})
            new.meta["wants"] = (f.meta["placement"],)
            old.replace_all_uses_with(new)
        graph.erase_node(norm)
        graph.erase_node(add)
        graph.erase_node(ar)
        fused += 1
    graph.lint()
    st.gm.recompile()
    st.facts["fused_all_reduce_norm"] = fused
    return st
