"""Standard-op mappings for reading parts of values: `getitem` on tuples (a multi-output
node's outputs), on shapes (`x.shape[-1]`, `x.shape[:2]`) and on tensors (basic indexing ->
Slice/Squeeze/Unsqueeze, one tensor index -> Gather, a 1-D bool mask -> Compress), and
`getattr`/`size` (`meta.<field>` graph inputs, `x.shape`, `x.dtype`, `x.ndim`).

Static shape reads fold to python ints; dynamic ones are prunable Shape/Gather/Slice nodes
on int64 values. What it is not: reshapes and other views that keep every element
(`shapes.py`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from tscompile.onnx.inputs import meta_shape
from tscompile.onnx.shapes import shape_items
from tscompile.onnx.values import INT64_MAX, DType, Unsupported, Val, rank_of

if TYPE_CHECKING:
    from tscompile.onnx.exporter import Exporter


def _getattr(ex: Exporter) -> Val:
    args, _ = ex.args_kwargs()
    obj, attr = args[0], args[1]
    if isinstance(obj, Val) and obj.kind == "object":   # meta.<field>: a graph input
        value = ex.out_value()
        name = f"{obj.name}.{attr}"
        doc = f"field `{attr}` of the program input `{obj.name}`"
        if isinstance(value, dict):
            shape = value.get("shape")
            sym = meta_shape(attr, shape) if obj.name == "meta" else None
            if sym is not None:
                doc += f" (traced with the sample shape {shape})"
                shape = sym
            return ex.scalar_input(name, value.get("dtype"), shape, doc)
        return ex.scalar_input(name, doc=f"{doc}, a python int")
    if isinstance(obj, Val) and obj.kind == "tensor":
        if attr == "shape":
            out = ex.emit("Shape", [obj.name], prunable=True)[0]
            r = rank_of(obj)
            ex.typed(out, "int64", None if r is None else [r])
            return Val("shape", out, "int64", None if r is None else [r],
                       dims=None if obj.shape is None else list(obj.shape))
        if attr == "dtype" and obj.dtype is not None:
            return Val("const", const=DType(obj.dtype))
        if attr in ("ndim",) and obj.shape is not None:
            return Val("int", const=len(obj.shape))
        if attr == "device":
            return Val("const", const="device")
    raise Unsupported(f"getattr {attr}")


def _size(ex: Exporter) -> Val:
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(args[0])
    d = ex.py(ex.pick(args, kwargs, 1, "dim"))
    shape_v = Val("shape", None, "int64", dims=None if x.shape is None else list(x.shape))
    shape_v.name = ex.emit("Shape", [x.name], prunable=True, suffix="shape")[0]
    if d is None:
        return shape_v
    return _index_shape(ex, shape_v, d)


def _index_shape(ex: Exporter, s: Val, idx: Any) -> Val:
    """shape[i] (an int, folded when static) or shape[a:b] (a shape)."""
    if isinstance(idx, int) and not isinstance(idx, bool):
        dim = s.dims[idx] if s.dims is not None and -len(s.dims) <= idx < len(s.dims) else None
        if isinstance(dim, int):
            return Val("int", const=dim)          # a static dim: fold
        out = ex.scalar_op("Gather", [s.name, ex.const(idx, suffix="index")], axis=0)
        ex.typed(out, "int64", [])
        return Val("int", out, "int64", [])
    if isinstance(idx, slice):
        dims = s.dims[idx] if s.dims is not None else None
        if dims is not None and all(isinstance(d, int) for d in dims):
            return Val("shape", None, "int64", [len(dims)], dims=list(dims))
        if idx.step not in (None, 1):
            raise Unsupported("strided slice of a shape")
        start = ex.const([idx.start or 0], suffix="starts")
        stop = ex.const([INT64_MAX if idx.stop is None else idx.stop], suffix="ends")
        out = ex.scalar_op("Slice", [s.name, start, stop])
        return Val("shape", out, "int64", None if dims is None else [len(dims)], dims=dims)
    raise Unsupported(f"shape index {idx!r}")


def _getitem(ex: Exporter) -> Val:
    args, _ = ex.args_kwargs()
    obj, idx = args[0], args[1]
    if isinstance(obj, Val) and obj.kind == "tuple":
        return obj.items[ex.py(idx)]
    if isinstance(obj, list):
        return obj[ex.py(idx)]
    if isinstance(obj, Val) and obj.kind == "shape":
        return _index_shape(ex, obj, ex.py(idx))
    x = ex.tensor(obj)
    return _index_tensor(ex, x, idx)


def _bound(ex: Exporter, b: Any) -> Any:
    """A slice bound: a python int, or a dynamic int scalar (e.g. x.shape[-1] // 2)."""
    if isinstance(b, Val) and b.kind == "int":
        return b.const if b.static else b
    if isinstance(b, int) and not isinstance(b, bool):
        return b
    raise Unsupported(f"slice bound {b!r}")


def _bounds(ex: Exporter, items: list[Any], what: str) -> str:
    if all(isinstance(b, int) for b in items):
        return ex.const(items, suffix=what)
    return shape_items(ex, items)


def _index_tensor(ex: Exporter, x: Val, idx: Any) -> Val:
    """x[idx] for basic indexing (ints, slices, None, ...) plus at most one tensor index:
    Slice, then Gather/Compress, then Squeeze (int indices), then Unsqueeze (None), the last
    step named after the fx node."""
    items = idx if isinstance(idx, list) else [idx]
    rank = rank_of(x)
    tensors = [i for i in items if isinstance(i, Val) and i.kind == "tensor"]
    if any(isinstance(i, Val) and i.kind != "tensor" and not i.static for i in items):
        # a dynamic python int index: Gather on that dim
        items = [i if not (isinstance(i, Val) and i.kind == "int" and not i.static) else
                 Val("tensor", i.name, "int64", []) for i in items]
        tensors = [i for i in items if isinstance(i, Val) and i.kind == "tensor"]
    if len(tensors) > 1:
        raise Unsupported("advanced indexing with several tensors")
    items = [i.const if isinstance(i, Val) and i.static and i.kind == "int" else i
             for i in items]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if len(tensors) == 1 and tensors[0].dtype == "bool":
        consumed += max(len(tensors[0].shape or [1]) - 1, 0)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            if rank is None:
                raise Unsupported("ellipsis on a tensor of unknown rank")
            expanded.extend([slice(None)] * (rank - consumed))
        else:
            expanded.append(i)
    starts, ends, axes, steps = [], [], [], []
    squeeze, unsqueeze, gather = [], [], None
    d = o = 0   # d: the input dim an index reads; o: the output dim it makes
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
                    raise Unsupported("non-positive slice step")
                starts.append(0 if i.start is None else _bound(ex, i.start))
                ends.append(INT64_MAX if i.stop is None else _bound(ex, i.stop))
                axes.append(d)
                steps.append(step)
            d += 1
            o += 1
        elif isinstance(i, int) and not isinstance(i, bool):
            starts.append(i)
            ends.append(INT64_MAX if i == -1 else i + 1)
            axes.append(d)
            steps.append(1)
            squeeze.append(d)
            d += 1
        elif isinstance(i, Val) and i.kind == "tensor":
            gather = (d, i)
            r = len(i.shape) if i.shape is not None else 1
            if i.dtype == "bool":
                if r != 1:
                    raise Unsupported("multi-dim boolean mask")
                o += 1
            else:
                o += r
            d += 1
        else:
            raise Unsupported(f"index {i!r}")
    name = x.name
    steps_needed = [kind for kind, needed in (("slice", starts), ("gather", gather is not None),
                                              ("squeeze", squeeze), ("unsqueeze", unsqueeze))
                    if needed]
    if not steps_needed:
        return ex.final("Identity", [name])
    if gather is not None and squeeze and len(gather[1].shape or [1]) != 1:
        raise Unsupported("tensor index of rank != 1 mixed with integer indices")

    def step(kind: str, op: str, inputs: list[str], **attrs) -> str:
        if kind == steps_needed[-1]:
            return ex.final(op, inputs, **attrs).name
        return ex.emit(op, inputs, suffix=kind, **attrs)[0]

    if starts:
        inputs = [name, _bounds(ex, starts, "starts"), _bounds(ex, ends, "ends"),
                  ex.const(axes, suffix="axes")]
        if any(st != 1 for st in steps):
            inputs.append(ex.const(steps, suffix="steps"))
        name = step("slice", "Slice", inputs)
    if gather is not None:
        dim, t = gather
        name = step("gather", "Compress" if t.dtype == "bool" else "Gather", [name, t.name],
                    axis=dim)
    if squeeze:
        name = step("squeeze", "Squeeze", [name, ex.const(squeeze, suffix="axes")])
    if unsqueeze:
        name = step("unsqueeze", "Unsqueeze", [name, ex.const(unsqueeze, suffix="axes")])
    return ex.out_tensor(name)


OPS: dict[str, Callable[[Exporter], Val]] = {
    "getattr": _getattr,
    **dict.fromkeys(("method:size", "sym_size"), _size),
    **dict.fromkeys(("getitem", "method:__getitem__"), _getitem),
}
