"""Pass `propagate`: give every tensor value a placement (R, S(d), P) over its group and
choose every parameter's sharding.

* Inside an annotated module (a region) the search is local SPMD: pick one strategy per op
  from its rule (passes/rules/) so that every op's inputs already have the placements it
  needs, the boundary values have the author's placements and pinned parameters keep
  theirs. No communication may appear inside. Free parameters take whatever their first
  consumer's strategy asks; the search backtracks (depth-first, strategies in rule order,
  most sharded first) and explains a failure with the deepest op it could not place and
  the reasons candidates were rejected.
* Outside regions (the residual stream, embeddings, final norm, LM head) parameters are
  replicated and each op takes the strategy whose input redistributions are cheapest
  (collectives.py's table); the mismatch is recorded in node.meta['wants'] and becomes a
  collective in the next pass.
* A partial sum plus a replicated value: inside a region the rule's `once` strategy (the R
  operand counted on rank 0 only, wants P: insert_collectives masks it, table row 7);
  outside, the partial sum is all-reduced first and the R value added after the
  reduction, so the residual stream stays R and all_reduce + add + rms_norm fuses.
* A region whose group has one rank is replicated throughout (its P boundary is R). A
  region of a larger group that ends up with nothing sharded is legal but pointless (every
  rank computes all of it): it is logged as a warning naming the region and kept in
  stage.facts['warnings'].
What it is not: it inserts nothing; it only annotates node.meta['placement'/'wants'] and
records the parameter plan in stage.facts['param_placements'] and the redistributions it
asked for, (value, from, to), in stage.facts['redistributions'].
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from torch import fx

from tscompile.annotations import Partial, Placement, Replicate, Shard, get_placement
from tscompile.passes.collectives import redistribute_cost
from tscompile.passes.explain import PlacementError, no_strategy
from tscompile.passes.ir import Stage, is_tensor, target_name, tensor_args
from tscompile.passes.rules import Ctx, Strategy, lookup

R = Replicate()
P = Partial()
_MAX_STEPS = 200_000
log = logging.getLogger(__name__)
_ONE_RANK = {"attn": "--attn-tp 1", "moe": "--moe-tp 1"}     # the dense group is --tp


def _as_r(v: Any) -> Any:
    return tuple(R for _ in v) if isinstance(v, tuple) else R


def _pins(stage: Stage) -> dict[str, tuple[Placement, str]]:
    """Parameter name -> (pinned placement, annotated module) from `params=` and, under
    MoE expert parallelism, `experts=` (dim 0)."""
    pins: dict[str, tuple[Placement, str]] = {}
    for path, mod in stage.model.named_modules():
        spec = get_placement(mod)
        if spec is None:
            continue
        wanted = list(spec.params)
        if stage.mesh.style(spec.group) == "ep":
            wanted += [(name, Shard(0)) for name in spec.experts]
        for name, p in wanted:
            full = f"{path}.{name}" if path else name
            if isinstance(p, Partial):
                raise PlacementError(
                    f"parameter {full} is pinned Partial() in {path or '<root>'}: a parameter "
                    f"is stored whole (R) or in slices (S(d)), never as per-rank summands; "
                    f"hint: pin it Replicate() or drop the pin (a bias added to a partial sum "
                    f"is added on one rank only, so a replicated bias is exact)")
            if full in pins and pins[full][0] != p:
                raise PlacementError(
                    f"conflicting annotations for parameter {full}: {pins[full][0]} from "
                    f"{pins[full][1] or '<root>'} and {p} from {path or '<root>'}; hint: pin "
                    f"it in one module only")
            pins[full] = (p, path)
    return pins


class _Search:
    """Depth-first search over one region's ops."""

    def __init__(self, nodes: list[fx.Node], ctx_args: tuple[int, str], assign: dict,
                 region: tuple[str, str], pins: dict[str, tuple[Placement, str]]):
        self.nodes, self.assign = nodes, assign     # pinned parameters are already assigned
        self.path, self.group = region
        self.pins = pins
        self.inside = set(nodes)
        self.world, self.style = ctx_args
        self.wants: dict[fx.Node, tuple] = {}
        self.once: dict[fx.Node, tuple[int, ...]] = {}
        self.deepest = -1
        # node -> its inputs' (and their producers' inputs') placements the first time no
        # strategy fitted there: backtracking forgets them, the error needs them.
        self.dead_ends: dict[fx.Node, dict[fx.Node, Any]] = {}
        self.steps = 0
        self.notes: list[tuple[fx.Node, str]] = []

    def known(self, n: fx.Node) -> Any:
        return self.assign.get(n)

    def strategies(self, node: fx.Node, notes: list | None = None,
                   known: Any = None) -> list[Strategy]:
        """The rule's strategies for `node`; `notes`/`known` replace the search's own (the
        error explains a dead end with the placements it had then)."""
        b = node.meta.get("boundary")
        if b is not None:
            return [Strategy((b.placement,), b.placement)]
        fn = lookup(target_name(node))
        if fn is None:
            raise PlacementError(
                f"no sharding rule for op {target_name(node)} ({node.name}) in "
                f"{node.meta.get('scope') or '<root>'}, inside the annotated module "
                f"{self.path} (group split over {self.world} ranks); hint: add a rule in "
                f"passes/rules/, or move the op outside the annotated module")
        ctx = Ctx(self.world, self.style, known or self.known,
                  self.notes if notes is None else notes)
        return fn(node, ctx)

    def run(self) -> None:
        # One recursion level per op: a region of many unrolled experts is deep.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * len(self.nodes) + 1000))
        if not self._dfs(0):
            self._explain()

    def _fits(self, node: fx.Node, s: Strategy) -> list[fx.Node] | None:
        """Free inputs this strategy would bind, or None if it conflicts."""
        bind = []
        boundary_in = node.meta.get("boundary") is not None and node.meta["boundary"].side == "in"
        for a, want in zip(tensor_args(node), s.inputs):
            if boundary_in and a not in self.inside:
                continue                     # redistributed outside the region
            have = self.assign.get(a)
            if have is None and a.op == "get_attr":
                if isinstance(want, Partial):
                    break                    # a parameter is whole or sliced, never P
                if a not in bind:
                    bind.append(a)
                    self.assign[a] = want
                elif self.assign[a] != want:
                    break
            elif have != want:
                break
        else:
            return bind
        for a in bind:                       # conflict: undo what this call bound
            del self.assign[a]
        return None

    def _dfs(self, i: int) -> bool:
        self.steps += 1
        if self.steps > _MAX_STEPS:
            raise PlacementError(f"placement search for {self.path} exceeded {_MAX_STEPS} "
                                 f"steps; hint: pin parameters with @placement(params=...)")
        self.deepest = max(self.deepest, i)
        if i == len(self.nodes):
            return True
        node = self.nodes[i]
        for s in self.strategies(node):
            bind = self._fits(node, s)
            if bind is None:
                continue
            self.assign[node], self.wants[node] = s.output, s.inputs
            if s.once:
                self.once[node] = s.once
            if self._dfs(i + 1):
                return True
            del self.assign[node], self.wants[node]
            self.once.pop(node, None)
            for a in bind:
                del self.assign[a]
        if node not in self.dead_ends:
            seen = tensor_args(node) + [b for a in tensor_args(node) if a.op != "get_attr"
                                        for b in tensor_args(a)]
            self.dead_ends[node] = {a: self.assign.get(a) for a in seen}
        return False

    def _explain(self) -> None:
        raise PlacementError(no_strategy(self))


