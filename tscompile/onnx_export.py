"""`tscompile export --onnx`: a compiled program's per-rank graph as an ONNX model, for viewers
such as Netron.

What it is: a translation of a `.tsprog`'s `graph.json` (codegen's `graph_json`: the graph one
rank runs, with per-rank shapes and placements) into an ONNX ModelProto (opset 18). What it is
not: a runnable ONNX export. Weights are never inside; kernels and collectives are custom-domain
nodes no ONNX runtime implements.

The model:
  graph inputs   input_ids, positions, every `meta.<field>` the program reads (its own input,
                 e.g. `meta.slot_mapping`; `meta.num_decodes` an int64 scalar), `rank` when read
                 (int64 scalar), then every parameter, buffer and KV cache by its model name
                 with its per-rank shape and dtype (inputs, never initializers). Symbolic dims
                 ("T", "S", "2*T") are `dim_param`s.
  standard ops   become standard ONNX ops (opset 18), see `_STANDARD`:
                   linear -> Transpose(weight) + MatMul (+ Add bias); embedding -> Gather;
                   add/sub/mul/truediv -> Add/Sub/Mul/Div; view/reshape -> Reshape (target
                   shape from the per-rank output shape, one symbolic dim as -1, else built
                   with Shape/Gather/Concat); getitem -> the right output of a multi-output
                   node, Gather (tensor index), Slice/Squeeze/Unsqueeze (basic indexing);
                   split/chunk -> Split; transpose/permute/t -> Transpose; float/half/to/... ->
                   Cast; cat -> Concat; softmax -> Softmax; silu -> Sigmoid + Mul; ...
                 Bookkeeping on non-tensors (x.shape, shape[i], python int arithmetic on `rank`)
                 becomes Shape/Gather/Mul/... on int64 scalars, or folds to constants when the
                 value is static; such nodes nothing reads are dropped.
  tscompile::*   kernels and collectives are nodes in domain "tscompile" (op_type the name after
                 "::"): tensor args (and dynamic ints such as num_decodes) are inputs (a missing
                 optional tensor is ""), other args attributes named after the op's schema;
                 outputs typed from the per-rank values. Collective nodes carry their
                 `collective` info as `collective_*` attributes and mutated args as `mutates`.
  fallbacks      any other op becomes a node in domain "tscompile.torch" named after the op
                 (counted in `OnnxExport.fallbacks`, stored in the model's metadata and warned
                 about on stderr); the standard ops above never fall back on the graphs the
                 compiler emits.
  doc_string     every node: op, placement (e.g. "S(1)") and module scope; graph inputs for
                 tensors: kind, global shape, placement and the slice of it this rank holds.

`export_onnx(prog, out_path, rank=0) -> Path` writes the file (checked with
`onnx.checker.check_model`); `to_onnx(prog, rank=0) -> OnnxExport` returns the model and the
fallback counts without writing.
"""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tscompile.tsprog import Tsprog, read_tsprog

__all__ = ["OnnxExport", "export_onnx", "to_onnx"]

