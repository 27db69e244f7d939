"""The exporter core: walks a `.tsprog`'s `graph.json` node by node, keeps what each fx node
evaluates to (`env`: name -> `Val`), declares graph inputs on first use, and offers the emit
helpers the op handlers build ONNX nodes with.

What it is not: the op mappings. A node's op is looked up in `HANDLERS` (standard ONNX ops,
from `standard.py`, `shapes.py` and `indexing.py`); `tscompile::` ops and anything a handler
refuses (`Unsupported`) go to `custom.py`; `model.py` assembles the ModelProto at the end.

Handler protocol: a handler reads `ex.cur` (the fx node) through `ex.args_kwargs()` and
returns the node's `Val`. It names its final ONNX output after the fx node (`ex.final`), so
ONNX values and graph.json nodes share names; intermediate nodes get "<node>/<suffix>" names.
Bookkeeping nodes (Shape, Constant, int arithmetic) are `prunable`: dropped when nothing
reads them.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable

from tscompile.onnx import custom, indexing, model, shapes, standard
from tscompile.onnx.inputs import kv_dims, tensor_doc
from tscompile.onnx.values import (DOMAIN, FALLBACK_DOMAIN, FLOAT8, DType, OnnxExport,
                                   Unsupported, Val, dtype_map, onnx_module)
from tscompile.tsprog import Tsprog

# fx op (aten:: prefix stripped) -> handler; one op family per module.
HANDLERS: dict[str, Callable[[Exporter], Val]] = {**standard.OPS, **shapes.OPS, **indexing.OPS}


def placement_text(p: Any) -> str:
    if p is None:
        return "-"
    if isinstance(p, list):
        return "(" + ", ".join(str(x) for x in p) + ")"
    return str(p)


class Exporter:
    def __init__(self, prog: Tsprog, rank: int):
        onnx = onnx_module()
        self.onnx, self.helper = onnx, onnx.helper
        self.prog, self.rank = prog, rank
        self.g = json.loads(prog.files["graph.json"])
        self.world = int(self.g["world_size"])
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside the program's world of {self.world} ranks")
        self.dtypes = dtype_map()
        self.nodes: list[Any] = []
        self.prunable: set[int] = set()          # ids of bookkeeping nodes (dropped if unread)
        self.value_info: dict[str, Any] = {}
        self.inputs: dict[str, Any] = {}         # placeholder / meta / rank inputs, in order
        self.tensor_inputs: dict[str, Any] = {}  # parameters, buffers, KV caches
        self.env: dict[str, Val] = {}
        self.names: set[str] = set()             # ONNX value names taken
        self.node_names: set[str] = set()        # ONNX node names taken
        self.fallbacks: Counter = Counter()
        self.uses_float8 = False
        self.transposed: dict[str, str] = {}    # weight value -> its Transpose output
        self.out_names: dict[tuple[str, int], str] = {}
        self.cur: dict[str, Any] = {}            # the fx node being exported
        self._plans = prog.manifest["tensors"]

    # ---------------------------------------------------------------- types and values
    def elem(self, dtype: str | None) -> int:
        if dtype is None:
            return self.onnx.TensorProto.UNDEFINED
        if dtype in FLOAT8:
            self.uses_float8 = True
        if dtype not in self.dtypes:
            raise Unsupported(f"dtype {dtype}")
        return self.dtypes[dtype]

    def vi(self, name: str, dtype: str | None, shape: list[Any] | None):
        dims = None if shape is None else [d if isinstance(d, int) else str(d) for d in shape]
        try:
            elem = self.elem(dtype)
        except Unsupported:
            elem = self.onnx.TensorProto.UNDEFINED
        return self.helper.make_tensor_value_info(name, elem, dims)

    def fresh(self, base: str, taken: set[str] | None = None) -> str:
        taken = self.names if taken is None else taken
        name, i = base, 1
        while name in taken:
            name = f"{base}#{i}"          # fx names never hold '#': no clash with a later node
            i += 1
        taken.add(name)
        return name

    def typed(self, name: str, dtype: str | None, shape: list[Any] | None) -> None:
        if dtype is not None:
            self.value_info[name] = self.vi(name, dtype, shape)

    def value_of(self, name: str, v: Any, other: str = "tensor") -> Val:
        """The Val of ONNX value `name` whose graph.json value is `v`: a typed tensor when `v`
        is a tensor spec ({"dtype", "shape"}), else an untyped Val of kind `other`."""
        if isinstance(v, dict):
            self.typed(name, v.get("dtype"), v.get("shape"))
            return Val("tensor", name, v.get("dtype"), v.get("shape"))
        return Val(other, name)

    def out_value(self) -> Any:
        return self.cur.get("value")

    def out_tensor(self, name: str) -> Val:
        return self.value_of(name, self.out_value())

    # ---------------------------------------------------------------- emitting nodes
    def doc(self, extra: str = "") -> str:
        n = self.cur
        text = (f"op: {n.get('op')}\nplacement: {placement_text(n.get('placement'))}\n"
                f"scope: {n.get('scope') or '-'}")
        return text + (f"\n{extra}" if extra else "")

    def emit(self, op_type: str, inputs: list[str], n_out: int = 1, *, outputs: list[str] |
             None = None, domain: str = "", suffix: str = "", prunable: bool = False,
             doc: str = "", **attrs) -> list[str]:
        base = self.cur.get("name", "graph")
        node_name = self.fresh(base if not suffix else f"{base}/{suffix}", self.node_names)
        if outputs is None:
            outputs = [self.fresh(node_name)] if n_out == 1 else [
                self.fresh(f"{node_name}:{i}") for i in range(n_out)]
        node = self.helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain,
                                     doc_string=self.doc(doc), **attrs)
        self.nodes.append(node)
        if prunable:
            self.prunable.add(id(node))
        return outputs

    def final(self, op_type: str, inputs: list[str], **attrs) -> Val:
        """Emit the node that produces the fx node's value (named after it)."""
        name = self.cur["name"]
        self.names.add(name)
        self.emit(op_type, inputs, outputs=[name], **attrs)
        return self.out_tensor(name)

    def scalar_op(self, op_type: str, inputs: list[str], **attrs) -> str:
        """A prunable bookkeeping node for a python-int value, named after the fx node."""
        return self.emit(op_type, inputs, outputs=[self.fresh(self.cur["name"])],
                         prunable=True, **attrs)[0]

    def multi_outputs(self, count: int) -> list[str]:
        """Names for a multi-output node's outputs: output i takes the name of the first
        getitem that reads it (see `_name_outputs`), else "<node>:i"."""
        n = self.cur["name"]
        self.names.add(n)
        return [self.fresh(self.out_names.get((n, i)) or f"{n}:{i}") for i in range(count)]

    def tuple_result(self, outs: list[str], other: str = "tensor") -> Val:
        value = self.out_value()
        return Val("tuple", items=[
            self.value_of(o, value[i] if isinstance(value, list) and i < len(value) else None,
                          other) for i, o in enumerate(outs)])

    def const(self, value: Any, dtype: str = "int64", suffix: str = "const") -> str:
        import numpy as np
        np_dtype = {"int64": np.int64, "int32": np.int32, "float32": np.float32,
                    "float16": np.float16, "float64": np.float64, "bool": np.bool_}.get(dtype)
        if np_dtype is None:  # e.g. bfloat16 scalars: make a float32 constant and cast it
            c = self.const(value, "float32", suffix)
            return self.emit("Cast", [c], suffix=f"{suffix}_cast", prunable=True,
                             to=self.elem(dtype))[0]
        arr = np.array(value, dtype=np_dtype)
        out = self.emit("Constant", [], suffix=suffix, prunable=True,
                        value=self.onnx.numpy_helper.from_array(arr))[0]
        self.typed(out, dtype, list(arr.shape))
        return out

    def axes(self, dims: Any) -> str:
        """An int64 axes constant from one dim or a list of dims."""
        return self.const([int(d) for d in (dims if isinstance(dims, list) else [dims])],
                          suffix="axes")

    def cast(self, name: str, have: str | None, want: str) -> str:
        """`name` cast to `want` when its dtype `have` is known and differs."""
        if have is None or have == want:
            return name
        return self.emit("Cast", [name], suffix="cast", to=self.elem(want))[0]

    def as_1d(self, scalar: str, suffix: str, prunable: bool = False) -> str:
        """A 0-d int64 scalar as a 1-element 1-D tensor (for shapes, TopK's k)."""
        return self.emit("Unsqueeze", [scalar, self.const([0], suffix="axes")], suffix=suffix,
                         prunable=prunable)[0]

    # ---------------------------------------------------------------- graph inputs
    def tensor_input(self, name: str) -> Val:
        spec = self.g.get("tensors", {}).get(name) or {}
        if name not in self.tensor_inputs:
            self.names.add(name)
            vi = self.vi(name, spec.get("dtype"),
                         kv_dims(self.prog.manifest, name, spec.get("shape")))
            vi.doc_string = tensor_doc(self._plans, name, self.rank, self.world)
            self.tensor_inputs[name] = vi
        return Val("tensor", name, spec.get("dtype"), spec.get("shape"))

    def scalar_input(self, name: str, dtype: str = "int64", shape: list[Any] | None = None,
                     doc: str = "") -> Val:
        if name not in self.inputs:
            self.names.add(name)
            vi = self.vi(name, dtype, [] if shape is None else shape)
            vi.doc_string = doc
            self.inputs[name] = vi
        kind = "tensor" if shape else "int"
        return Val(kind, name, dtype, [] if shape is None else shape)

    # ---------------------------------------------------------------- arguments
    def arg(self, a: Any) -> Any:
        """A graph.json argument as a Val (node refs, tensors), list, slice, ... or itself."""
        if isinstance(a, dict):
            if "node" in a:
                v = self.env.get(a["node"])
                if v is None:
                    raise Unsupported(f"reference to unknown node {a['node']}")
                return v
            if "tensor" in a:
                return self.tensor_input(a["tensor"])
            if "list" in a:
                return [self.arg(b) for b in a["list"]]
            if "slice" in a:
                return slice(*(self.arg(b) for b in a["slice"]))
            if "ellipsis" in a:
                return Ellipsis
            if "dtype" in a:
                return DType(a["dtype"])
            if "repr" in a:
                return Val("const", const=a["repr"])
            raise Unsupported(f"argument {a}")
        return a

    def name_of(self, v: Any, dtype: str = "int64") -> str:
        """An ONNX value for `v` (a graph value, or a python scalar made a Constant)."""
        if isinstance(v, Val):
            if v.kind == "object":   # a non-tensor placeholder read as a value (`rank`)
                doc = "this rank's index in the group" if v.name == "rank" else v.name
                return self.scalar_input(v.name, doc=f"{doc} (a python int)").name
            if v.kind == "tuple":
                raise Unsupported("a tuple used as one tensor")
            if v.name is not None:
                return v.name
            if v.kind in ("int", "float"):
                return self.const(v.const, dtype if v.kind == "int" or dtype != "int64"
                                  else "float32")
            if v.kind == "shape":
                return self.const([int(d) for d in v.dims])
            raise Unsupported(f"constant {v.const!r} as a tensor")
        if isinstance(v, bool):
            return self.const(v, "bool")
        if isinstance(v, (int, float)):
            return self.const(v, dtype)
        if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            return self.const(v, dtype)
        raise Unsupported(f"{v!r} as a tensor")

    def tensor(self, v: Any) -> Val:
        if isinstance(v, Val) and v.kind == "tensor":
            return v
        raise Unsupported(f"expected a tensor, got {v!r}")

    @staticmethod
    def py(v: Any) -> Any:
        """The python value of a static argument (raises for dynamic ones)."""
        if isinstance(v, Val):
            if v.static and v.kind in ("int", "float", "const"):
                return v.const
            raise Unsupported("a dynamic value where a constant is needed")
        if isinstance(v, list):
            return [Exporter.py(x) for x in v]
        return v

    def args_kwargs(self) -> tuple[list[Any], dict[str, Any]]:
        n = self.cur
        return ([self.arg(a) for a in n.get("args", [])],
                {k: self.arg(v) for k, v in (n.get("kwargs") or {}).items()})

    def tensor_args(self) -> tuple[Val, list[Any], dict[str, Any]]:
        """The node's first argument (`input`) as a tensor, then all its args and kwargs."""
        args, kwargs = self.args_kwargs()
        return self.tensor(self.pick(args, kwargs, 0, "input")), args, kwargs

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
                self.inputs[name] = self.vi(name, value.get("dtype"), value.get("shape"))
                self.env[name] = Val("tensor", name, value.get("dtype"), value.get("shape"))
            else:  # `meta` (fields read by getattr) or `rank` (an int): declared on first use
                self.env[name] = Val("object", name)
        for n in self.g.get("nodes", []):
            self._name_outputs(n)
        for n in self.g.get("nodes", []):
            self.cur = n
            self.env[n["name"]] = self._node(n)
        self.cur = {"name": "output", "op": "output"}
        return model.assemble(self)

    def _name_outputs(self, n: dict[str, Any]) -> None:
        """Multi-output nodes: output i takes the name of the first getitem that reads it."""
        if n.get("op") != "getitem":
            return
        args = n.get("args", [])
        if len(args) == 2 and isinstance(args[0], dict) and "node" in args[0] \
                and isinstance(args[1], int) and not isinstance(args[1], bool):
            self.out_names.setdefault((args[0]["node"], args[1]), n["name"])

    def _node(self, n: dict[str, Any]) -> Val:
        op = n["op"]
        if op.startswith(f"{DOMAIN}::"):
            return custom.custom_node(self, DOMAIN, op.split("::", 1)[1])
        key = op[len("aten::"):] if op.startswith("aten::") else op
        handler = HANDLERS.get(key)
        if handler is not None:
            mark = len(self.nodes)
            try:
                return handler(self)
            except Unsupported:
                # Drop what the handler emitted before giving up, then fall back.
                for dropped in self.nodes[mark:]:
                    self.prunable.discard(id(dropped))
                    self.names.difference_update(dropped.output)
                    self.node_names.discard(dropped.name)
                del self.nodes[mark:]
                self.transposed = {w: t for w, t in self.transposed.items() if t in self.names}
        self.fallbacks[op] += 1
        return custom.custom_node(self, FALLBACK_DOMAIN, custom.sanitize(op), fallback=True)
