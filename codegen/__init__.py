"""Code generation: the final per-rank fx graph -> one readable SPMD `program.py`.

What it is: a line per node (kernel ops as `ops.<name>(...)` calls, collectives included;
`ops` is `torch.ops.tscompile` unless the runtime passes the direct functions), each
intermediate deleted after its last use, parameters read by name from one dict, a comment with the value's placement and
per-rank shape, a banner per layer; the file skeleton is a jinja2 template
(`templates/program.py.j2`). What it is not: an optimiser; CUDA-graph capture of the whole
forward happens in the runtime, on this same code.
"""
from __future__ import annotations

import builtins
import importlib
import operator
import re
from pathlib import Path
from typing import Any

import jinja2
import torch
from torch import fx

from tscompile.passes.ir import Stage, fmt_val

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
    keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False)
_INFIX = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
          operator.floordiv: "//"}
_LAYER = re.compile(r"^((?:[^.]+\.)*?\d+)(\.|$)")      # layers.3, transformer.h.3


def _target(fn: Any) -> str:
    """A dotted name that resolves back to `fn` in the generated module."""
    if isinstance(fn, torch._ops.OpOverload):
        ns, _, name = fn._schema.name.partition("::")
        if ns == "tscompile":            # through the program's `ops` (see the template)
            return f"ops.{name}"
        return f"torch.ops.{ns}.{name}.{fn._overloadname}"
    mod = getattr(fn, "__module__", None) or "builtins"
    mod = {"_operator": "operator"}.get(mod, mod)
    for name in dict.fromkeys((getattr(fn, "__name__", None), getattr(fn, "__qualname__", None))):
        if not name:
            continue
        if mod == "builtins" and getattr(builtins, name, None) is fn:
            return name
        obj = importlib.import_module(mod) if mod.startswith(("torch", "operator")) else None
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is fn:
            return f"{mod}.{name}"
    raise ValueError(f"codegen: cannot name {fn!r} (module {mod}) in generated code")


class _Names:
    def __init__(self) -> None:
        self.params: list[str] = []

    def arg(self, a: Any) -> str:
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                if a.target not in self.params:
                    self.params.append(a.target)
                return f't["{a.target}"]'
            return a.name
        if isinstance(a, list):
            return "[" + ", ".join(self.arg(b) for b in a) + "]"
        if isinstance(a, tuple):
            inner = ", ".join(self.arg(b) for b in a)
            return f"({inner},)" if len(a) == 1 else f"({inner})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {self.arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            return f"slice({self.arg(a.start)}, {self.arg(a.stop)}, {self.arg(a.step)})"
        if isinstance(a, torch.dtype):
            return str(a)
        if isinstance(a, float) and a != a:
            return 'float("nan")'
        return repr(a)


def _comment(n: fx.Node) -> str:
    p = n.meta.get("placement")
    if p is None:
        return ""
    place = "(" + ", ".join(map(str, p)) + ")" if isinstance(p, tuple) else str(p)
    return f"  # {place} {fmt_val(n.meta.get('val'))}"


