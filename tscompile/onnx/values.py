"""The vocabulary every module of the ONNX exporter shares: the domains and opset, the dtype
table, `Val` (what an fx node evaluates to on the ONNX side), `DType`, the `Unsupported` signal
and the `OnnxExport` result.

What it is not: any translation. Nothing here emits a node; `exporter.py` does, and the op
modules (`standard.py`, `shapes.py`, `indexing.py`, `custom.py`) decide what to emit.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

OPSET = 18
DOMAIN = "tscompile"                 # kernels and collectives (torch.ops.tscompile.*)
FALLBACK_DOMAIN = "tscompile.torch"  # anything without an ONNX mapping
COLLECTIVES = frozenset({"all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                         "all_reduce_add_rms_norm"})
INT64_MAX = 2 ** 63 - 1              # "to the end" in an ONNX Slice
FLOAT8 = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")


def onnx_module():
    """The `onnx` package, imported on first use (it is an optional dependency)."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("tscompile export --onnx needs the `onnx` package: "
                          "pip install onnx (or the `test` extra)") from e
    return onnx


def dtype_map() -> dict[str, int]:
    """torch dtype names (and their aliases) -> ONNX TensorProto element types."""
    T = onnx_module().TensorProto
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


class Unsupported(Exception):
    """A node (or one of its argument forms) this exporter has no standard mapping for:
    raised by an op handler, it turns the node into a counted fallback."""


@dataclass
class Val:
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
class DType:
    """A torch dtype passed as an argument (`x.to(torch.float16)`), by name."""
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


def rank_of(v: Val) -> int | None:
    """The number of dims of a tensor value (None when its shape is unknown)."""
    return None if v.shape is None else len(v.shape)


def norm_dim(d: int, rank: int | None) -> int:
    """A torch dim (maybe negative) as the non-negative axis ONNX attributes want."""
    if d < 0:
        if rank is None:
            raise Unsupported("negative dim of unknown rank")
        d += rank
    return d
