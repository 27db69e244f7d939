"""Pass `pack_linears`: linears that read the same input become one matmul over their
weights stacked along the output dim (horizontal fusion), each output a narrow view of it.

    q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
 =>
    qkv = linear(x, W[q;k;v]); q = narrow(qkv, -1, 0, nq); k = narrow(qkv, -1, nq, nk); ...

At decode a linear is a GEMV bound by its weight bytes, and small ones (a KV projection of
8 MB) run far below the bandwidth roof and add a launch (and a split-K reduction) each;
packed, the projection reads all its bytes in one kernel. Attention's Q/K/V (GQA), MLA's
query and latent projections (`q_proj` / `q_a_proj` with `kv_a_proj_with_mqa`) are the
cases in the models today.

It works on the per-rank graph: the packed weight is this rank's slices of the parts,
concatenated (`runtime/program.py` builds it after loading them, and frees the parts); the
manifest's `packed` lists {name: {"parts": [...], "dim": 0}}. Parts must share the input,
dtype, bias-ness (biases pack the same way) and weight placement (so every rank stacks
slices of the same kind); outputs keep their placements.
The program's graph.json (the ONNX export's input) is taken before this pass: it names the
checkpoint's tensors, not packed ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from tscompile.passes.ir import Stage, TensorVal

_LINEAR = (torch._C._nn.linear, F.linear)
SEP = "+"                       # packed name: <scope>.<a>+<b>+<c>.weight


def _linear_parts(n: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    if n.op != "call_function" or n.target not in _LINEAR or n.kwargs:
        return None
    x, w, b = (*n.args, None)[:3] if len(n.args) >= 2 else (None, None, None)
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    if b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr"):
        return None
    if not isinstance(w.meta.get("val"), TensorVal) or len(w.meta["val"].shape) != 2:
        return None
    return x, w, b


def packed_name(names: list[str]) -> str:
    """layers.0.self_attn.{q,k,v}_proj.weight -> layers.0.self_attn.q_proj+k_proj+v_proj.weight"""
    heads, leaf = zip(*(n.rsplit(".", 1) for n in names))
    scope = heads[0].rsplit(".", 1)[0] if "." in heads[0] else ""
    mods = [h.rsplit(".", 1)[-1] for h in heads]
    if len(set(leaf)) != 1 or any(h.rsplit(".", 1)[0] != scope for h in heads if "." in h):
        return SEP.join(names)
    return (f"{scope}." if scope else "") + SEP.join(mods) + f".{leaf[0]}"


def _get_attr(gm: fx.GraphModule, like: fx.Node, name: str, rows) -> fx.Node:
    """A get_attr of the packed tensor `name`, with a meta tensor of its per-rank shape
    registered at that path of `gm` (fx resolves every get_attr target)."""
    v = like.meta["val"]
    *path, leaf = name.split(".")
    mod = gm
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    shape = (int(rows), *(int(d) for d in v.shape[1:]))
    mod.register_buffer(leaf, torch.empty(shape, dtype=v.dtype, device="meta"),
                        persistent=False)
    with gm.graph.inserting_before(like):
        a = gm.graph.create_node("get_attr", name)
    a.meta.update(like.meta)
    a.meta["val"] = TensorVal((rows, *v.shape[1:]), v.dtype)
    return a


def _pack(gm: fx.GraphModule, group: list[tuple[fx.Node, fx.Node, fx.Node | None]],
          packed: dict[str, dict]) -> None:
    graph = gm.graph
    first, x = group[0][0], group[0][0].args[0]
    ws = [w for _, w, _ in group]
    rows = [w.meta["val"].shape[0] for w in ws]
    name = packed_name([w.target for w in ws])
    wp = _get_attr(gm, ws[0], name, sum(rows))
    packed[name] = {"parts": [w.target for w in ws], "dim": 0}
    bp = None
    if group[0][2] is not None:
        bs = [b for _, _, b in group]
        bp = _get_attr(gm, bs[0], packed_name([b.target for b in bs]), sum(rows))
        packed[bp.target] = {"parts": [b.target for b in bs], "dim": 0}
    # The packed linear goes where the first part was; every part's users come after it.
    with graph.inserting_before(first):
        y = graph.call_function(first.target, (x, wp, bp))
    val = first.meta["val"]
    y.meta.update(first.meta)
    y.meta["val"] = TensorVal((*val.shape[:-1], sum(rows)), val.dtype)
    start, cursor = 0, y
    for (lin, _, _), n in zip(group, rows):
        with graph.inserting_after(cursor):
            view = cursor = graph.call_function(torch.narrow, (y, -1, start, n))
        view.meta.update({k: v for k, v in lin.meta.items() if k != "wants"})
        view.meta["wants"] = (y.meta["placement"],)
        lin.replace_all_uses_with(view)
        graph.erase_node(lin)
        start += n
    for a in (*ws, *(b for _, _, b in group if b is not None)):
        if not a.users:
            graph.erase_node(a)


def pack_linears(stage: Stage) -> Stage:
    from tscompile import envs
    st = stage.copy("pack_linears")
    packed: dict[str, dict] = {}
    st.facts["packed"] = packed
    if envs.TSCOMPILE_NO_KERNEL_FUSION.get():
        return st
    graph = st.gm.graph
    for x in list(graph.nodes):
        groups: dict[tuple, list] = {}
        for u in x.users:
            parts = _linear_parts(u)
            if parts is None or parts[0] is not x:
                continue
            _, w, b = parts
            key = (u.target, w.meta["val"].dtype, w.meta["val"].shape[1:],
                   w.meta.get("placement"), b is None, u.meta.get("wants"))
            groups.setdefault(key, []).append((u, w, b))
        for group in groups.values():
            if len(group) > 1:
                order = {n: i for i, n in enumerate(graph.nodes)}
                group.sort(key=lambda g: order[g[0]])
                _pack(st.gm, group, packed)
    graph.lint()
    st.gm.recompile()
    return st
