"""Contractions, stated as einsums (DTensor's einsum strategy):

  linear     "...k, nk, n -> ...n"   (x, weight [out, in], optional bias)
  addmm      "n, mk, kn -> mn"        (bias, x, weight [in, out]: GPT-2's Conv1D)
  matmul     "...mk, ...kn -> ...mn"
  embedding  "t, vh -> th"            (ids, table)
  fp8_block_linear "...k, nk, nk, n -> ...n"  (x, FP8 weight, its block scales, bias)

The block scales of an FP8 weight [N, K] form a grid [N/bn, K/bk] over the same letters, so
every strategy splits them exactly like the weight (S(0) rows with S(0) rows, S(1) with S(1),
the same chunks); whether a rank's slice is whole blocks is checked after propagation
(tscompile/quant.py: check_fp8_blocks), where the error can name the block size.

From a spec: a letter kept in the output may be sharded in every input that has it (the
output is sharded there: column parallel when it is `n`); a contracted letter sharded in
every input gives a partial sum P (row parallel). Linear in x: x = P with everything else R
gives P. `n` may carry chunks (a fused [gate ; up] or [q ; k ; v] weight, S(0)x2, S(0)x3).

A bias (the `additive` operand) is added, not multiplied: it is sharded with `n` in the
column-parallel strategies, and in those whose output is P (row parallel, or x = P) it is
R and counted once (`Strategy.once`): rank 0's summand carries it, so the sum over ranks
adds it exactly once. The rank 0 choice, not "add after the all-reduce", because it is the
cheaper schedule: the bias stays the GEMM's epilogue (the other ranks pass a zero bias, an
[n]-sized mask per step), nothing is added between the reduction and the residual add (so
all_reduce + add + rms_norm still fuses), and the module's P boundary stays as written.
"""
from __future__ import annotations

from torch import fx

from tscompile.annotations import Partial, Shard
from tscompile.passes.ir import tensor_args
from tscompile.passes.rules import CHUNKS, R, Ctx, Strategy, rule

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
                      additive: int = -1, linear_in: int | None = 0) -> list[Strategy]:
    """Strategies of an einsum over `args`. `additive`: index of an operand that is added
    (a bias), not multiplied. `linear_in`: index of the operand that may be P alone (x = P,
    rest R -> P), None for none."""
    letters, out = _expand(spec, [a.meta["val"].ndim for a in args])
    once = (additive,) if additive >= 0 else ()
    found: list[Strategy] = []
    for c in dict.fromkeys(out):                       # kept letters: shard everywhere
        for chunks in (CHUNKS if c in chunk_letters else (1,)):
            ins = tuple(Shard(op.index(c), chunks) if c in op else R for op in letters)
            found.append(Strategy(ins, Shard(out.index(c), chunks)))
    contracted = [c for c in dict.fromkeys("".join(letters)) if c not in out]
    for c in contracted:                               # row parallel: P, a bias once
        if all(c in op for i, op in enumerate(letters) if i != additive):
            ins = tuple(R if i == additive else Shard(op.index(c))
                        for i, op in enumerate(letters))
            found.append(Strategy(ins, P, once))
    found.append(Strategy(tuple(R for _ in letters), R))
    if linear_in is not None:
        found.append(Strategy(tuple(P if i == linear_in else R for i in range(len(letters))),
                              P, once))
    return found


@rule("linear")
def linear(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    args = tensor_args(node)
    if len(args) < 3:
        return einsum_strategies("...k,nk->...n", args, chunk_letters="n")
    return einsum_strategies("...k,nk,n->...n", args, chunk_letters="n", additive=2)


@rule("tscompile::fp8_block_linear")
def fp8_block_linear(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    args = tensor_args(node)
    if len(args) < 4:
        return einsum_strategies("...k,nk,nk->...n", args, chunk_letters="n")
    return einsum_strategies("...k,nk,nk,n->...n", args, chunk_letters="n", additive=3)


@rule("addmm")
def addmm(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    # torch.addmm(bias, x, w): bias [n] or [m, n], x [m, k], w [k, n].
    args = tensor_args(node)
    if len(args) != 3:
        return [Strategy(tuple(R for _ in args), R)]
    bias = "mn"[2 - args[0].meta["val"].ndim:]
    return einsum_strategies(f"{bias},mk,kn->mn", args, chunk_letters="n", additive=0,
                             linear_in=1)


@rule("matmul", "method:matmul", "bmm")
def matmul(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    args = tensor_args(node)
    return einsum_strategies("...mk,...kn->...mn", args)


@rule("embedding")
def embedding(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    # Only the hidden dim may be split: a vocab-split table needs a masked lookup kernel.
    return [Strategy((R, Shard(1)), Shard(1)), Strategy((R, R), R)]
