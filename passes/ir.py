"""What flows between passes: a `Stage` (an fx graph plus the facts the passes add) and the
helpers every pass shares: a node's tensor inputs, its module path, a printable dump.

What it is not: a pass. Every pass in this folder is `fn(stage) -> new stage` with a fresh
graph (`Stage.copy`), so a dump after each pass shows exactly what that pass changed.

Per-node facts live in `node.meta` under these keys:
  scope      module path the node was traced in ("layers.3.self_attn"), "" for the top
  region     (path, group) of the outermost annotated module around the node, or None
  boundary   for identity marker nodes at an annotated module's edge: a `Boundary`
  val        FakeValue: "tensor" facts (shape as sympy exprs over T and S, dtype) or None
  placement  Placement of a tensor value (tuple for tuple values), None for non-tensors
  wants      placements the node requires of its tensor inputs (aligned with tensor_args)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from tscompile.annotations import Mesh, Placement

T, S = sympy.symbols("T S", integer=True, positive=True)   # tokens in the step; logit rows


@dataclass(frozen=True, slots=True)
class TensorVal:
    shape: tuple[sympy.Expr, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True, slots=True)
class Boundary:
    """An identity node at the edge of an annotated module: `side` "in" (argument `index`)
    or "out" (output `index`), constrained to `placement` (None: unconstrained)."""
    path: str
    side: str
    index: int
    placement: Placement | None
    group: str


def boundary(x: Any, tag: str) -> Any:
    """The marker's runtime behaviour: identity (it is removed before codegen)."""
    return x


@dataclass
class Stage:
    gm: fx.GraphModule
    mesh: Mesh
    model: torch.nn.Module            # the single-device model, on the meta device
    config: Any
    name: str = "input"               # the pass that produced this stage
    facts: dict[str, Any] = field(default_factory=dict)   # plan, regions, collectives, ...

    def copy(self, name: str) -> Stage:
        """A new stage whose graph is a copy (node meta copied shallowly)."""
        graph = fx.Graph()
        out = graph.graph_copy(self.gm.graph, {})
        graph.output(out)
        gm = fx.GraphModule(self.gm, graph)
        return Stage(gm, self.mesh, self.model, self.config, name, dict(self.facts))


def is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), (TensorVal, tuple))


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's inputs that are tensor values, flattened in argument order (duplicates
    kept: `add(x, x)` has two)."""
    out: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            if is_tensor(a):
                out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(node.args)
    visit(node.kwargs)
    return out


def target_name(node: fx.Node) -> str:
    """A stable, printable name for what a node runs: "tscompile::rms_norm", "linear",
    "add", "method:view", "getattr", "placeholder"."""
    if node.op == "call_method":
        return f"method:{node.target}"
    if node.op != "call_function":
        return node.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name
    if t is boundary:
        return "boundary"
    if t in (operator.getitem, getattr):
        return t.__name__
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("_operator") or mod == "operator":
        return name
    return name


def fmt_val(v: Any) -> str:
    if isinstance(v, TensorVal):
        return "[" + ", ".join(str(d) for d in v.shape) + f"] {str(v.dtype).replace('torch.', '')}"
    if isinstance(v, tuple):
        return "(" + ", ".join(fmt_val(x) for x in v) + ")"
    return ""


def fmt_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(fmt_arg(b) for b in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, torch.dtype):
        return str(a)
    return repr(a)


def dump(stage: Stage) -> str:
    """The graph as one line per node with its placement beside it (TSCOMPILE_DUMP)."""
    lines = [f"# stage {stage.name}; mesh {stage.mesh.describe()}",
             "# name = op(args)  # placement  shape  [module]"]
    for n in stage.gm.graph.nodes:
        args = [fmt_arg(a) for a in n.args] + [f"{k}={fmt_arg(v)}" for k, v in n.kwargs.items()]
        if n.op == "get_attr":
            rhs = f"param {n.target}"
        elif n.op == "placeholder":
            rhs = "input"
        elif n.op == "output":
            rhs = f"return {fmt_arg(n.args[0])}"
        else:
            rhs = f"{target_name(n)}({', '.join(args)})"
        p = n.meta.get("placement")
        place = "" if p is None else (str(p) if not isinstance(p, tuple) else
                                      "(" + ", ".join(map(str, p)) + ")")
        b = n.meta.get("boundary")
        tag = f" <{b.side} {b.path} {b.placement}>" if b else ""
        lines.append(f"{n.name} = {rhs}  # {place:8} {fmt_val(n.meta.get('val'))}"
                     f"  [{n.meta.get('scope', '')}]{tag}")
    return "\n".join(lines) + "\n"
