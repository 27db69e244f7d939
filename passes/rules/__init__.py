"""Per-op sharding rules, as data: for each op, the placements it accepts on its tensor
inputs and what it then produces, with no communication (DTensor's "strategies").

A rule is `fn(node, ctx) -> list[Strategy]`; `Strategy.inputs` is aligned with
`passes.ir.tensor_args(node)` and lists the placement each tensor input must have. The
propagator never special-cases an op: it picks among these. Strategies are listed most
sharded first (the propagator prefers the first that fits). A partial sum plus a replicated
value (a row-parallel linear's bias, `add(P, R)`) is the strategy `(P, R) -> P` with the R
operand in `once`: it is counted on one rank only (collectives.py, row 7), so the sum over
ranks adds it exactly once. Files, one op family each:
pointwise.py (elementwise, broadcasting), linear.py (einsum-style contractions), view.py
(reshape/transpose/index/split/cat/reductions), kernels.py (tscompile custom ops).

What this is not: redistribution (collectives.py owns the table) or the search itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

from torch import fx

from tscompile.annotations import Placement, Replicate, Shard

R = Replicate()


# Chunk counts a fused projection's output dim may be split in: [gate ; up] is 2 chunks,
# [q ; k ; v] 3 (each chunk split over the ranks, plan.py's slicing convention).
CHUNKS = (1, 2, 3)


@dataclass(frozen=True, slots=True)
class Strategy:
    inputs: tuple[Placement, ...]
    output: Union[Placement, tuple[Placement, ...]]
    # Indices of R inputs added into a P output: rank 0 adds them, the others add zero
    # (a bias on a row-parallel linear). Never needs communication, so a module stays local.
    once: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Ctx:
    world: int                                   # size of the group the node is split over
    style: str                                   # "tp" or "ep" (MoE style of the region)
    known: Callable[[fx.Node], object]           # current placement of a value, None if free
    notes: list[tuple[fx.Node, str]] = field(default_factory=list)   # (node, why rejected)

    def note(self, node: fx.Node, why: str) -> None:
        """Why a rule refused a placement of `node` (the propagator's error quotes it)."""
        self.notes.append((node, why))


def candidates(node: fx.Node, ctx: Ctx) -> list[object]:
    """Placements a value may take: its known one, or (a free parameter) every sharding of
    every dim, then R."""
    p = ctx.known(node)
    if p is not None:
        return [p]
    nd = node.meta["val"].ndim
    return [Shard(d, k) for d in range(nd) for k in (1, 2)] + [R]


def follow(node: fx.Node, ctx: Ctx, source: fx.Node, fn: Callable[[object], object],
           extra: tuple = ()) -> list[Strategy]:
    """Strategies of an op whose output placement is a function of one input's: `fn` maps
    the input placement to the output's or raises Reject(reason). Other tensor inputs
    (`extra`, e.g. an index tensor) must be R."""
    found = []
    for p in candidates(source, ctx):
        try:
            out = fn(p)
        except Reject as why:
            ctx.note(node, f"{p}: {why}")
            continue
        found.append(Strategy((p,) + tuple(R for _ in extra), out))
    return found


class Reject(Exception):
    """A rule cannot place this node at all, with the reason (divisibility, ...)."""


RuleFn = Callable[[fx.Node, Ctx], list[Strategy]]
RULES: dict[str, RuleFn] = {}


def rule(*names: str) -> Callable[[RuleFn], RuleFn]:
    def register(fn: RuleFn) -> RuleFn:
        for n in names:
            if n in RULES:
                raise ValueError(f"two sharding rules for {n!r}")
            RULES[n] = fn
        return fn
    return register


def shard(dim: int, ndim: int, chunks: int = 1) -> Shard:
    return Shard(dim % ndim if ndim else dim, chunks)


def lookup(name: str) -> RuleFn | None:
    return RULES.get(name)


# Import the rule families so they register.
from tscompile.passes.rules import kernels, linear, pointwise, view  # noqa: E402,F401