def _decision_nodes(nodes: list[fx.Node]) -> list[fx.Node]:
    return [n for n in nodes if n.op in ("call_function", "call_method") and is_tensor(n)]


def propagate(stage: Stage) -> Stage:
    st = stage.copy("propagate")
    graph = st.gm.graph
    pins = _pins(st)
    assign: dict[fx.Node, Any] = {}
    wants: dict[fx.Node, tuple] = {}
    regions: dict[tuple[str, str], list[fx.Node]] = {}
    for n in graph.nodes:
        if n.meta.get("region") is not None:
            regions.setdefault(n.meta["region"], []).append(n)
    for n in graph.nodes:
        if n.op == "get_attr" and n.target in pins:
            assign[n] = pins[n.target][0]
    solved: set[tuple[str, str]] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            if is_tensor(n):
                assign[n] = R
            continue
        region = n.meta.get("region")
        if region is not None:
            if region not in solved:
                solved.add(region)
                _solve_region(st, region, regions[region], assign, wants, pins)
            continue
        if n.op == "get_attr":
            assign.setdefault(n, R)
            continue
        if n.op == "output":
            wants[n] = tuple(R for _ in tensor_args(n))
            continue
        if not is_tensor(n):
            continue
        _place_outside(st, n, assign, wants)
    for n in graph.nodes:
        if n in assign:
            n.meta["placement"] = assign[n]
        if n in wants:
            n.meta["wants"] = wants[n]
    params: dict[str, Placement] = {}
    for n in graph.nodes:
        if n.op != "get_attr":
            continue
        p = assign.get(n, R)
        if params.setdefault(n.target, p) != p:
            raise PlacementError(f"parameter {n.target} is used with two placements, "
                                 f"{params[n.target]} and {p}; hint: pin it with "
                                 f"@placement(params=...)")
    st.facts["param_placements"] = params
    st.facts["redistributions"] = _asked(graph, assign, wants)
    return st


