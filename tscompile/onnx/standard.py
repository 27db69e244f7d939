"""Standard-op mappings for math: elementwise arithmetic and activations, comparisons, linear
algebra (embedding, linear, matmul), softmax, reductions, top-k and dtype casts, each to
opset-18 ONNX ops. Python arithmetic on static ints folds to constants; on dynamic ints
(`rank * experts_per_rank`) it becomes prunable int64 scalar nodes.

What it is not: shape/view ops (`shapes.py`), indexing (`indexing.py`) or anything in the
tscompile domain (`custom.py`). A handler that raises `Unsupported` makes its node a counted
fallback, never a wrong standard node.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable

from tscompile.onnx.values import DType, Unsupported, Val

if TYPE_CHECKING:
    from tscompile.onnx.exporter import Exporter

METHOD_CASTS = {"float": "float32", "half": "float16", "bfloat16": "bfloat16",
                "double": "float64", "int": "int32", "long": "int64", "bool": "bool",
                "short": "int16", "char": "int8", "byte": "uint8"}


def _binary(onnx_op: str, fold: Callable[[Any, Any], Any]):
    """add/sub/mul/div on tensors or python scalars; `fold` computes it when both are static."""
    def handler(ex: Exporter) -> Val:
        args, kwargs = ex.args_kwargs()
        a = ex.pick(args, kwargs, 0, "input", ex.pick(args, kwargs, 0, "self"))
        b = ex.pick(args, kwargs, 1, "other")
        alpha = kwargs.get("alpha")
        if isinstance(a, Val) and a.kind == "object" or isinstance(b, Val) and \
                b.kind == "object":
            a = Val("int", ex.name_of(a)) if isinstance(a, Val) and a.kind == "object" else a
            b = Val("int", ex.name_of(b)) if isinstance(b, Val) and b.kind == "object" else b
        static = lambda v: not isinstance(v, Val) or (v.static and v.kind in ("int", "float"))
        if static(a) and static(b) and alpha is None:     # python arithmetic: fold
            r = fold(ex.py(a), ex.py(b))
            return Val("int" if isinstance(r, int) else "float", const=r)
        value = ex.out_value()
        if isinstance(value, dict):
            out_dtype = value.get("dtype")
        else:   # python int arithmetic on a dynamic scalar (e.g. rank * experts_per_rank)
            out_dtype = "int64" if not any(isinstance(v, float) or
                                           isinstance(v, Val) and v.kind == "float"
                                           for v in (a, b)) else "float32"
        names = []
        for v in (a, b):
            have = v.dtype if isinstance(v, Val) else None
            if isinstance(v, Val) and v.kind == "int" and have is None:
                have = "int64"
            names.append(ex.cast(ex.name_of(v, out_dtype), have, out_dtype))
        if alpha is not None and alpha != 1:
            names[1] = ex.emit("Mul", [names[1], ex.name_of(alpha, out_dtype)],
                               suffix="alpha")[0]
        if isinstance(value, dict):
            return ex.final(onnx_op, names)
        out = ex.scalar_op(onnx_op, names)
        ex.typed(out, out_dtype, [])
        return Val("int" if out_dtype == "int64" else "float", out, out_dtype, [])
    return handler


def _compare(onnx_op: str, negate: bool = False):
    """eq/ne/lt/... : both sides in the tensor side's dtype, a bool result."""
    def handler(ex: Exporter) -> Val:
        args, kwargs = ex.args_kwargs()
        a = ex.pick(args, kwargs, 0, "input")
        b = ex.pick(args, kwargs, 1, "other")
        like = next((v.dtype for v in (a, b) if isinstance(v, Val) and v.kind == "tensor"),
                    None)
        if like is None:     # python ints, e.g. `rank == 0` (a bias counted on rank 0 only)
            return _compare_ints(ex, onnx_op, negate, a, b)
        names = []
        for v in (a, b):
            have = v.dtype if isinstance(v, Val) and v.kind == "tensor" else None
            names.append(ex.cast(ex.name_of(v, like), have, like))
        if not negate:
            return ex.final(onnx_op, names)
        eq = ex.emit(onnx_op, names, suffix="eq")[0]
        return ex.final("Not", [eq])
    return handler


_FOLD = {"Equal": operator.eq, "Less": operator.lt, "LessOrEqual": operator.le,
         "Greater": operator.gt, "GreaterOrEqual": operator.ge}


def _compare_ints(ex: Exporter, onnx_op: str, negate: bool, a: Any, b: Any) -> Val:
    """A comparison of python ints: folded when static, else a bool scalar (typed "bool",
    so arithmetic with a tensor casts it to the tensor's dtype)."""
    a, b = (Val("int", ex.name_of(v)) if isinstance(v, Val) and v.kind == "object" else v
            for v in (a, b))
    if not any(isinstance(v, Val) and not v.static for v in (a, b)):
        r = _FOLD[onnx_op](ex.py(a), ex.py(b)) != negate
        return Val("int", const=int(r))
    out = ex.scalar_op(onnx_op, [ex.name_of(v) for v in (a, b)])
    if negate:
        out = ex.scalar_op("Not", [out])
    ex.typed(out, "bool", [])
    return Val("int", out, "bool", [])


