"""Custom-domain nodes: tscompile kernels and collectives (domain "tscompile", op_type the
name after "::") and fallbacks for any op without a standard mapping (domain
"tscompile.torch", counted by the exporter).

The mapping: tensor args (and dynamic ints such as num_decodes) become inputs, in the op's
schema order when torch knows the schema (a missing optional tensor is ""); every other arg is
an attribute named after the schema argument (`argN` without a schema). Outputs are typed from
the per-rank values. Collective nodes carry graph.json's `collective` info as `collective_*`
attributes; ops that write an argument list it in `mutates`.

What it is not: a runnable mapping. No ONNX runtime implements these nodes; they are there
for a viewer to show what runs where.
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from tscompile.onnx.values import DType, Unsupported, Val

if TYPE_CHECKING:
    from tscompile.onnx.exporter import Exporter


def schema(op: str):
    """The torch schema of a `tscompile::` op (argument names, types, mutation), or None."""
    ns, _, name = op.partition("::")
    try:
        import torch
        import tscompile.kernels  # noqa: F401  (registers torch.ops.tscompile.*)
        return getattr(getattr(torch.ops, ns), name).default._schema
    except Exception:
        return None


def sanitize(op: str) -> str:
    """An op name as an ONNX op_type / graph name: "method:view" -> "method_view"."""
    return re.sub(r"\W", "_", op.replace("::", "_").replace(":", "_")) or "op"


def set_attr(attrs: dict[str, Any], key: str, value: Any) -> None:
    """attrs[key] = `value` as an ONNX attribute (int, float, str or lists of them; anything
    else as JSON); None (and valueless dynamic Vals) are left out."""
    if value is None:
        return
    if isinstance(value, DType):
        value = value.name
    if isinstance(value, Val):
        value = value.const if value.kind in ("int", "float", "const") else value.dims
        if value is None:
            return
    if isinstance(value, slice):
        value = [value.start, value.stop, value.step]
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, float, str)):
        attrs[key] = value
        return
    if isinstance(value, (list, tuple)):
        flat = [v.name if isinstance(v, DType) else v for v in value]
        if flat and all(isinstance(v, bool) or isinstance(v, int) for v in flat):
            attrs[key] = [int(v) for v in flat]
            return
        if flat and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                        for v in flat):
            attrs[key] = [float(v) for v in flat]
            return
        if flat and all(isinstance(v, str) for v in flat):
            attrs[key] = flat
            return
    attrs[key] = json.dumps(value, default=repr)


def _labelled_args(n: dict[str, Any], sargs: list[Any]) -> tuple[list[str], list[Any]]:
    """The node's args and kwargs as (labels, raw graph.json args), in schema order when the
    schema is known so inputs are positional in the op's terms."""
    by_name = {a.name: i for i, a in enumerate(sargs)}
    raw = list(n.get("args", []))
    names = [sargs[i].name if i < len(sargs) else f"arg{i}" for i in range(len(raw))]
    for k, v in (n.get("kwargs") or {}).items():
        raw.append(v)
        names.append(k)
    if sargs:
        order = sorted(range(len(raw)), key=lambda j: by_name.get(names[j], len(sargs) + j))
        raw, names = [raw[j] for j in order], [names[j] for j in order]
    return names, raw


def custom_node(ex: Exporter, domain: str, op_type: str, *, fallback: bool = False) -> Val:
    """Export `ex.cur` as one node in `domain`; returns its Val (a tuple for several outputs,
    an opaque int scalar for a non-tensor result)."""
    n = ex.cur
    sch = None if fallback else schema(n["op"])
    sargs = list(sch.arguments) if sch is not None else []
    names, raw = _labelled_args(n, sargs)
    tensor_typed = {a.name for a in sargs if "Tensor" in str(a.type)}
    inputs, input_names, attrs = [], [], {}

    def add_input(name: str, label: str) -> None:
        inputs.append(name)
        input_names.append(label)

    for label, a in zip(names, raw):
        try:
            v = ex.arg(a)
        except Unsupported:
            set_attr(attrs, label, json.dumps(a))
            continue
        if isinstance(v, Val) and (v.kind == "tensor" or not v.static or v.kind == "object"):
            if v.kind == "tuple":
                for i, item in enumerate(v.items or []):
                    if isinstance(item, Val) and not item.static:
                        add_input(item.name, f"{label}[{i}]")
                continue
            add_input(ex.name_of(v), label)
        elif isinstance(v, list) and any(isinstance(x, Val) and not x.static for x in v):
            for i, x in enumerate(v):  # a tensor list (cat's inputs): variadic inputs
                if isinstance(x, Val) and not x.static:
                    add_input(ex.name_of(x), f"{label}[{i}]")
                else:
                    set_attr(attrs, f"{label}_{i}", x)
        elif v is None and label in tensor_typed:
            add_input("", label)             # an absent optional tensor
        else:
            set_attr(attrs, label, v)
    while inputs and inputs[-1] == "":
        inputs.pop()
        input_names.pop()
    if sch is not None:
        written = [a.name for a in sargs if a.alias_info is not None and a.alias_info.is_write]
        if written:
            attrs["mutates"] = written
    coll = n.get("collective")
    if isinstance(coll, dict):
        for k, v in coll.items():
            set_attr(attrs, f"collective_{k}", v)
        attrs.setdefault("collective_world_size", ex.world)

    value = n.get("value")
    multi = isinstance(value, list)
    if multi:
        outputs = ex.multi_outputs(len(value))
    else:
        outputs = [n["name"]]
        ex.names.add(n["name"])
    doc = "inputs: " + ", ".join(input_names) if input_names else ""
    if fallback:
        doc += ("\n" if doc else "") + "no ONNX mapping: exported as a custom node"
    # make_node directly, not ex.emit: attrs are named by the op's schema and may be anything.
    ex.nodes.append(ex.helper.make_node(op_type, inputs, outputs,
                                        name=ex.fresh(n["name"], ex.node_names),
                                        domain=domain, doc_string=ex.doc(doc), **attrs))
    if multi:
        return ex.tuple_result(outputs, other="int")
    return ex.value_of(outputs[0], value, other="int")   # non-tensor: an opaque scalar