def _asked(graph: fx.Graph, assign: dict, wants: dict) -> list[tuple[str, str, str]]:
    """(value, from, to) for every distinct (value, wanted placement) that differs from
    the value's own: what insert_collectives must lower and verify checks it did."""
    asked: dict[tuple[str, str, str], None] = {}
    for n in graph.nodes:
        for a, w in zip(tensor_args(n), wants.get(n, ())):
            if assign.get(a) != w:
                asked[(a.name, str(assign.get(a)), str(w))] = None
    return list(asked)


def _solve_region(st: Stage, region: tuple[str, str], nodes: list[fx.Node],
                  assign: dict, wants: dict, pins: dict) -> None:
    path, group = region
    world = st.mesh.size(group)
    decide = _decision_nodes(nodes)
    if world == 1:
        for n in nodes:
            if n.op == "get_attr":
                if n in assign and assign[n] != R:
                    raise PlacementError(f"{n.target} is pinned to {assign[n]} but group "
                                         f"{group} of {path} has one rank")
                assign[n] = R
        for n in decide:
            assign[n] = _as_r(n.meta["val"])
            wants[n] = tuple(_as_r(a.meta["val"]) for a in tensor_args(n))
        return
    search = _Search(decide, (world, st.mesh.style(group)), assign, region, pins)
    search.run()
    wants.update(search.wants)
    for n, once in search.once.items():      # counted on rank 0: wanted as its summand P
        wants[n] = tuple(P if i in once else w for i, w in enumerate(wants[n]))
        n.meta["once"] = once
    for n in nodes:
        if n.op == "get_attr":
            assign.setdefault(n, R)
    if not any(_split(assign.get(n)) for n in nodes):
        bounds = ", ".join(f"{b.side} {b.index} {b.placement}" for b in
                           (n.meta["boundary"] for n in nodes if n.meta.get("boundary")))
        msg = (f"annotated module {path} (group {group}, {world} ranks) has nothing sharded: "
               f"every parameter and value is replicated, so each rank computes all of it "
               f"(boundaries: {bounds or 'none'}); hint: end it with outputs=Partial() so "
               f"its last linear can be row parallel, or give the group one rank "
               f"({_ONE_RANK.get(group, 'a smaller --tp')})")
        st.facts.setdefault("warnings", []).append(msg)
        log.warning("%s", msg)


def _split(p: Any) -> bool:
    if isinstance(p, tuple):
        return any(_split(q) for q in p)
    return isinstance(p, (Shard, Partial))


def _place_outside(st: Stage, n: fx.Node, assign: dict, wants: dict) -> None:
    fn = lookup(target_name(n))
    args = tensor_args(n)
    if fn is None:
        if all(assign.get(a) == _as_r(a.meta["val"]) for a in args):
            # Outside every annotated module an op without a rule still runs replicated.
            assign[n], wants[n] = _as_r(n.meta["val"]), tuple(_as_r(a.meta["val"]) for a in args)
            return
        raise PlacementError(
            f"no sharding rule for op {target_name(n)} ({n.name}) in "
            f"{n.meta.get('scope') or '<root>'}, whose inputs are {[str(assign.get(a)) for a in args]}; "
            f"hint: add a rule in passes/rules/")
    ctx = Ctx(st.mesh.world_size, "tp", lambda a: assign.get(a), [])
    best, best_cost = None, (float("inf"), True)
    for s in fn(n, ctx):
        if s.once:
            continue                  # outside: reduce the partial sum, then add (see top)
        # Cheapest redistribution first; on a tie keep the value replicated (the residual
        # stream stays R, so the next annotated module gets its R input for free).
        cost = (sum(redistribute_cost(assign[a], w) for a, w in zip(args, s.inputs)),
                s.output != _as_r(n.meta["val"]))
        if cost < best_cost:
            best, best_cost = s, cost
    if best is None or best_cost[0] == float("inf"):
        raise PlacementError(f"op {target_name(n)} ({n.name}) in {n.meta.get('scope')} cannot "
                             f"take inputs {[str(assign.get(a)) for a in args]} by any "
                             f"redistribution")
    assign[n], wants[n] = best.output, best.inputs