def _unary(onnx_op: str):
    def handler(ex: Exporter) -> Val:
        x, _, _ = ex.tensor_args()
        return ex.final(onnx_op, [x.name])
    return handler


def _rsqrt(ex: Exporter) -> Val:
    x, _, _ = ex.tensor_args()
    s = ex.emit("Sqrt", [x.name], suffix="sqrt")[0]
    return ex.final("Reciprocal", [s])


def _silu(ex: Exporter) -> Val:
    x, _, _ = ex.tensor_args()
    s = ex.emit("Sigmoid", [x.name], suffix="sigmoid")[0]
    return ex.final("Mul", [x.name, s])


def _gelu(ex: Exporter) -> Val:
    """The exact (erf) gelu: x * (1 + erf(x / sqrt 2)) * 0.5."""
    x, _, kwargs = ex.tensor_args()
    if kwargs.get("approximate", "none") != "none":
        raise Unsupported("gelu approximate")
    dt = x.dtype or "float32"
    d = ex.emit("Div", [x.name, ex.const(2 ** 0.5, dt)], suffix="div")[0]
    e = ex.emit("Erf", [d], suffix="erf")[0]
    p = ex.emit("Add", [e, ex.const(1.0, dt)], suffix="add")[0]
    m = ex.emit("Mul", [x.name, p], suffix="mul")[0]
    return ex.final("Mul", [m, ex.const(0.5, dt)])


def _pow(ex: Exporter) -> Val:
    x, args, kwargs = ex.tensor_args()
    e = ex.pick(args, kwargs, 1, "exponent")
    return ex.final("Pow", [x.name, ex.name_of(e, x.dtype or "float32")])


def _where(ex: Exporter) -> Val:
    args, kwargs = ex.args_kwargs()
    c = ex.tensor(ex.pick(args, kwargs, 0, "condition"))
    value = ex.out_value()
    dt = value.get("dtype") if isinstance(value, dict) else "float32"
    a = ex.name_of(ex.pick(args, kwargs, 1, "input"), dt)
    b = ex.name_of(ex.pick(args, kwargs, 2, "other"), dt)
    return ex.final("Where", [c.name, a, b])


def _embedding(ex: Exporter) -> Val:
    args, kwargs = ex.args_kwargs()
    ids = ex.tensor(ex.pick(args, kwargs, 0, "input"))
    w = ex.tensor(ex.pick(args, kwargs, 1, "weight"))
    if ex.cur["op"] == "aten::embedding":   # aten order: (weight, indices)
        ids, w = w, ids
    return ex.final("Gather", [w.name, ids.name], axis=0)


def _linear(ex: Exporter) -> Val:
    """x @ W^T (+ b); W (out, in) is transposed once per weight and shared by its readers."""
    x, args, kwargs = ex.tensor_args()
    w = ex.tensor(ex.pick(args, kwargs, 1, "weight"))
    b = ex.pick(args, kwargs, 2, "bias")
    if w.shape is not None and len(w.shape) != 2:
        raise Unsupported("linear with a weight that is not 2-D")
    wt = ex.transposed.get(w.name)
    if wt is None:
        wt = ex.emit("Transpose", [w.name], outputs=[ex.fresh(f"{w.name}^T")],
                     suffix="weight_t", perm=[1, 0])[0]
        ex.typed(wt, w.dtype, None if w.shape is None else list(reversed(w.shape)))
        ex.transposed[w.name] = wt
    if b is None:
        return ex.final("MatMul", [x.name, wt])
    b = ex.tensor(b)
    mm = ex.emit("MatMul", [x.name, wt], suffix="matmul")[0]
    return ex.final("Add", [mm, b.name])


def _matmul(ex: Exporter) -> Val:
    a, args, kwargs = ex.tensor_args()
    b = ex.tensor(ex.pick(args, kwargs, 1, "other", kwargs.get("mat2")))
    return ex.final("MatMul", [a.name, b.name])


def _softmax(onnx_op: str):
    def handler(ex: Exporter) -> Val:
        x, args, kwargs = ex.tensor_args()
        dim = ex.py(ex.pick(args, kwargs, 1, "dim", -1))
        if dim is None:
            raise Unsupported("softmax without dim")
        dtype = ex.pick(args, kwargs, 2, "dtype")
        name = x.name
        if isinstance(dtype, DType) and dtype.name != x.dtype:
            name = ex.emit("Cast", [name], suffix="cast", to=ex.elem(dtype.name))[0]
        return ex.final(onnx_op, [name], axis=int(dim))
    return handler


