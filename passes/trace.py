"""Pass `trace`: the single-device model -> a torch.fx graph with module scopes, annotated
module boundaries as marker nodes, and symbolic shapes.

What it does:
* traces through every module (no leaf modules), so `nn.Linear` becomes `linear(x, W, b)`
  over a `get_attr` of its weight: weight placement is a choice the propagation pass makes;
* kernel custom ops (`torch.ops.tscompile.*`) stay single nodes (attention with its KV
  cache, MoE, norms, RoPE);
* an annotated module's inputs and outputs pass through `boundary` identity nodes carrying
  the author's placement, and every node records its module `scope` and outermost annotated
  `region`;
* shapes: the graph runs on the meta device at three (T, S) sample points and every dim is
  fitted as a*T + b*S + c (sympy), so "tokens in the step" and "rows of logits" stay symbols.
What it is not: placement logic (propagate.py) or a general dynamic-shape tracer: a dim
that is not affine in T and S is reported as an error naming the node.
"""
from __future__ import annotations

from typing import Any

import sympy
import torch
from torch import fx, nn

from tscompile.annotations import get_placement
from tscompile.kernels import AttentionMetadata
from tscompile.passes.ir import S, Boundary, Stage, T, TensorVal, boundary

# (T, S) sample points: a base, one step in T, one in S; a 4th point checks the fit.
_POINTS = ((11, 3), (13, 3), (11, 5), (17, 7))


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__()
        self.scopes: list[str] = [""]
        self.modules: list[nn.Module] = []
        self.regions: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["scope"] = self.scopes[-1]
        node.meta["region"] = self.regions[0] if self.regions else None
        return node

    def _mark(self, value: Any, side: str, index: int, spec: Any, path: str) -> Any:
        places = spec.inputs if side == "in" else spec.outputs
        if not isinstance(value, fx.Proxy) or index >= len(places) or places[index] is None:
            return value
        b = Boundary(path, side, index, places[index], spec.group)
        proxy = self.create_proxy("call_function", boundary, (value, f"{side}:{path}"), {})
        proxy.node.meta["boundary"] = b
        return proxy

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        # A module shared by several parents (one RoPE table for all layers) is scoped under
        # the parent calling it now, not under its first registered name.
        parent = self.modules[-1] if self.modules else None
        child = next((k for k, c in parent.named_children() if c is m), None) if parent else None
        path = f"{self.scopes[-1]}.{child}".lstrip(".") if child else self.path_of_module(m)
        spec = get_placement(m)
        self.scopes.append(path)
        self.modules.append(m)
        try:
            if spec is None:
                return super().call_module(m, forward, args, kwargs)
            self.regions.append((path, spec.group))
            try:
                args = tuple(self._mark(a, "in", i, spec, path) for i, a in enumerate(args))
                out = super().call_module(m, forward, args, kwargs)
                if isinstance(out, tuple):
                    return tuple(self._mark(o, "out", i, spec, path) for i, o in enumerate(out))
                return self._mark(out, "out", 0, spec, path)
            finally:
                self.regions.pop()
        finally:
            self.scopes.pop()
            self.modules.pop()


def sample_inputs(t: int, s: int, device: str = "meta") -> tuple[torch.Tensor, ...]:
    """Inputs of the forward contract with T=t tokens and S=s logit rows (2 sequences)."""
    i32, i64 = torch.int32, torch.int64
    meta = AttentionMetadata(
        query_start_loc=torch.empty(3, dtype=i32, device=device),
        seq_lens=torch.empty(2, dtype=i32, device=device),
        block_tables=torch.empty(2, 4, dtype=i32, device=device),
        slot_mapping=torch.empty(t, dtype=i64, device=device),
        logits_indices=torch.empty(s, dtype=i64, device=device), num_decodes=1)
    return (torch.empty(t, dtype=i64, device=device), torch.empty(t, dtype=i64, device=device),
            meta)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _describe(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("t", tuple(v.shape), v.dtype)
    if isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
        return tuple(_describe(x) for x in v)
    if isinstance(v, torch.Size):
        return ("size", tuple(v))
    if isinstance(v, int) and not isinstance(v, bool):
        return ("int", v)
    return None


def _fit(name: str, samples: list[int]) -> sympy.Expr:
    (t0, s0), (t1, _), (_, s2), (t3, s3) = _POINTS
    a = sympy.Rational(samples[1] - samples[0], t1 - t0)
    b = sympy.Rational(samples[2] - samples[0], s2 - s0)
    c = samples[0] - a * t0 - b * s0
    expr = sympy.nsimplify(a * T + b * S + c)
    if expr.subs({T: t3, S: s3}) != samples[3] or not all(
            x.is_integer for x in (a, b, c)):
        raise ValueError(f"trace: a dim of {name} is {samples} at (T, S) = {_POINTS}: not "
                         f"affine in the token count; data-dependent shapes are not supported")
    return expr


def _symbolic(name: str, descs: list[Any]) -> Any:
    d0 = descs[0]
    if d0 is None:
        return None
    if isinstance(d0, tuple) and d0 and isinstance(d0[0], tuple):
        return tuple(_symbolic(name, [d[i] for d in descs]) for i in range(len(d0)))
    kind = d0[0]
    if kind == "t":
        if any(len(d[1]) != len(d0[1]) for d in descs):
            raise ValueError(f"trace: rank of {name} depends on the token count")
        dims = tuple(_fit(name, [d[1][i] for d in descs]) for i in range(len(d0[1])))
        return TensorVal(dims, d0[2])
    return None


def infer_shapes(gm: fx.GraphModule) -> None:
    """Fill node.meta['val'] (TensorVal, tuple of them, or None for non-tensors) and
    node.meta['sym'] (sympy expr for int / size values)."""
    runs = []
    for t, s in _POINTS:
        rec = _Recorder(gm)
        with torch.no_grad():
            rec.run(*sample_inputs(t, s))
        runs.append(rec.values)
    for n in gm.graph.nodes:
        descs = [_describe(r.get(n.name)) for r in runs]
        n.meta["val"] = _symbolic(n.name, descs)
        d0 = descs[0]
        if d0 is not None and not isinstance(d0[0], tuple) and d0[0] == "int":
            n.meta["sym"] = _fit(n.name, [d[1] for d in descs])
        elif d0 is not None and not isinstance(d0[0], tuple) and d0[0] == "size":
            n.meta["sym"] = tuple(_fit(n.name, [d[1][i] for d in descs])
                                  for i in range(len(d0[1])))


def trace(stage: Stage) -> Stage:
    tracer = _Tracer()
    graph = tracer.trace(stage.model)
    gm = fx.GraphModule(stage.model, graph)
    infer_shapes(gm)
    return Stage(gm, stage.mesh, stage.model, stage.config, "trace", dict(stage.facts))
