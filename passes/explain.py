"""Why a region's placement search failed, in the author's terms: the op (its fx node and
module path) where no strategy fitted, the inputs it had there, the cause and a hint that
changes the outcome.

The search (propagate.py) keeps, for every op where no strategy fitted, the placements its
inputs (and their producers' inputs) had the first time. Of those dead ends the most
telling is reported, in this order:
  0  a partial sum (P) reaches an op that cannot take one (a nonlinearity, a constant
     added per rank, a boundary annotated otherwise): the hint moves the op out of the
     module, after the reduction;
  1  a pinned parameter is the only obstacle (every other input fits some strategy): the
     hint names the placement the op needs, e.g. a bias on a Partial output must be R;
  2  otherwise the deepest dead end, with the reasons the rules gave (sizes that do not
     divide, ...) and, at an output boundary, the pin that stops its producer.
What it is not: the search. It only reads the search's record.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from tscompile.annotations import Partial, Shard
from tscompile.passes.ir import target_name, tensor_args

P = Partial()
DEFAULT_HINT = ("use sizes the group divides (e.g. a tp that divides the head count), "
                "replicate this group (--attn-tp 1 or a smaller --tp), or pin a parameter "
                "with @placement(params=...)")
BIAS_ONCE = ("a bias on a Partial output is added once, whole, on one rank, so it must be "
             "Replicate()")


class PlacementError(ValueError):
    pass


def label(a: fx.Node) -> str:
    return a.target if a.op == "get_attr" else a.name


def where(n: fx.Node) -> str:
    """The op, its fx node and its module path: "linear (linear_3) in layers.0.mlp.down"."""
    b = n.meta.get("boundary")
    if b is not None:
        return (f"the {'output' if b.side == 'out' else 'input'} {b.index} of {b.path} "
                f"(annotated {b.placement})")
    return f"{target_name(n)} ({n.name}) in {n.meta.get('scope') or '<root>'}"


def ctor(p: Any) -> str:
    """The annotation an author writes for a placement: Replicate(), Shard(1), Partial()."""
    if isinstance(p, Shard):
        return f"Shard({p.dim}{', ' + str(p.chunks) if p.chunks > 1 else ''})"
    return "Partial()" if isinstance(p, Partial) else "Replicate()"


def no_strategy(search: Any) -> str:
    """The message for a region whose search failed (`search` is propagate's _Search)."""
    order = {n: i for i, n in enumerate(search.nodes)}
    if not search.dead_ends:
        node = search.nodes[min(search.deepest, len(search.nodes) - 1)]
        search.dead_ends[node] = {}
    found = []
    for node, have in search.dead_ends.items():
        kind, why, hint = _cause(search, node, _inputs(search, node), have)
        found.append((kind, -order[node], node, have, why, hint))
    kind, _, node, have, why, hint = min(found, key=lambda f: f[:2])

    def shown(a: fx.Node) -> str:
        p = have.get(a)
        pin = search.pins.get(a.target) if a.op == "get_attr" else None
        return (f"{label(a)} " + ("free" if p is None else str(p)) +
                (f" (pinned in {pin[1] or '<root>'})" if pin else ""))

    # Reasons rules gave: this op's first, then the others' in graph order, plain shards
    # before chunked ones; at most three.
    notes = sorted(dict.fromkeys(search.notes), key=lambda x: (
        x[0] is not node, ")x" in x[1].split(":")[0], order.get(x[0], 0)))
    said = [f"{where(n)}: {text}" for n, text in notes[:3]]
    return (f"cannot split {search.path} over group {search.group} ({search.world} ranks) "
            f"without communication inside: no strategy of {where(node)} accepts its inputs "
            f"[{', '.join(shown(a) for a in _inputs(search, node))}]"
            + (f": {why}" if why else "") + ("; " + "; ".join(said) if said else "")
            + f"; hint: {hint}")


def _inputs(search: Any, node: fx.Node) -> list[fx.Node]:
    args = tensor_args(node)
    b = node.meta.get("boundary")
    if b is not None and b.side == "in":
        return [a for a in args if a in search.inside]    # the outside is redistributed
    return args


def _cause(search: Any, node: fx.Node, args: list[fx.Node], have: dict
           ) -> tuple[int, str, str]:
    """(kind, why, hint) of one dead end; kind as in the module docstring."""
    strategies = search.strategies(node, notes=[], known=_then(search, have))
    b = node.meta.get("boundary")
    for i, a in enumerate(args):
        if have.get(a) == P and all(s.inputs[i] != P for s in strategies):
            src = where(a) + _made_from(a, have)
            if b is not None:
                side = "outputs" if b.side == "out" else "inputs"
                return (0, f"{label(a)} is a partial sum (P), made by {src}, but {b.path} is "
                           f"annotated {side}={ctor(b.placement)}",
                        f"annotate {b.path} {side}=Partial() (the all-reduce then lands "
                        f"after it)")
            return (0, f"{target_name(node)} cannot take a partial sum (P), it needs the full "
                       f"sum, and {label(a)} is one, made by {src}",
                    f"move {target_name(node)} out of {search.path}, after its output (it "
                    f"then runs on the reduced value), or end {search.path} before the "
                    f"row-parallel op")
    for s in strategies:                 # a pin is the only obstacle
        off = [(k, a, w) for k, (a, w) in enumerate(zip(args, s.inputs))
               if have.get(a) not in (None, w)]
        if off and all(a.op == "get_attr" and a.target in search.pins for _, a, _ in off):
            k, a, w = off[0]
            reason = f" ({BIAS_ONCE})" if k in s.once else ""
            return (1, f"parameter {a.target} is pinned {have[a]} in "
                       f"{search.pins[a.target][1] or '<root>'}, but {target_name(node)} "
                       f"would need it {w}{reason}",
                    f"pin {a.target} {ctor(w)} or drop the pin")
    if b is not None and b.side == "out" and args:
        a = args[0]
        why = f"{label(a)} is {have.get(a)}, made by {where(a)}{_made_from(a, have)}"
        return 2, why, _producer_hint(search, a, b.placement, have) or DEFAULT_HINT
    return 2, "", DEFAULT_HINT


def _made_from(a: fx.Node, have: dict) -> str:
    params = [f"{p.target} {have.get(p) or 'free'}" for p in tensor_args(a)
              if p.op == "get_attr"]
    return f" from {', '.join(params)}" if params else ""


def _then(search: Any, have: dict) -> Any:
    """`known` as it was at the dead end."""
    return lambda n: have[n] if n in have else search.assign.get(n)


def _producer_hint(search: Any, a: fx.Node, want: Any, have: dict) -> str:
    """A pin that stops `a`'s op from producing `want`, as a hint to change it."""
    if a.op not in ("call_function", "call_method"):
        return ""
    for s in search.strategies(a, notes=[], known=_then(search, have)):
        if s.output != want:
            continue
        for k, (p, w) in enumerate(zip(tensor_args(a), s.inputs)):
            pin = search.pins.get(p.target) if p.op == "get_attr" else None
            if pin is not None and pin[0] != w:
                reason = f" ({BIAS_ONCE})" if k in s.once else ""
                return (f"{where(a)} makes {want} only with {p.target} {w}{reason}: pin it "
                        f"{ctor(w)} or drop the pin")
    return ""