def _reduce(onnx_op: str):
    def handler(ex: Exporter) -> Val:
        x, args, kwargs = ex.tensor_args()
        dim = ex.py(ex.pick(args, kwargs, 1, "dim"))
        keep = ex.py(ex.pick(args, kwargs, 2, "keepdim", False))
        if isinstance(dim, DType) or "dtype" in kwargs:
            raise Unsupported("reduction with a dtype")
        axes = [] if dim is None else [ex.axes(dim)]
        return ex.final(onnx_op, [x.name, *axes], keepdims=int(bool(keep)))
    return handler


def _topk(ex: Exporter) -> Val:
    x, args, kwargs = ex.tensor_args()
    k = ex.pick(args, kwargs, 1, "k")
    dim = ex.py(ex.pick(args, kwargs, 2, "dim", -1))
    largest = ex.py(ex.pick(args, kwargs, 3, "largest", True))
    is_sorted = ex.py(ex.pick(args, kwargs, 4, "sorted", True))
    if isinstance(k, Val) and k.kind == "int" and not k.static:
        kk = ex.as_1d(k.name, "k")
    else:
        kk = ex.const([int(ex.py(k))], suffix="k")
    outs = ex.multi_outputs(2)
    ex.emit("TopK", [x.name, kk], outputs=outs, axis=int(dim), largest=int(bool(largest)),
            sorted=int(bool(is_sorted)))
    return ex.tuple_result(outs)


def _cast(ex: Exporter) -> Val:
    """to/type/type_as/float/half/...: the target dtype from the result's value, else from
    the method name or a dtype (or tensor) argument. The same dtype is a no-op Cast."""
    x, args, kwargs = ex.tensor_args()
    value = ex.out_value()
    op = ex.cur["op"].split(":")[-1]
    want = value.get("dtype") if isinstance(value, dict) else METHOD_CASTS.get(op)
    if want is None:
        for a in list(args[1:]) + list(kwargs.values()):
            if isinstance(a, DType):
                want = a.name
            elif isinstance(a, Val) and a.kind == "tensor" and op == "type_as":
                want = a.dtype
    if want is None:
        raise Unsupported("cast to an unknown dtype")
    return ex.final("Cast", [x.name], to=ex.elem(want))


def _boundary(ex: Exporter) -> Val:
    """A region marker: an Identity on a tensor, the value itself otherwise."""
    args, _ = ex.args_kwargs()
    v = args[0]
    if isinstance(v, Val) and v.kind == "tensor":
        return ex.final("Identity", [v.name])
    return v


def _methods(*ops: str) -> tuple[str, ...]:
    """Each op as a function and as a tensor method: ("exp",) -> ("exp", "method:exp")."""
    return tuple(k for op in ops for k in (op, f"method:{op}"))


_ARITH = (   # (fx ops, ONNX op, python fold)
    (("add", "iadd", "method:add"), "Add", operator.add),
    (("sub", "isub", "method:sub"), "Sub", operator.sub),
    (("mul", "imul", "method:mul"), "Mul", operator.mul),
    (("truediv", "div", "method:div"), "Div", operator.truediv),
    (("floordiv",), "Div", operator.floordiv),
)
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "abs": "Abs",
          "reciprocal": "Reciprocal", "tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu"}
_COMPARE = {"eq": ("Equal", False), "ne": ("Equal", True), "lt": ("Less", False),
            "le": ("LessOrEqual", False), "gt": ("Greater", False),
            "ge": ("GreaterOrEqual", False)}

OPS: dict[str, Callable[[Exporter], Val]] = {
    "embedding": _embedding,
    "linear": _linear,
    **dict.fromkeys(("matmul", "mm", "bmm", "method:matmul"), _matmul),
    **{op: _binary(onnx_op, fold) for ops, onnx_op, fold in _ARITH for op in ops},
    **dict.fromkeys(_methods("pow"), _pow),
    **{k: _unary(onnx_op) for op, onnx_op in _UNARY.items() for k in _methods(op)},
    "sin": _unary("Sin"), "cos": _unary("Cos"), "erf": _unary("Erf"),   # no method forms
    **dict.fromkeys(_methods("rsqrt"), _rsqrt),
    "silu": _silu, "gelu": _gelu,
    **dict.fromkeys(_methods("softmax"), _softmax("Softmax")),
    **dict.fromkeys(_methods("log_softmax"), _softmax("LogSoftmax")),
    **dict.fromkeys(_methods("sum"), _reduce("ReduceSum")),
    **dict.fromkeys(_methods("mean"), _reduce("ReduceMean")),
    **dict.fromkeys(("method:to", "to", "method:type", "method:type_as", "_to_copy",
                     *(f"method:{m}" for m in METHOD_CASTS)), _cast),
    **dict.fromkeys(_methods("contiguous", "clone", "detach"), _unary("Identity")),
    "where": _where,
    **dict.fromkeys(_methods("topk"), _topk),
    **{k: _compare(onnx_op, neg) for op, (onnx_op, neg) in _COMPARE.items()
       for k in _methods(op)},
    "boundary": _boundary,
}