def body_lines(stage: Stage) -> tuple[list[str], list[str], list[str]]:
    """(forward body lines, input names, tensors read)."""
    names = _Names()
    lines: list[str] = []
    inputs: list[str] = []
    layer = None
    # Free each intermediate after its last use (as torch.fx's own codegen does): a
    # 36-layer prefill otherwise keeps every layer's activations alive until it returns.
    nodes = list(stage.gm.graph.nodes)
    last_use: dict[fx.Node, fx.Node] = {}
    for n in reversed(nodes):
        for a in n.all_input_nodes:
            last_use.setdefault(a, n)
    dead_after: dict[fx.Node, list[str]] = {}
    for n in nodes:
        if n.op in ("call_function", "call_method"):
            dead_after.setdefault(last_use.get(n, n), []).append(n.name)
    for n in nodes:
        if n.op == "placeholder":
            if n.target != "rank":
                inputs.append(n.name)
            continue
        if n.op == "get_attr":
            continue
        if n.op == "output":
            lines.append(f"return {names.arg(n.args[0])}")
            continue
        m = _LAYER.match(n.meta.get("scope", ""))
        here = m.group(1) if m else None
        if here != layer and here is not None:
            lines.append(f"# ---- {here} " + "-" * max(0, 60 - len(here)))
        layer = here
        args = [names.arg(a) for a in n.args]
        kwargs = [f"{k}={names.arg(v)}" for k, v in n.kwargs.items()]
        if n.op == "call_method":
            rhs = f"{args[0]}.{n.target}({', '.join(args[1:] + kwargs)})"
        elif n.target is operator.getitem:
            rhs = f"{args[0]}[{args[1]}]"
        elif n.target is getattr:
            rhs = f"{args[0]}.{n.args[1]}"
        elif n.target in _INFIX and not kwargs:
            rhs = f"{args[0]} {_INFIX[n.target]} {args[1]}"
        else:
            rhs = f"{_target(n.target)}({', '.join(args + kwargs)})"
        if n.meta.get("collective"):
            c = n.meta["collective"]
            lines.append(f"# {c['kind']}: {c['from']} -> {c['to']}")
        lines.append(f"{n.name} = {rhs}{_comment(n)}")
        if dead_after.get(n):
            lines.append(f"del {', '.join(dead_after[n])}")
    return lines, inputs, names.params


def render_program(stage: Stage, *, title: str, model: str, format_version: int) -> str:
    lines, inputs, tensors = body_lines(stage)
    kinds: dict[str, int] = {}
    for c in stage.facts.get("schedule", []):
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "none"
    return _TEMPLATES.get_template("program.py.j2").render(
        title=title, model=model, mesh=stage.mesh.describe(), world_size=stage.mesh.world_size,
        format_version=format_version, collective_summary=summary, inputs=inputs,
        body=lines, tensors=tensors)


def _json_arg(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"tensor": a.target} if a.op == "get_attr" else {"node": a.name}
    if isinstance(a, (list, tuple)):
        return {"list": [_json_arg(b) for b in a]}
    if isinstance(a, slice):
        return {"slice": [_json_arg(a.start), _json_arg(a.stop), _json_arg(a.step)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, (int, float, str, bool)) or a is None:
        return a
    return {"repr": repr(a)}


def _json_val(v: Any) -> Any:
    from tscompile.passes.ir import TensorVal
    if isinstance(v, TensorVal):
        return {"shape": [str(d) if not d.is_number else int(d) for d in v.shape],
                "dtype": str(v.dtype).replace("torch.", "")}
    if isinstance(v, tuple):
        return [_json_val(x) for x in v]
    return None


def graph_json(stage: Stage) -> dict[str, Any]:
    """The per-rank graph as data (the ONNX exporter's input): inputs, tensors read, nodes
    in program order with per-rank shapes and placements. Op names as `target_name`."""
    from tscompile.passes.ir import target_name
    inputs, tensors, nodes, output = [], {}, [], None
    for n in stage.gm.graph.nodes:
        if n.op == "placeholder":
            inputs.append({"name": n.name, "value": _json_val(n.meta.get("val"))})
        elif n.op == "get_attr":
            tensors[n.target] = _json_val(n.meta.get("val"))
        elif n.op == "output":
            output = _json_arg(n.args[0])
        else:
            p = n.meta.get("placement")
            nodes.append({"name": n.name, "op": target_name(n),
                          "args": [_json_arg(a) for a in n.args],
                          "kwargs": {k: _json_arg(v) for k, v in n.kwargs.items()},
                          "value": _json_val(n.meta.get("val")),
                          "placement": None if p is None else (
                              [str(x) for x in p] if isinstance(p, tuple) else str(p)),
                          "scope": n.meta.get("scope", ""),
                          "collective": n.meta.get("collective")})
    return {"world_size": stage.mesh.world_size, "inputs": inputs, "tensors": tensors,
            "nodes": nodes, "output": output}
