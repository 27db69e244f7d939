"""Elementwise ops (with NumPy broadcasting): every non-broadcast input is placed like the
output. Linear ops also pass partial sums through:
  "all"   P in every tensor input -> P   (add, sub, neg, casts: sum of parts commutes);
          P in some inputs, R in the others -> P with the R ones counted once (rank 0
          adds them: p1 + p2 + r = (p1 + r) + p2), e.g. a bias added to a row-parallel
          matmul's output. A python number operand (x + 1.0) makes the op affine, not
          linear: no P at all (each rank would add the constant).
  "one"   P in exactly one input, others R -> P   (mul: a*(x1+x2) = a*x1 + a*x2)
  "first" P in the first input, others R -> P     (div by a replicated divisor)
  None    nonlinear (silu, exp, rsqrt, pow): no P.
"""
from __future__ import annotations

import itertools

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
    if mode == "all" and _constant(node) is not None:
        if any(ctx.known(a) == P for a in args):
            ctx.note(node, f"adding the constant {_constant(node)!r} to a partial sum (P) "
                           f"would add it once per rank")
    elif mode == "all":
        out_list.append(Strategy(tuple(P for _ in args), P))
        for mask in itertools.product((P, R), repeat=len(args)):     # P + R: R once
            if P in mask and R in mask:
                out_list.append(Strategy(mask, P, tuple(i for i, m in enumerate(mask)
                                                        if m == R)))
    elif mode in ("one", "first"):
        for i in range(len(args) if mode == "one" else min(1, len(args))):
            out_list.append(Strategy(tuple(P if j == i else R for j in range(len(args))), P))
    return out_list


_ADDITIVE = {"add", "sub", "iadd", "method:add", "method:sub"}


def _constant(node: fx.Node) -> int | float | None:
    """A python number added or subtracted by `node` (x + 1.0), None if there is none."""
    if _name(node) not in _ADDITIVE:
        return None
    return next((a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)
                 and a != 0), None)


def _name(node: fx.Node) -> str:
    from tscompile.passes.ir import target_name
    return target_name(node)


rule(*TABLE)(_strategies)
