"""Contractions, stated as einsums (DTensor's einsum strategy):

  linear     "...k, nk, n -> ...n"   (x, weight [out, in], optional bias)
  matmul     "...mk, ...kn -> ...mn"
  embedding  "t, vh -> th"            (ids, table)

From a spec: a letter kept in the output may be sharded in every input that has it (the
output is sharded there: column parallel when it is `n`); a contracted letter sharded in
every input gives a partial sum P (row parallel). With a bias, only `n` may be sharded
(a bias cannot be a partial sum: it would be added once per rank); a biased linear leaves a
note naming its weight and bias, so a region that needed it row parallel says why it was
refused. Linear in x: x = P with everything else R gives P. `n` may carry chunks (a fused
[gate ; up] weight, S(0)x2).
"""
from __future__ import annotations

from torch import fx

from tscompile.annotations import Partial, Shard
from tscompile.passes.ir import tensor_args
from tscompile.passes.rules import R, Ctx, Strategy, rule

P = Partial()


def _expand(spec: str, ranks: list[int]) -> tuple[list[str], str]:
    """Replace '...' by enough batch letters for each operand's rank."""
    ins, out = spec.replace(" ", "").split("->")
    operands = ins.split(",")[: len(ranks)]
    batch = "ABCDEFG"
    full = []
    width = 0
    for op, r in zip(operands, ranks):
        if "..." in op:
            w = r - (len(op) - 3)
            width = max(width, w)
            op = op.replace("...", batch[:w])
        full.append(op)
    return full, out.replace("...", batch[:width])


def einsum_strategies(spec: str, args: list[fx.Node], *, chunk_letters: str = "",
                      additive: int = -1, linear_first: bool = True) -> list[Strategy]:
    """Strategies of an einsum over `args`. `additive`: index of an operand that is added
    (a bias), not multiplied. `linear_first`: x = P, rest R -> P."""
    letters, out = _expand(spec, [a.meta["val"].ndim for a in args])
    found: list[Strategy] = []
    for c in dict.fromkeys(out):                       # kept letters: shard everywhere
        for chunks in ((1, 2) if c in chunk_letters else (1,)):
            ins = tuple(Shard(op.index(c), chunks) if c in op else R for op in letters)
            found.append(Strategy(ins, Shard(out.index(c), chunks)))
    contracted = [c for c in dict.fromkeys("".join(letters)) if c not in out]
    if additive < 0:                  # with a bias, P would add it once per rank
        for c in contracted:
            if all(c in op for op in letters):
                found.append(Strategy(tuple(Shard(op.index(c)) for op in letters), P))
    found.append(Strategy(tuple(R for _ in letters), R))
    if linear_first and additive < 0:
        found.append(Strategy((P,) + tuple(R for _ in letters[1:]), P))
    return found


def _name(a: fx.Node) -> str:
    return a.target if a.op == "get_attr" else a.name


@rule("linear")
def linear(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    args = tensor_args(node)
    if len(args) < 3:
        return einsum_strategies("...k,nk->...n", args, chunk_letters="n")
    # Row parallel with a bias is refused, not lowered (issue 17: add the bias on one
    # rank only). Said up front: the search may fail far from here, e.g. at a P boundary.
    ctx.notes.append(
        f"{_name(args[1])} has a bias ({_name(args[2])}): splitting its input dim (row "
        f"parallel) is not supported, the bias would be added once per rank (use bias=False "
        f"in {node.meta.get('scope') or '<root>'}, or keep it column parallel or replicated)")
    return einsum_strategies("...k,nk,n->...n", args, chunk_letters="n", additive=2)


@rule("matmul", "method:matmul", "bmm")
def matmul(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    args = tensor_args(node)
    return einsum_strategies("...mk,...kn->...mn", args)


@rule("embedding")
def embedding(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    # Only the hidden dim may be split: a vocab-split table needs a masked lookup kernel.
    return [Strategy((R, Shard(1)), Shard(1)), Strategy((R, R), R)]