OPSET = 18
DOMAIN = "tscompile"                 # kernels and collectives (torch.ops.tscompile.*)
FALLBACK_DOMAIN = "tscompile.torch"  # anything without an ONNX mapping
COLLECTIVES = frozenset({"all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                         "all_reduce_add_rms_norm"})
_INT64_MAX = 2 ** 63 - 1
# AttentionMetadata's batch dims (kernels/paged.py): the tracer runs them at fixed sample
# sizes, so graph.json holds numbers where the program takes any batch.
_META_SHAPES = {"query_start_loc": ["B+1"], "seq_lens": ["B"], "block_tables": ["B", "MB"]}


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("tscompile export --onnx needs the `onnx` package: "
                          "pip install onnx (or the `test` extra)") from e
    return onnx


def _dtype_map() -> dict[str, int]:
    T = _onnx().TensorProto
    m = {"float32": T.FLOAT, "float": T.FLOAT, "float16": T.FLOAT16, "half": T.FLOAT16,
         "bfloat16": T.BFLOAT16, "float64": T.DOUBLE, "double": T.DOUBLE,
         "int64": T.INT64, "long": T.INT64, "int32": T.INT32, "int": T.INT32,
         "int16": T.INT16, "int8": T.INT8, "uint8": T.UINT8, "uint16": T.UINT16,
         "uint32": T.UINT32, "uint64": T.UINT64, "bool": T.BOOL,
         "complex64": T.COMPLEX64, "complex128": T.COMPLEX128}
    for name, attr in (("float8_e4m3fn", "FLOAT8E4M3FN"), ("float8_e4m3fnuz", "FLOAT8E4M3FNUZ"),
                       ("float8_e5m2", "FLOAT8E5M2"), ("float8_e5m2fnuz", "FLOAT8E5M2FNUZ")):
        if hasattr(T, attr):
            m[name] = getattr(T, attr)
    return m


_FLOAT8 = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
_METHOD_CASTS = {"float": "float32", "half": "float16", "bfloat16": "bfloat16",
                 "double": "float64", "int": "int32", "long": "int64", "bool": "bool",
                 "short": "int16", "char": "int8", "byte": "uint8"}


class _Unsupported(Exception):
    """A node (or one of its argument forms) this exporter has no standard mapping for."""


@dataclass
class _Val:
    """What an fx node (or graph input) evaluates to, on the ONNX side.

    kind: "tensor" (an ONNX value `name` with dtype/shape), "int"/"float" (a python scalar:
    `const` when static, else an int64 scalar ONNX value `name`), "shape" (a 1-D int64 ONNX
    value with `dims` the symbolic dims), "tuple" (`items`), "object" (a placeholder such as
    `meta` whose fields are read with getattr), "const" (any other python constant in `const`).
    """
    kind: str
    name: str | None = None
    dtype: str | None = None
    shape: list[Any] | None = None
    const: Any = None
    dims: list[Any] | None = None
    items: list[Any] | None = None

    @property
    def static(self) -> bool:
        return self.name is None


@dataclass(frozen=True)
class _DType:
    name: str


@dataclass
class OnnxExport:
    """The exported model and what it could not map."""
    model: Any                                   # onnx.ModelProto
    fallbacks: Counter = field(default_factory=Counter)   # op -> nodes exported as fallbacks
    rank: int = 0

    @property
    def num_fallbacks(self) -> int:
        return sum(self.fallbacks.values())


def _load(prog: Tsprog | str | Path) -> Tsprog:
    return prog if isinstance(prog, Tsprog) else read_tsprog(prog)


def _schema(op: str):
    """The torch schema of a `tscompile::` op (argument names, types, mutation), or None."""
    ns, _, name = op.partition("::")
    try:
        import torch
        import tscompile.kernels  # noqa: F401  (registers torch.ops.tscompile.*)
        return getattr(getattr(torch.ops, ns), name).default._schema
    except Exception:
        return None


def _placement_text(p: Any) -> str:
    if p is None:
        return "-"
    if isinstance(p, list):
        return "(" + ", ".join(str(x) for x in p) + ")"
    return str(p)


def _sanitize(op: str) -> str:
    return re.sub(r"\W", "_", op.replace("::", "_").replace(":", "_")) or "op"


class _Exporter:
    def __init__(self, prog: Tsprog, rank: int):
        onnx = _onnx()
        self.onnx, self.helper = onnx, onnx.helper
        self.prog, self.rank = prog, rank
        if "graph.json" not in prog.files:
            raise ValueError(f"{prog.path}: no graph.json in this .tsprog (built by an older "
                             f"tscompile?); rebuild it with `tscompile build`")
        self.g = json.loads(prog.files["graph.json"])
        self.world = int(self.g.get("world_size", prog.world_size))
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside the program's world of {self.world} ranks")
        self.dtypes = _dtype_map()
        self.nodes: list[Any] = []
        self.prunable: set[int] = set()          # ids of bookkeeping nodes (dropped if unread)
        self.value_info: dict[str, Any] = {}
        self.inputs: dict[str, Any] = {}         # placeholder / meta / rank inputs, in order
        self.tensor_inputs: dict[str, Any] = {}  # parameters, buffers, KV caches
        self.env: dict[str, _Val] = {}
        self.names: set[str] = set()             # ONNX value names taken
        self.node_names: set[str] = set()        # ONNX node names taken
        self.fallbacks: Counter = Counter()
        self.uses_float8 = False
        self.transposed: dict[str, str] = {}    # weight value -> its Transpose output
        self.out_names: dict[tuple[str, int], str] = {}
        self.cur: dict[str, Any] = {}            # the fx node being exported
        self._plans = prog.manifest.get("tensors", {}) or {}

    # ---------------------------------------------------------------- types and values
    def _elem(self, dtype: str | None) -> int:
        if dtype is None:
            return self.onnx.TensorProto.UNDEFINED
        if dtype in _FLOAT8:
            self.uses_float8 = True
        if dtype not in self.dtypes:
            raise _Unsupported(f"dtype {dtype}")
        return self.dtypes[dtype]

    def _vi(self, name: str, dtype: str | None, shape: list[Any] | None):
        dims = None if shape is None else [d if isinstance(d, int) else str(d) for d in shape]
        try:
            elem = self._elem(dtype)
        except _Unsupported:
            elem = self.onnx.TensorProto.UNDEFINED
        return self.helper.make_tensor_value_info(name, elem, dims)

    def _fresh(self, base: str, taken: set[str] | None = None) -> str:
        taken = self.names if taken is None else taken
        name, i = base, 1
        while name in taken:
            name = f"{base}#{i}"          # fx names never hold '#': no clash with a later node
            i += 1
        taken.add(name)
        return name

    def _doc(self, extra: str = "") -> str:
        n = self.cur
        text = (f"op: {n.get('op')}\nplacement: {_placement_text(n.get('placement'))}\n"
                f"scope: {n.get('scope') or '-'}")
        return text + (f"\n{extra}" if extra else "")

    def _emit(self, op_type: str, inputs: list[str], n_out: int = 1, *, outputs: list[str] |
              None = None, domain: str = "", suffix: str = "", prunable: bool = False,
              doc: str = "", **attrs) -> list[str]:
        base = self.cur.get("name", "graph")
        node_name = self._fresh(base if not suffix else f"{base}/{suffix}", self.node_names)
        if outputs is None:
            outputs = [self._fresh(node_name)] if n_out == 1 else [
                self._fresh(f"{node_name}:{i}") for i in range(n_out)]
        node = self.helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain,
                                     doc_string=self._doc(doc), **attrs)
        self.nodes.append(node)
        if prunable:
            self.prunable.add(id(node))
        return outputs

    def _typed(self, name: str, dtype: str | None, shape: list[Any] | None) -> None:
        if dtype is not None:
            self.value_info[name] = self._vi(name, dtype, shape)

    def _const(self, value: Any, dtype: str = "int64", suffix: str = "const") -> str:
        import numpy as np
        np_dtype = {"int64": np.int64, "int32": np.int32, "float32": np.float32,
                    "float16": np.float16, "float64": np.float64, "bool": np.bool_}.get(dtype)
        if np_dtype is None:  # e.g. bfloat16 scalars: make a float32 constant and cast it
            c = self._const(value, "float32", suffix)
            out = self._emit("Cast", [c], suffix=f"{suffix}_cast", prunable=True,
                             to=self._elem(dtype))[0]
            return out
        arr = np.array(value, dtype=np_dtype)
        out = self._emit("Constant", [], suffix=suffix, prunable=True,
                         value=self.onnx.numpy_helper.from_array(arr))[0]
        self._typed(out, dtype, list(arr.shape))
        return out

    def _tensor_input(self, name: str) -> _Val:
        spec = self.g.get("tensors", {}).get(name) or {}
        if name not in self.tensor_inputs:
            self.names.add(name)
            vi = self._vi(name, spec.get("dtype"), self._kv_dims(name, spec.get("shape")))
            vi.doc_string = self._tensor_doc(name)
            self.tensor_inputs[name] = vi
        return _Val("tensor", name, spec.get("dtype"), spec.get("shape"))

    def _kv_dims(self, name: str, shape: list[Any] | None) -> list[Any] | None:
        """A KV cache's per-rank shape with the manifest's symbolic dims ("num_blocks",
        "page_size") in place of the sample sizes it was traced with."""
        for layer in (self.prog.manifest.get("kv_cache", {}) or {}).get("layers", []):
            want = layer.get("shape")
            if layer.get("name") == name and shape is not None and want is not None \
                    and len(want) == len(shape):
                return [w if isinstance(w, str) else d for w, d in zip(want, shape)]
        return shape

    def _tensor_doc(self, name: str) -> str:
        plan = self._plans.get(name)
        if not plan:
            return "tensor (no plan in the manifest)"
        text = (f"{plan.get('kind', 'tensor')} {plan.get('placement', 'R')}, global shape "
                f"{plan.get('shape')} {plan.get('dtype', '')}")
        dim = plan.get("dim")
        if dim is not None:
            try:
                from tscompile.plan import ParamPlan
                ranges = ParamPlan.from_json(name, plan).ranges(self.rank, self.world)
                text += f"; rank {self.rank} holds dim {dim} " + ", ".join(
                    f"[{a}:{b}]" for a, b in ranges)
            except Exception:
                pass
        keys = [p[0] for p in plan.get("pieces", [])]
        if keys:
            text += "; checkpoint " + ", ".join(keys[:4]) + (
                f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        return text

    def _scalar_input(self, name: str, dtype: str = "int64", shape: list[Any] | None = None,
                      doc: str = "") -> _Val:
        if name not in self.inputs:
            self.names.add(name)
            vi = self._vi(name, dtype, [] if shape is None else shape)
            vi.doc_string = doc
            self.inputs[name] = vi
        kind = "tensor" if shape else "int"
        return _Val(kind, name, dtype, [] if shape is None else shape)

    # ---------------------------------------------------------------- arguments
    def arg(self, a: Any) -> Any:
        if isinstance(a, dict):
            if "node" in a:
                v = self.env.get(a["node"])
                if v is None:
                    raise _Unsupported(f"reference to unknown node {a['node']}")
                return v
            if "tensor" in a:
                return self._tensor_input(a["tensor"])
            if "list" in a:
                return [self.arg(b) for b in a["list"]]
            if "slice" in a:
                return slice(*(self.arg(b) for b in a["slice"]))
            if "ellipsis" in a:
                return Ellipsis
            if "dtype" in a:
                return _DType(a["dtype"])
            if "repr" in a:
                return _Val("const", const=a["repr"])
            raise _Unsupported(f"argument {a}")
        return a

    def name_of(self, v: Any, dtype: str = "int64") -> str:
        """An ONNX value for `v` (a graph value, or a python scalar made a Constant)."""
        if isinstance(v, _Val):
            if v.kind == "object":   # a non-tensor placeholder read as a value (`rank`)
                doc = "this rank's index in the group" if v.name == "rank" else v.name
                return self._scalar_input(v.name, doc=f"{doc} (a python int)").name
            if v.kind == "tuple":
                raise _Unsupported("a tuple used as one tensor")
            if v.name is not None:
                return v.name
            if v.kind in ("int", "float"):
                return self._const(v.const, dtype if v.kind == "int" or dtype != "int64"
                                   else "float32")
            if v.kind == "shape":
                return self._const([int(d) for d in v.dims])
            raise _Unsupported(f"constant {v.const!r} as a tensor")
        if isinstance(v, bool):
            return self._const(v, "bool")
        if isinstance(v, (int, float)):
            return self._const(v, dtype)
        if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            return self._const(v, dtype)
        raise _Unsupported(f"{v!r} as a tensor")

    def tensor(self, v: Any) -> _Val:
        if isinstance(v, _Val) and v.kind == "tensor":
            return v
        raise _Unsupported(f"expected a tensor, got {v!r}")

    @staticmethod
    def py(v: Any) -> Any:
        """The python value of a static argument (raises for dynamic ones)."""
        if isinstance(v, _Val):
            if v.static and v.kind in ("int", "float", "const"):
                return v.const
            raise _Unsupported("a dynamic value where a constant is needed")
        if isinstance(v, list):
            return [_Exporter.py(x) for x in v]
        return v

    def out_value(self) -> Any:
        return self.cur.get("value")

    def out_tensor(self, name: str) -> _Val:
        v = self.out_value()
        if isinstance(v, dict):
            self._typed(name, v.get("dtype"), v.get("shape"))
            return _Val("tensor", name, v.get("dtype"), v.get("shape"))
        return _Val("tensor", name)

    def args_kwargs(self) -> tuple[list[Any], dict[str, Any]]:
        n = self.cur
        return ([self.arg(a) for a in n.get("args", [])],
                {k: self.arg(v) for k, v in (n.get("kwargs") or {}).items()})

    @staticmethod
    def pick(args: list[Any], kwargs: dict[str, Any], i: int, key: str, default: Any = None):
        if len(args) > i:
            return args[i]
        return kwargs.get(key, default)

    # ---------------------------------------------------------------- the walk
    def run(self) -> OnnxExport:
        for p in self.g.get("inputs", []):
            name, value = p["name"], p.get("value")
            if isinstance(value, dict):
                self.names.add(name)
                self.inputs[name] = self._vi(name, value.get("dtype"), value.get("shape"))
                self.env[name] = _Val("tensor", name, value.get("dtype"), value.get("shape"))
            else:  # `meta` (fields read by getattr) or `rank` (an int): declared on first use
                self.env[name] = _Val("object", name)
        for n in self.g.get("nodes", []):
            self._name_outputs(n)
        for n in self.g.get("nodes", []):
            self.cur = n
            self.env[n["name"]] = self._node(n)
        self.cur = {"name": "output", "op": "output"}
        outputs = self._outputs(self.g.get("output"))
        self._prune(outputs)
        return self._model(outputs)

    def _name_outputs(self, n: dict[str, Any]) -> None:
        """Multi-output nodes: output i takes the name of the first getitem that reads it."""
        if n.get("op") != "getitem":
            return
        args = n.get("args", [])
        if len(args) == 2 and isinstance(args[0], dict) and "node" in args[0] \
                and isinstance(args[1], int) and not isinstance(args[1], bool):
            self.out_names.setdefault((args[0]["node"], args[1]), n["name"])

    def _node(self, n: dict[str, Any]) -> _Val:
        op = n["op"]
        if op.startswith(f"{DOMAIN}::"):
            return self._custom(n, DOMAIN, op.split("::", 1)[1])
        key = op[len("aten::"):] if op.startswith("aten::") else op
        handler = _STANDARD.get(key)
        if handler is not None:
            mark = len(self.nodes)
            try:
                return handler(self)
            except _Unsupported:
                # Drop what the handler emitted before giving up, then fall back.
                for dropped in self.nodes[mark:]:
                    self.prunable.discard(id(dropped))
                    self.names.difference_update(dropped.output)
                    self.node_names.discard(dropped.name)
                del self.nodes[mark:]
                self.transposed = {w: t for w, t in self.transposed.items() if t in self.names}
        self.fallbacks[op] += 1
        return self._custom(n, FALLBACK_DOMAIN, _sanitize(op), fallback=True)

    # ---------------------------------------------------------------- custom-domain nodes
    def _attr(self, attrs: dict[str, Any], key: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, _DType):
            value = value.name
        if isinstance(value, _Val):
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
            flat = [v.name if isinstance(v, _DType) else v for v in value]
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

    def _custom(self, n: dict[str, Any], domain: str, op_type: str, *,
                fallback: bool = False) -> _Val:
        schema = None if fallback else _schema(n["op"])
        sargs = list(schema.arguments) if schema is not None else []
        by_name = {a.name: i for i, a in enumerate(sargs)}
        raw = list(n.get("args", []))
        names = [sargs[i].name if i < len(sargs) else f"arg{i}" for i in range(len(raw))]
        for k, v in (n.get("kwargs") or {}).items():
            raw.append(v)
            names.append(k)
        if schema is not None:  # schema order, so inputs are positional in the op's terms
            order = sorted(range(len(raw)), key=lambda j: by_name.get(names[j], len(sargs) + j))
            raw, names = [raw[j] for j in order], [names[j] for j in order]
        tensor_typed = {a.name for a in sargs if "Tensor" in str(a.type)}
        inputs, input_names, attrs = [], [], {}

        def add_input(name: str, label: str) -> None:
            inputs.append(name)
            input_names.append(label)

        for label, a in zip(names, raw):
            try:
                v = self.arg(a)
            except _Unsupported:
                self._attr(attrs, label, json.dumps(a))
                continue
            if isinstance(v, _Val) and (v.kind == "tensor" or not v.static or
                                        v.kind == "object"):
                if v.kind == "tuple":
                    for i, item in enumerate(v.items or []):
                        if isinstance(item, _Val) and not item.static:
                            add_input(item.name, f"{label}[{i}]")
                    continue
                add_input(self.name_of(v), label)
            elif isinstance(v, list) and any(isinstance(x, _Val) and not x.static for x in v):
                for i, x in enumerate(v):  # a tensor list (cat's inputs): variadic inputs
                    if isinstance(x, _Val) and not x.static:
                        add_input(self.name_of(x), f"{label}[{i}]")
                    else:
                        self._attr(attrs, f"{label}_{i}", x)
            elif v is None and label in tensor_typed:
                add_input("", label)             # an absent optional tensor
            else:
                self._attr(attrs, label, v)
        while inputs and inputs[-1] == "":
            inputs.pop()
            input_names.pop()
        if schema is not None:
            written = [a.name for a in sargs if a.alias_info is not None and a.alias_info.is_write]
            if written:
                attrs["mutates"] = written
        coll = n.get("collective")
        if isinstance(coll, dict):
            for k, v in coll.items():
                self._attr(attrs, f"collective_{k}", v)
            attrs.setdefault("collective_world_size", self.world)
        value = n.get("value")
        multi = isinstance(value, list)
        count = len(value) if multi else 1
        outputs = [self.out_names.get((n["name"], i)) or f"{n['name']}:{i}"
                   for i in range(count)] if multi else [n["name"]]
        outputs = [self._fresh(o) if o != n["name"] else o for o in outputs]
        self.names.add(n["name"])
        doc = "inputs: " + ", ".join(input_names) if input_names else ""
        if fallback:
            doc += ("\n" if doc else "") + "no ONNX mapping: exported as a custom node"
        node = self.helper.make_node(op_type, inputs, outputs,
                                     name=self._fresh(n["name"], self.node_names),
                                     domain=domain, doc_string=self._doc(doc), **attrs)
        self.nodes.append(node)
        if multi:
            items = []
            for o, v in zip(outputs, value):
                if isinstance(v, dict):
                    self._typed(o, v.get("dtype"), v.get("shape"))
                    items.append(_Val("tensor", o, v.get("dtype"), v.get("shape")))
                else:
                    items.append(_Val("int", o))
            return _Val("tuple", items=items)
        if isinstance(value, dict):
            self._typed(outputs[0], value.get("dtype"), value.get("shape"))
            return _Val("tensor", outputs[0], value.get("dtype"), value.get("shape"))
        return _Val("int", outputs[0])   # a non-tensor result: an opaque scalar

    # ---------------------------------------------------------------- outputs and model
    def _outputs(self, out: Any) -> list[Any]:
        vals: list[_Val] = []

        def collect(a: Any) -> None:
            v = self.arg(a) if isinstance(a, dict) and "list" not in a else None
            if isinstance(a, dict) and "list" in a:
                for b in a["list"]:
                    collect(b)
            elif isinstance(v, _Val) and v.kind == "tuple":
                vals.extend(v.items or [])
            elif isinstance(v, _Val):
                vals.append(v)

        if out is not None:
            collect(out)
        result, seen = [], set()
        graph_inputs = set(self.inputs) | set(self.tensor_inputs)
        for v in vals:
            name = self.name_of(v)
            if name in graph_inputs or name in seen:
                name = self._emit("Identity", [name], suffix="output")[0]
            seen.add(name)
            info = self.value_info.pop(name, None)
            if info is None:
                info = self._vi(name, v.dtype, v.shape)
            result.append(info)
        return result

    def _prune(self, outputs: list[Any]) -> None:
        while True:
            used = {o.name for o in outputs}
            for node in self.nodes:
                used.update(node.input)
            keep = [nd for nd in self.nodes
                    if id(nd) not in self.prunable or any(o in used for o in nd.output)]
            if len(keep) == len(self.nodes):
                break
            self.nodes = keep
        produced = {o for nd in self.nodes for o in nd.output}
        self.value_info = {k: v for k, v in self.value_info.items() if k in produced}

    def _model(self, outputs: list[Any]) -> OnnxExport:
        helper = self.helper
        man = self.prog.manifest
        model_info = man.get("model", {}) or {}
        used = {i for nd in self.nodes for i in nd.input}
        inputs = [vi for name, vi in self.inputs.items()
                  if name in used or name in ("input_ids", "positions")
                  or any(o.name == name for o in outputs)]
        inputs += list(self.tensor_inputs.values())
        title = f"{model_info.get('name', 'model')} rank {self.rank}/{self.world}"
        graph = helper.make_graph(self.nodes, _sanitize(title), inputs, outputs,
                                  value_info=list(self.value_info.values()),
                                  doc_string=(man.get("mesh", {}) or {}).get("description", ""))
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1),
                  helper.make_opsetid(FALLBACK_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="tscompile",
                                  doc_string=f"{title}: the per-rank graph of {self.prog.path}"
                                             f" (weights are not inside)")
        try:
            from tscompile import __version__
            model.producer_version = __version__
        except Exception:  # pragma: no cover
            pass
        ir = helper.find_min_ir_version_for(opsets[:1], ignore_unknown=True)
        model.ir_version = max(ir, 9) if self.uses_float8 else ir
        meta = {"tscompile.model": str(model_info.get("name", "")),
                "tscompile.preset": str(model_info.get("preset", "")),
                "tscompile.mesh": json.dumps(man.get("mesh", {})),
                "tscompile.rank": str(self.rank),
                "tscompile.world_size": str(self.world),
                "tscompile.fallbacks": json.dumps(dict(sorted(self.fallbacks.items())))}
        helper.set_model_props(model, meta)
        return OnnxExport(model, Counter(self.fallbacks), self.rank)


# ---------------------------------------------------------------------------------------
# Standard ops. Each handler reads `ex.cur` (the fx node) and returns its _Val; raising
# _Unsupported makes the node a counted fallback instead.

def _binary(onnx_op: str, fold: Callable[[Any, Any], Any], *, true_div: bool = False):
    def handler(ex: _Exporter) -> _Val:
        args, kwargs = ex.args_kwargs()
        a = ex.pick(args, kwargs, 0, "input", ex.pick(args, kwargs, 0, "self"))
        b = ex.pick(args, kwargs, 1, "other")
        alpha = kwargs.get("alpha")
        if isinstance(a, _Val) and a.kind == "object" or isinstance(b, _Val) and \
                b.kind == "object":
            a = _Val("int", ex.name_of(a)) if isinstance(a, _Val) and a.kind == "object" else a
            b = _Val("int", ex.name_of(b)) if isinstance(b, _Val) and b.kind == "object" else b
        static = lambda v: not isinstance(v, _Val) or (v.static and v.kind in ("int", "float"))
        if static(a) and static(b) and alpha is None:     # python arithmetic: fold
            x, y = ex.py(a), ex.py(b)
            r = fold(x, y)
            return _Val("int" if isinstance(r, int) else "float", const=r)
        value = ex.out_value()
        if isinstance(value, dict):
            out_dtype = value.get("dtype")
        else:   # python int arithmetic on a dynamic scalar (e.g. rank * experts_per_rank)
            out_dtype = "int64" if not any(isinstance(v, float) or
                                           isinstance(v, _Val) and v.kind == "float"
                                           for v in (a, b)) else "float32"
        names = []
        for v in (a, b):
            n = ex.name_of(v, out_dtype)
            vdt = v.dtype if isinstance(v, _Val) else None
            if isinstance(v, _Val) and v.kind == "int" and vdt is None:
                vdt = "int64"
            if vdt is not None and vdt != out_dtype:
                n = ex._emit("Cast", [n], suffix="cast", to=ex._elem(out_dtype))[0]
            names.append(n)
        if alpha is not None and alpha != 1:
            names[1] = ex._emit("Mul", [names[1], ex.name_of(alpha, out_dtype)],
                                suffix="alpha")[0]
        if isinstance(value, dict):
            out = ex._emit(onnx_op, names, outputs=[ex.cur["name"]])[0]
            ex.names.add(out)
            return ex.out_tensor(out)
        out = ex._emit(onnx_op, names, outputs=[ex._fresh(ex.cur["name"])], prunable=True)[0]
        ex._typed(out, out_dtype, [])
        return _Val("int" if out_dtype == "int64" else "float", out, out_dtype, [])
    return handler


def _compare(onnx_op: str, negate: bool = False):
    """eq/ne/lt/... : both sides in the tensor side's dtype, a bool result."""
    def handler(ex: _Exporter) -> _Val:
        args, kwargs = ex.args_kwargs()
        a = ex.pick(args, kwargs, 0, "input")
        b = ex.pick(args, kwargs, 1, "other")
        like = next((v.dtype for v in (a, b) if isinstance(v, _Val) and v.kind == "tensor"),
                    None)
        if like is None:
            raise _Unsupported("comparison without a tensor")
        names = []
        for v in (a, b):
            n = ex.name_of(v, like)
            if isinstance(v, _Val) and v.kind == "tensor" and v.dtype not in (None, like):
                n = ex._emit("Cast", [n], suffix="cast", to=ex._elem(like))[0]
            names.append(n)
        if not negate:
            return _final(ex, onnx_op, names)
        eq = ex._emit(onnx_op, names, suffix="eq")[0]
        return _final(ex, "Not", [eq])
    return handler


def _topk(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    k = ex.pick(args, kwargs, 1, "k")
    dim = ex.py(ex.pick(args, kwargs, 2, "dim", -1))
    largest = ex.py(ex.pick(args, kwargs, 3, "largest", True))
    is_sorted = ex.py(ex.pick(args, kwargs, 4, "sorted", True))
    if isinstance(k, _Val) and k.kind == "int" and not k.static:
        kk = ex._emit("Unsqueeze", [k.name, ex._const([0], suffix="axes")], suffix="k")[0]
    else:
        kk = ex._const([int(ex.py(k))], suffix="k")
    outs = _multi_outputs(ex, 2)
    ex._emit("TopK", [x.name, kk], outputs=outs, axis=int(dim), largest=int(bool(largest)),
             sorted=int(bool(is_sorted)))
    return _tuple_result(ex, outs)


def _final(ex: _Exporter, op_type: str, inputs: list[str], **attrs) -> _Val:
    """Emit the node that produces the fx node's value (named after it)."""
    name = ex.cur["name"]
    ex.names.add(name)
    ex._emit(op_type, inputs, outputs=[name], **attrs)
    return ex.out_tensor(name)


def _unary(onnx_op: str):
    def handler(ex: _Exporter) -> _Val:
        args, kwargs = ex.args_kwargs()
        x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
        return _final(ex, onnx_op, [x.name])
    return handler


def _rsqrt(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    s = ex._emit("Sqrt", [x.name], suffix="sqrt")[0]
    return _final(ex, "Reciprocal", [s])


def _silu(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    s = ex._emit("Sigmoid", [x.name], suffix="sigmoid")[0]
    return _final(ex, "Mul", [x.name, s])


def _gelu(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    if kwargs.get("approximate", "none") != "none":
        raise _Unsupported("gelu approximate")
    dt = x.dtype or "float32"
    d = ex._emit("Div", [x.name, ex._const(2 ** 0.5, dt)], suffix="div")[0]
    e = ex._emit("Erf", [d], suffix="erf")[0]
    p = ex._emit("Add", [e, ex._const(1.0, dt)], suffix="add")[0]
    m = ex._emit("Mul", [x.name, p], suffix="mul")[0]
    return _final(ex, "Mul", [m, ex._const(0.5, dt)])


def _embedding(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    ids = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    w = ex.tensor(ex.pick(args, kwargs, 1, "weight"))
    if ex.cur["op"] == "aten::embedding":   # aten order: (weight, indices)
        ids, w = w, ids
    return _final(ex, "Gather", [w.name, ids.name], axis=0)


def _linear(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    w = ex.tensor(ex.pick(args, kwargs, 1, "weight"))
    b = ex.pick(args, kwargs, 2, "bias")
    if w.shape is not None and len(w.shape) != 2:
        raise _Unsupported("linear with a weight that is not 2-D")
    wt = ex.transposed.get(w.name)
    if wt is None:
        wt = ex._emit("Transpose", [w.name], outputs=[ex._fresh(f"{w.name}^T")],
                      suffix="weight_t", perm=[1, 0])[0]
        ex._typed(wt, w.dtype, None if w.shape is None else list(reversed(w.shape)))
        ex.transposed[w.name] = wt
    if b is None:
        return _final(ex, "MatMul", [x.name, wt])
    b = ex.tensor(b)
    mm = ex._emit("MatMul", [x.name, wt], suffix="matmul")[0]
    return _final(ex, "Add", [mm, b.name])


def _matmul(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    a = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    b = ex.tensor(ex.pick(args, kwargs, 1, "other", kwargs.get("mat2")))
    return _final(ex, "MatMul", [a.name, b.name])


def _shape_items(ex: _Exporter, items: list[Any]) -> str:
    """A 1-D int64 shape value from reshape arguments (ints, dynamic int scalars, shapes)."""
    pieces, run = [], []
    for it in items:
        if isinstance(it, _Val) and it.static and it.kind == "int":
            it = it.const
        if isinstance(it, int) and not isinstance(it, bool):
            run.append(it)
            continue
        if run:
            pieces.append(ex._const(run, suffix="shape"))
            run = []
        if isinstance(it, _Val) and it.kind == "int":
            pieces.append(ex._emit("Unsqueeze", [it.name, ex._const([0], suffix="axes")],
                                   suffix="dim", prunable=True)[0])
        elif isinstance(it, _Val) and it.kind == "shape":
            pieces.append(ex.name_of(it))
        else:
            raise _Unsupported(f"shape item {it!r}")
    if run:
        pieces.append(ex._const(run, suffix="shape"))
    if len(pieces) == 1:
        return pieces[0]
    return ex._emit("Concat", pieces, suffix="shape", prunable=True, axis=0)[0]


def _target_shape(ex: _Exporter, items: list[Any] | None) -> str:
    value = ex.out_value()
    shape = value.get("shape") if isinstance(value, dict) else None
    if shape is not None:
        sym = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(sym) <= 1 and not (0 in shape and sym):
            return ex._const([d if isinstance(d, int) else -1 for d in shape],
                             suffix="shape")
    if items is None:
        raise _Unsupported("reshape target")
    return _shape_items(ex, items)


def _reshape(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    items = args[1:] if len(args) > 1 else [kwargs.get("shape", kwargs.get("size"))]
    if len(items) == 1 and isinstance(items[0], list):
        items = items[0]
    if any(isinstance(i, _DType) for i in items):   # x.view(dtype): a bitcast
        raise _Unsupported("view as another dtype")
    value = ex.out_value()
    shape = value.get("shape") if isinstance(value, dict) else None
    allowzero = {"allowzero": 1} if shape and 0 in shape and -1 not in shape and all(
        isinstance(d, int) for d in shape) else {}
    return _final(ex, "Reshape", [x.name, _target_shape(ex, items)], **allowzero)


def _reshape_from_value(ex: _Exporter) -> _Val:
    """flatten / unflatten / expand_as-like ops whose result shape is all we need."""
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    return _final(ex, "Reshape", [x.name, _target_shape(ex, None)])


def _norm_dim(d: int, rank: int | None) -> int:
    if d < 0:
        if rank is None:
            raise _Unsupported("negative dim of unknown rank")
        d += rank
    return d


def _rank(v: _Val) -> int | None:
    return None if v.shape is None else len(v.shape)


def _transpose(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    r = _rank(x)
    if r is None:
        raise _Unsupported("transpose of unknown rank")
    op = ex.cur["op"].split(":")[-1]
    if op == "t":
        perm = list(range(r))[::-1] if r == 2 else list(range(r))
    else:
        d0 = _norm_dim(ex.py(ex.pick(args, kwargs, 1, "dim0")), r)
        d1 = _norm_dim(ex.py(ex.pick(args, kwargs, 2, "dim1")), r)
        perm = list(range(r))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return _final(ex, "Transpose", [x.name], perm=perm)


def _permute(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    dims = args[1:] if len(args) > 1 else [kwargs.get("dims")]
    if len(dims) == 1 and isinstance(dims[0], list):
        dims = dims[0]
    r = _rank(x) if _rank(x) is not None else len(dims)
    return _final(ex, "Transpose", [x.name], perm=[_norm_dim(ex.py(d), r) for d in dims])


def _cast(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    value = ex.out_value()
    op = ex.cur["op"].split(":")[-1]
    want = value.get("dtype") if isinstance(value, dict) else _METHOD_CASTS.get(op)
    if want is None:
        for a in list(args[1:]) + list(kwargs.values()):
            if isinstance(a, _DType):
                want = a.name
            elif isinstance(a, _Val) and a.kind == "tensor" and op == "type_as":
                want = a.dtype
    if want is None:
        raise _Unsupported("cast to an unknown dtype")
    return _final(ex, "Cast", [x.name], to=ex._elem(want))   # same dtype: a no-op Cast


def _identity(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    return _final(ex, "Identity", [x.name])


def _multi_outputs(ex: _Exporter, count: int) -> list[str]:
    n = ex.cur["name"]
    ex.names.add(n)
    return [ex._fresh(ex.out_names.get((n, i)) or f"{n}:{i}") for i in range(count)]


def _tuple_result(ex: _Exporter, outs: list[str]) -> _Val:
    value = ex.out_value()
    items = []
    for i, o in enumerate(outs):
        v = value[i] if isinstance(value, list) and i < len(value) else None
        if isinstance(v, dict):
            ex._typed(o, v.get("dtype"), v.get("shape"))
            items.append(_Val("tensor", o, v.get("dtype"), v.get("shape")))
        else:
            items.append(_Val("tensor", o))
    return _Val("tuple", items=items)


def _split(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input", kwargs.get("tensor")))
    dim = _norm_dim(ex.py(ex.pick(args, kwargs, 2, "dim", 0)), _rank(x))
    value = ex.out_value()
    if not isinstance(value, list):
        raise _Unsupported("split without per-output values")
    sizes = [v.get("shape", [None] * (dim + 1))[dim] if isinstance(v, dict) else None
             for v in value]
    if not all(isinstance(s, int) for s in sizes):   # symbolic parts: from the arguments
        spec = ex.py(ex.pick(args, kwargs, 1, "split_size_or_sections",
                             kwargs.get("split_size", kwargs.get("chunks"))))
        if isinstance(spec, list) and len(spec) == len(value):
            sizes = spec
        else:
            outs = _multi_outputs(ex, len(value))
            ex._emit("Split", [x.name], outputs=outs, axis=dim, num_outputs=len(value))
            return _tuple_result(ex, outs)
    outs = _multi_outputs(ex, len(value))
    ex._emit("Split", [x.name, ex._const([int(s) for s in sizes], suffix="split")],
             outputs=outs, axis=dim)
    return _tuple_result(ex, outs)


def _cat(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    xs = ex.pick(args, kwargs, 0, "tensors")
    dim = ex.py(ex.pick(args, kwargs, 1, "dim", 0))
    if not isinstance(xs, list):
        raise _Unsupported("cat of a non-list")
    xs = [ex.tensor(x) for x in xs]
    dim = _norm_dim(dim, _rank(xs[0]))
    return _final(ex, "Concat", [x.name for x in xs], axis=dim)


def _stack(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    xs = ex.pick(args, kwargs, 0, "tensors")
    dim = ex.py(ex.pick(args, kwargs, 1, "dim", 0))
    if not isinstance(xs, list):
        raise _Unsupported("stack of a non-list")
    xs = [ex.tensor(x) for x in xs]
    r = _rank(xs[0])
    dim = _norm_dim(dim, None if r is None else r + 1)
    axes = ex._const([dim], suffix="axes")
    us = [ex._emit("Unsqueeze", [x.name, axes], suffix="unsqueeze")[0] for x in xs]
    return _final(ex, "Concat", us, axis=dim)


def _softmax(onnx_op: str):
    def handler(ex: _Exporter) -> _Val:
        args, kwargs = ex.args_kwargs()
        x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
        dim = ex.py(ex.pick(args, kwargs, 1, "dim", -1))
        if dim is None:
            raise _Unsupported("softmax without dim")
        dtype = ex.pick(args, kwargs, 2, "dtype")
        name = x.name
        if isinstance(dtype, _DType) and dtype.name != x.dtype:
            name = ex._emit("Cast", [name], suffix="cast", to=ex._elem(dtype.name))[0]
        return _final(ex, onnx_op, [name], axis=int(dim))
    return handler


def _reduce(onnx_op: str):
    def handler(ex: _Exporter) -> _Val:
        args, kwargs = ex.args_kwargs()
        x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
        dim = ex.py(ex.pick(args, kwargs, 1, "dim"))
        keep = ex.py(ex.pick(args, kwargs, 2, "keepdim", False))
        if isinstance(dim, _DType) or "dtype" in kwargs:
            raise _Unsupported("reduction with a dtype")
        if dim is None:
            return _final(ex, onnx_op, [x.name], keepdims=int(bool(keep)))
        dims = dim if isinstance(dim, list) else [dim]
        axes = ex._const([int(d) for d in dims], suffix="axes")
        return _final(ex, onnx_op, [x.name, axes], keepdims=int(bool(keep)))
    return handler


def _unsqueeze(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    dim = ex.py(ex.pick(args, kwargs, 1, "dim"))
    return _final(ex, "Unsqueeze", [x.name, ex._const([int(dim)], suffix="axes")])


def _squeeze(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    dim = ex.py(ex.pick(args, kwargs, 1, "dim"))
    if dim is None:
        return _final(ex, "Squeeze", [x.name])
    dims = dim if isinstance(dim, list) else [dim]
    return _final(ex, "Squeeze", [x.name, ex._const([int(d) for d in dims], suffix="axes")])


def _where(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    c = ex.tensor(ex.pick(args, kwargs, 0, "condition"))
    value = ex.out_value()
    dt = value.get("dtype") if isinstance(value, dict) else "float32"
    a = ex.name_of(ex.pick(args, kwargs, 1, "input"), dt)
    b = ex.name_of(ex.pick(args, kwargs, 2, "other"), dt)
    return _final(ex, "Where", [c.name, a, b])


def _pow(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    e = ex.pick(args, kwargs, 1, "exponent")
    return _final(ex, "Pow", [x.name, ex.name_of(e, x.dtype or "float32")])


def _getattr(ex: _Exporter) -> _Val:
    args, _ = ex.args_kwargs()
    obj, attr = args[0], args[1]
    if isinstance(obj, _Val) and obj.kind == "object":
        value = ex.out_value()
        name = f"{obj.name}.{attr}"
        doc = f"field `{attr}` of the program input `{obj.name}`"
        if isinstance(value, dict):
            shape = value.get("shape")
            contract = _META_SHAPES.get(attr) if obj.name == "meta" else None
            if contract is not None and shape is not None and len(contract) == len(shape) \
                    and all(isinstance(d, int) for d in shape):
                doc += f" (traced with the sample shape {shape})"
                shape = contract
            return ex._scalar_input(name, value.get("dtype"), shape, doc)
        return ex._scalar_input(name, doc=f"{doc}, a python int")
    if isinstance(obj, _Val) and obj.kind == "tensor":
        if attr == "shape":
            out = ex._emit("Shape", [obj.name], prunable=True)[0]
            r = _rank(obj)
            ex._typed(out, "int64", None if r is None else [r])
            return _Val("shape", out, "int64", None if r is None else [r],
                        dims=None if obj.shape is None else list(obj.shape))
        if attr == "dtype" and obj.dtype is not None:
            return _Val("const", const=_DType(obj.dtype))
        if attr in ("ndim",) and obj.shape is not None:
            return _Val("int", const=len(obj.shape))
        if attr == "device":
            return _Val("const", const="device")
    raise _Unsupported(f"getattr {attr}")


def _size(ex: _Exporter) -> _Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(args[0])
    d = ex.py(ex.pick(args, kwargs, 1, "dim"))
    shape_v = _Val("shape", None, "int64", dims=None if x.shape is None else list(x.shape))
    out = ex._emit("Shape", [x.name], prunable=True, suffix="shape")[0]
    shape_v.name = out
    if d is None:
        return shape_v
    return _index_shape(ex, shape_v, d)


def _index_shape(ex: _Exporter, s: _Val, idx: Any) -> _Val:
    if isinstance(idx, int) and not isinstance(idx, bool):
        dim = s.dims[idx] if s.dims is not None and -len(s.dims) <= idx < len(s.dims) else None
        if isinstance(dim, int):
            return _Val("int", const=dim)          # a static dim: fold
        out = ex._emit("Gather", [s.name, ex._const(idx, suffix="index")],
                       outputs=[ex._fresh(ex.cur["name"])], prunable=True, axis=0)[0]
        ex._typed(out, "int64", [])
        return _Val("int", out, "int64", [])
    if isinstance(idx, slice):
        dims = s.dims[idx] if s.dims is not None else None
        if dims is not None and all(isinstance(d, int) for d in dims):
            return _Val("shape", None, "int64", [len(dims)], dims=list(dims))
        if idx.step not in (None, 1):
            raise _Unsupported("strided slice of a shape")
        start = ex._const([idx.start or 0], suffix="starts")
        stop = ex._const([_INT64_MAX if idx.stop is None else idx.stop], suffix="ends")
        out = ex._emit("Slice", [s.name, start, stop], outputs=[ex._fresh(ex.cur["name"])],
                       prunable=True)[0]
        return _Val("shape", out, "int64", None if dims is None else [len(dims)], dims=dims)
    raise _Unsupported(f"shape index {idx!r}")


def _getitem(ex: _Exporter) -> _Val:
    args, _ = ex.args_kwargs()
    obj, idx = args[0], args[1]
    if isinstance(obj, _Val) and obj.kind == "tuple":
        return obj.items[ex.py(idx)]
    if isinstance(obj, list):
        return obj[ex.py(idx)]
    if isinstance(obj, _Val) and obj.kind == "shape":
        return _index_shape(ex, obj, ex.py(idx))
    x = ex.tensor(obj)
    return _index_tensor(ex, x, idx)


def _bound(ex: _Exporter, b: Any) -> Any:
    """A slice bound: a python int, or a dynamic int scalar (e.g. x.shape[-1] // 2)."""
    if isinstance(b, _Val) and b.kind == "int":
        return b.const if b.static else b
    if isinstance(b, int) and not isinstance(b, bool):
        return b
    raise _Unsupported(f"slice bound {b!r}")


def _bounds(ex: _Exporter, items: list[Any], what: str) -> str:
    if all(isinstance(b, int) for b in items):
        return ex._const(items, suffix=what)
    return _shape_items(ex, items)


def _index_tensor(ex: _Exporter, x: _Val, idx: Any) -> _Val:
    items = idx if isinstance(idx, list) else [idx]
    rank = _rank(x)
    tensors = [i for i in items if isinstance(i, _Val) and i.kind == "tensor"]
    if any(isinstance(i, _Val) and i.kind != "tensor" and not i.static for i in items):
        # a dynamic python int index: Gather on that dim
        items = [i if not (isinstance(i, _Val) and i.kind == "int" and not i.static) else
                 _Val("tensor", i.name, "int64", []) for i in items]
        tensors = [i for i in items if isinstance(i, _Val) and i.kind == "tensor"]
    if len(tensors) > 1:
        raise _Unsupported("advanced indexing with several tensors")
    items = [i.const if isinstance(i, _Val) and i.static and i.kind == "int" else i
             for i in items]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if len(tensors) == 1 and tensors[0].dtype == "bool":
        consumed += max(len(tensors[0].shape or [1]) - 1, 0)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            if rank is None:
                raise _Unsupported("ellipsis on a tensor of unknown rank")
            expanded.extend([slice(None)] * (rank - consumed))
        else:
            expanded.append(i)
    starts, ends, axes, steps = [], [], [], []
    squeeze, unsqueeze, gather = [], [], None
    d = o = 0
    for i in expanded:
        if i is None:
            unsqueeze.append(o)
            o += 1
        elif isinstance(i, slice):
            if (i.start in (None, 0)) and i.stop is None and i.step in (None, 1):
                pass
            else:
                step = 1 if i.step is None else ex.py(i.step)
                if step <= 0:
                    raise _Unsupported("non-positive slice step")
                starts.append(0 if i.start is None else _bound(ex, i.start))
                ends.append(_INT64_MAX if i.stop is None else _bound(ex, i.stop))
                axes.append(d)
                steps.append(step)
            d += 1
            o += 1
        elif isinstance(i, int) and not isinstance(i, bool):
            starts.append(i)
            ends.append(_INT64_MAX if i == -1 else i + 1)
            axes.append(d)
            steps.append(1)
            squeeze.append(d)
            d += 1
        elif isinstance(i, _Val) and i.kind == "tensor":
            gather = (d, i)
            r = len(i.shape) if i.shape is not None else 1
            if i.dtype == "bool":
                if r != 1:
                    raise _Unsupported("multi-dim boolean mask")
                o += 1
            else:
                o += r
            d += 1
        else:
            raise _Unsupported(f"index {i!r}")
    name = x.name
    steps_needed = []
    if starts:
        steps_needed.append("slice")
    if gather is not None:
        steps_needed.append("gather")
    if squeeze:
        steps_needed.append("squeeze")
    if unsqueeze:
        steps_needed.append("unsqueeze")
    if not steps_needed:
        return _final(ex, "Identity", [name])
    if gather is not None and squeeze and len(gather[1].shape or [1]) != 1:
        raise _Unsupported("tensor index of rank != 1 mixed with integer indices")

    def step(kind: str, op: str, inputs: list[str], **attrs) -> str:
        if kind == steps_needed[-1]:
            return _final(ex, op, inputs, **attrs).name
        return ex._emit(op, inputs, suffix=kind, **attrs)[0]

    if starts:
        inputs = [name, _bounds(ex, starts, "starts"), _bounds(ex, ends, "ends"),
                  ex._const(axes, suffix="axes")]
        if any(st != 1 for st in steps):
            inputs.append(ex._const(steps, suffix="steps"))
        name = step("slice", "Slice", inputs)
    if gather is not None:
        dim, t = gather
        if t.dtype == "bool":
            name = step("gather", "Compress", [name, t.name], axis=dim)
        else:
            name = step("gather", "Gather", [name, t.name], axis=dim)
    if squeeze:
        name = step("squeeze", "Squeeze", [name, ex._const(squeeze, suffix="axes")])
    if unsqueeze:
        name = step("unsqueeze", "Unsqueeze", [name, ex._const(unsqueeze, suffix="axes")])
    return ex.out_tensor(name)


def _boundary(ex: _Exporter) -> _Val:
    args, _ = ex.args_kwargs()
    v = args[0]
    if isinstance(v, _Val) and v.kind == "tensor":
        return _final(ex, "Identity", [v.name])
    return v


def _floordiv(x: Any, y: Any) -> Any:
    return x // y


_STANDARD: dict[str, Callable[[_Exporter], _Val]] = {
    "embedding": _embedding,
    "linear": _linear,
    "matmul": _matmul, "mm": _matmul, "bmm": _matmul, "method:matmul": _matmul,
    "add": _binary("Add", lambda x, y: x + y), "iadd": _binary("Add", lambda x, y: x + y),
    "method:add": _binary("Add", lambda x, y: x + y),
    "sub": _binary("Sub", lambda x, y: x - y), "isub": _binary("Sub", lambda x, y: x - y),
    "method:sub": _binary("Sub", lambda x, y: x - y),
    "mul": _binary("Mul", lambda x, y: x * y), "imul": _binary("Mul", lambda x, y: x * y),
    "method:mul": _binary("Mul", lambda x, y: x * y),
    "truediv": _binary("Div", lambda x, y: x / y), "div": _binary("Div", lambda x, y: x / y),
    "method:div": _binary("Div", lambda x, y: x / y),
    "floordiv": _binary("Div", _floordiv),
    "pow": _pow, "method:pow": _pow,
    "neg": _unary("Neg"), "method:neg": _unary("Neg"),
    "exp": _unary("Exp"), "method:exp": _unary("Exp"),
    "log": _unary("Log"), "method:log": _unary("Log"),
    "sqrt": _unary("Sqrt"), "method:sqrt": _unary("Sqrt"),
    "rsqrt": _rsqrt, "method:rsqrt": _rsqrt,
    "abs": _unary("Abs"), "method:abs": _unary("Abs"),
    "reciprocal": _unary("Reciprocal"), "method:reciprocal": _unary("Reciprocal"),
    "sin": _unary("Sin"), "cos": _unary("Cos"), "erf": _unary("Erf"),
    "tanh": _unary("Tanh"), "method:tanh": _unary("Tanh"),
    "sigmoid": _unary("Sigmoid"), "method:sigmoid": _unary("Sigmoid"),
    "relu": _unary("Relu"), "method:relu": _unary("Relu"),
    "silu": _silu, "gelu": _gelu,
    "softmax": _softmax("Softmax"), "method:softmax": _softmax("Softmax"),
    "log_softmax": _softmax("LogSoftmax"), "method:log_softmax": _softmax("LogSoftmax"),
    "sum": _reduce("ReduceSum"), "method:sum": _reduce("ReduceSum"),
    "mean": _reduce("ReduceMean"), "method:mean": _reduce("ReduceMean"),
    "method:view": _reshape, "method:reshape": _reshape, "reshape": _reshape,
    "view": _reshape, "_reshape_alias": _reshape,
    "flatten": _reshape_from_value, "method:flatten": _reshape_from_value,
    "method:unflatten": _reshape_from_value, "unflatten": _reshape_from_value,
    "method:split": _split, "split": _split, "method:chunk": _split, "chunk": _split,
    "split_with_sizes": _split,
    "method:transpose": _transpose, "transpose": _transpose, "method:t": _transpose,
    "t": _transpose,
    "method:permute": _permute, "permute": _permute,
    "method:to": _cast, "to": _cast, "method:type": _cast, "method:type_as": _cast,
    "_to_copy": _cast,
    **{f"method:{m}": _cast for m in _METHOD_CASTS},
    "method:contiguous": _identity, "contiguous": _identity, "method:clone": _identity,
    "clone": _identity, "method:detach": _identity, "detach": _identity,
    "cat": _cat, "concat": _cat, "concatenate": _cat, "stack": _stack,
    "method:unsqueeze": _unsqueeze, "unsqueeze": _unsqueeze,
    "method:squeeze": _squeeze, "squeeze": _squeeze,
    "where": _where,
    "getattr": _getattr, "method:size": _size, "sym_size": _size,
    "getitem": _getitem, "method:__getitem__": _getitem,
    "topk": _topk, "method:topk": _topk,
    **{f"{p}{op}": _compare(onnx_op, neg) for p in ("", "method:")
       for op, onnx_op, neg in (("eq", "Equal", False), ("ne", "Equal", True),
                                ("lt", "Less", False), ("le", "LessOrEqual", False),
                                ("gt", "Greater", False), ("ge", "GreaterOrEqual", False))},
    "boundary": _boundary,
}


# ---------------------------------------------------------------------------------------
# Public API

def to_onnx(prog: Tsprog | str | Path, *, rank: int = 0) -> OnnxExport:
    """The per-rank graph of `prog` (a Tsprog or a .tsprog path) as an ONNX model, with the
    count of nodes that had no ONNX mapping (`fallbacks`)."""
    return _Exporter(_load(prog), rank).run()


def export_onnx(prog: Tsprog | str | Path, out_path: str | Path, *, rank: int = 0) -> Path:
    """Write rank `rank`'s graph of `prog` as an ONNX model (opset 18) to `out_path`; the model
    passes `onnx.checker.check_model`. Nodes without an ONNX mapping become custom nodes in
    domain "tscompile.torch": their count is warned about on stderr and stored in the model's
    metadata ("tscompile.fallbacks"). Returns the path written."""
    onnx = _onnx()
    exported = to_onnx(prog, rank=rank)
    onnx.checker.check_model(exported.model)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(exported.model, str(out))
    if exported.num_fallbacks:
        ops = ", ".join(f"{op} x{c}" for op, c in sorted(exported.fallbacks.items()))
        print(f"tscompile export: {exported.num_fallbacks} node(s) without an ONNX mapping "
              f"exported in domain {FALLBACK_DOMAIN!r}: {ops}", file=sys.stderr)
    return out
