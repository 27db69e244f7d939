"""Elementwise ops (with NumPy broadcasting): every non-broadcast input is placed like the
output. Linear ops also pass partial sums through:
  "all"   P in every tensor input -> P   (add, sub, neg, casts: sum of parts commutes)
  "one"   P in exactly one input, others R -> P   (mul: a*(x1+x2) = a*x1 + a*x2)
  "first" P in the first input, others R -> P     (div by a replicated divisor)
  None    nonlinear (silu, exp, rsqrt, pow): no P.
"""
from __future__ import annotations

from torch import fx

from tscompile.annotations import Partial, Shard
from tscompile.passes.ir import tensor_args
from tscompile.passes.rules import R, Ctx, Strategy, rule

P = Partial()

TABLE: dict[str, str | None] = {
    # name: partial-sum behaviour
    "add": "all", "sub": "all", "iadd": "all", "neg": "all",
    "method:add": "all", "method:sub": "all", "method:neg": "all",
    "method:float": "all", "method:to": "all", "method:type_as": "all", "method:half": "all",
    "method:bfloat16": "all", "method:contiguous": "all", "method:clone": "all",
    "mul": "one", "method:mul": "one", "truediv": "first", "method:div": "first",
    "silu": None, "gelu": None, "relu": None, "sigmoid": None, "tanh": None, "exp": None,
    "rsqrt": None, "pow": None, "method:pow": None, "method:rsqrt": None, "method:exp": None,
    "method:sigmoid": None, "eq": None, "method:eq": None, "where": None,
}


def _strategies(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    args = tensor_args(node)
    out = node.meta["val"]
    n = out.ndim
    out_list: list[Strategy] = []
    for d in range(n):
        if out.shape[d] == 1:
            continue
        for chunks in (1, 2):
            ins = []
            for a in args:
                shape = a.meta["val"].shape
                k = d - (n - len(shape))            # the input's dim aligned with d
                ins.append(Shard(k, chunks) if k >= 0 and shape[k] != 1 else R)
            if any(isinstance(p, Shard) for p in ins):
                out_list.append(Strategy(tuple(ins), Shard(d, chunks)))
    out_list.append(Strategy(tuple(R for _ in args), R))
    mode = TABLE[_name(node)]
    if mode == "all":
        out_list.append(Strategy(tuple(P for _ in args), P))
    elif mode in ("one", "first"):
        for i in range(len(args) if mode == "one" else min(1, len(args))):
            out_list.append(Strategy(tuple(P if j == i else R for j in range(len(args))), P))
    return out_list


def _name(node: fx.Node) -> str:
    from tscompile.passes.ir import target_name
    return target_name(node)


rule(*TABLE)(_strategies)
