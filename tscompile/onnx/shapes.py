"""Standard-op mappings for shape and view ops: view/reshape/flatten -> Reshape,
transpose/permute/t -> Transpose, split/chunk -> Split, cat/stack -> Concat,
squeeze/unsqueeze -> Squeeze/Unsqueeze.

Reshape targets come from the per-rank output shape when at most one dim is symbolic (that
dim becomes -1); otherwise they are built from the arguments (`shape_items`: static ints,
dynamic int scalars and shape values, concatenated).

What it is not: indexing or slicing (`indexing.py`), or anything that changes values.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from tscompile.onnx.values import DType, Unsupported, Val, norm_dim, rank_of

if TYPE_CHECKING:
    from tscompile.onnx.exporter import Exporter


def shape_items(ex: Exporter, items: list[Any]) -> str:
    """A 1-D int64 shape value from reshape arguments (ints, dynamic int scalars, shapes);
    runs of static ints become one constant."""
    pieces, run = [], []
    for it in items:
        if isinstance(it, Val) and it.static and it.kind == "int":
            it = it.const
        if isinstance(it, int) and not isinstance(it, bool):
            run.append(it)
            continue
        if run:
            pieces.append(ex.const(run, suffix="shape"))
            run = []
        if isinstance(it, Val) and it.kind == "int":
            pieces.append(ex.as_1d(it.name, "dim", prunable=True))
        elif isinstance(it, Val) and it.kind == "shape":
            pieces.append(ex.name_of(it))
        else:
            raise Unsupported(f"shape item {it!r}")
    if run:
        pieces.append(ex.const(run, suffix="shape"))
    if len(pieces) == 1:
        return pieces[0]
    return ex.emit("Concat", pieces, suffix="shape", prunable=True, axis=0)[0]


def _target_shape(ex: Exporter, items: list[Any] | None) -> str:
    value = ex.out_value()
    shape = value.get("shape") if isinstance(value, dict) else None
    if shape is not None:
        sym = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(sym) <= 1 and not (0 in shape and sym):
            return ex.const([d if isinstance(d, int) else -1 for d in shape],
                            suffix="shape")
    if items is None:
        raise Unsupported("reshape target")
    return shape_items(ex, items)


def _reshape(ex: Exporter) -> Val:
    x, args, kwargs = ex.tensor_args()
    items = args[1:] if len(args) > 1 else [kwargs.get("shape", kwargs.get("size"))]
    if len(items) == 1 and isinstance(items[0], list):
        items = items[0]
    if any(isinstance(i, DType) for i in items):   # x.view(dtype): a bitcast
        raise Unsupported("view as another dtype")
    value = ex.out_value()
    shape = value.get("shape") if isinstance(value, dict) else None
    allowzero = {"allowzero": 1} if shape and 0 in shape and -1 not in shape and all(
        isinstance(d, int) for d in shape) else {}
    return ex.final("Reshape", [x.name, _target_shape(ex, items)], **allowzero)


def _reshape_from_value(ex: Exporter) -> Val:
    """flatten / unflatten / expand_as-like ops whose result shape is all we need."""
    x, _, _ = ex.tensor_args()
    return ex.final("Reshape", [x.name, _target_shape(ex, None)])


def _transpose(ex: Exporter) -> Val:
    x, args, kwargs = ex.tensor_args()
    r = rank_of(x)
    if r is None:
        raise Unsupported("transpose of unknown rank")
    op = ex.cur["op"].split(":")[-1]
    if op == "t":
        perm = list(range(r))[::-1] if r == 2 else list(range(r))
    else:
        d0 = norm_dim(ex.py(ex.pick(args, kwargs, 1, "dim0")), r)
        d1 = norm_dim(ex.py(ex.pick(args, kwargs, 2, "dim1")), r)
        perm = list(range(r))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return ex.final("Transpose", [x.name], perm=perm)


def _permute(ex: Exporter) -> Val:
    x, args, kwargs = ex.tensor_args()
    dims = args[1:] if len(args) > 1 else [kwargs.get("dims")]
    if len(dims) == 1 and isinstance(dims[0], list):
        dims = dims[0]
    r = rank_of(x) if rank_of(x) is not None else len(dims)
    return ex.final("Transpose", [x.name], perm=[norm_dim(ex.py(d), r) for d in dims])


def _split(ex: Exporter) -> Val:
    """split/chunk: part sizes from the per-output values, else from the arguments, else
    `num_outputs` equal parts."""
    args, kwargs = ex.args_kwargs()
    x = ex.tensor(ex.pick(args, kwargs, 0, "input", kwargs.get("tensor")))
    dim = norm_dim(ex.py(ex.pick(args, kwargs, 2, "dim", 0)), rank_of(x))
    value = ex.out_value()
    if not isinstance(value, list):
        raise Unsupported("split without per-output values")
    sizes = [v.get("shape", [None] * (dim + 1))[dim] if isinstance(v, dict) else None
             for v in value]
    if not all(isinstance(s, int) for s in sizes):   # symbolic parts: from the arguments
        spec = ex.py(ex.pick(args, kwargs, 1, "split_size_or_sections",
                             kwargs.get("split_size", kwargs.get("chunks"))))
        if isinstance(spec, list) and len(spec) == len(value):
            sizes = spec
        else:
            outs = ex.multi_outputs(len(value))
            ex.emit("Split", [x.name], outputs=outs, axis=dim, num_outputs=len(value))
            return ex.tuple_result(outs)
    outs = ex.multi_outputs(len(value))
    ex.emit("Split", [x.name, ex.const([int(s) for s in sizes], suffix="split")],
            outputs=outs, axis=dim)
    return ex.tuple_result(outs)


def _tensor_list(ex: Exporter, what: str) -> tuple[list[Val], Any]:
    """cat/stack arguments: (the tensors, dim)."""
    args, kwargs = ex.args_kwargs()
    xs = ex.pick(args, kwargs, 0, "tensors")
    dim = ex.py(ex.pick(args, kwargs, 1, "dim", 0))
    if not isinstance(xs, list):
        raise Unsupported(f"{what} of a non-list")
    return [ex.tensor(x) for x in xs], dim


def _cat(ex: Exporter) -> Val:
    xs, dim = _tensor_list(ex, "cat")
    return ex.final("Concat", [x.name for x in xs], axis=norm_dim(dim, rank_of(xs[0])))


def _stack(ex: Exporter) -> Val:
    """stack = Unsqueeze each at `dim` (of the rank + 1 result), then Concat."""
    xs, dim = _tensor_list(ex, "stack")
    r = rank_of(xs[0])
    dim = norm_dim(dim, None if r is None else r + 1)
    axes = ex.axes(dim)
    us = [ex.emit("Unsqueeze", [x.name, axes], suffix="unsqueeze")[0] for x in xs]
    return ex.final("Concat", us, axis=dim)


def _unsqueeze(ex: Exporter) -> Val:
    x, args, kwargs = ex.tensor_args()
    dim = ex.py(ex.pick(args, kwargs, 1, "dim"))
    return ex.final("Unsqueeze", [x.name, ex.axes(int(dim))])


def _squeeze(ex: Exporter) -> Val:
    x, args, kwargs = ex.tensor_args()
    dim = ex.py(ex.pick(args, kwargs, 1, "dim"))
    return ex.final("Squeeze", [x.name] + ([] if dim is None else [ex.axes(dim)]))


OPS: dict[str, Callable[[Exporter], Val]] = {
    **dict.fromkeys(("method:view", "method:reshape", "reshape", "view", "_reshape_alias"),
                    _reshape),
    **dict.fromkeys(("flatten", "method:flatten", "method:unflatten", "unflatten"),
                    _reshape_from_value),
    **dict.fromkeys(("method:split", "split", "method:chunk", "chunk", "split_with_sizes"),
                    _split),
    **dict.fromkeys(("method:transpose", "transpose", "method:t", "t"), _transpose),
    **dict.fromkeys(("method:permute", "permute"), _permute),
    **dict.fromkeys(("cat", "concat", "concatenate"), _cat),
    "stack": _stack,
    **dict.fromkeys(("method:unsqueeze", "unsqueeze"), _unsqueeze),
    **dict.fromkeys(("method:squeeze", "squeeze"), _squeeze),
}
