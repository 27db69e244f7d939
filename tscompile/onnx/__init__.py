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
  standard ops   become standard ONNX ops (opset 18), see the `OPS` table of each op module:
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

The package, one concept per module:
  values.py      the shared vocabulary: domains, dtypes, `Val`, `Unsupported`, `OnnxExport`
  exporter.py    the walk over graph.json, value tracking, graph inputs, emit helpers
  inputs.py      symbolic dims and doc strings of graph inputs
  standard.py    math ops: elementwise, comparisons, linear, softmax, reductions, casts
  shapes.py      view/shape ops: reshape, transpose, split, cat/stack, (un)squeeze
  indexing.py    getitem on tuples/shapes/tensors, getattr/size
  custom.py      tscompile-domain kernels and collectives, and fallbacks
  model.py       outputs, pruning, the ModelProto and its metadata

`export_onnx(prog, out_path, rank=0) -> Path` writes the file (checked with
`onnx.checker.check_model`); `to_onnx(prog, rank=0) -> OnnxExport` returns the model and the
fallback counts without writing.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tscompile.onnx.exporter import Exporter
from tscompile.onnx.values import (COLLECTIVES, DOMAIN, FALLBACK_DOMAIN, OPSET, OnnxExport,
                                   onnx_module)
from tscompile.tsprog import Tsprog, read_tsprog

__all__ = ["COLLECTIVES", "DOMAIN", "FALLBACK_DOMAIN", "OPSET", "OnnxExport", "export_onnx",
           "to_onnx"]


def to_onnx(prog: Tsprog | str | Path, *, rank: int = 0) -> OnnxExport:
    """The per-rank graph of `prog` (a Tsprog or a .tsprog path) as an ONNX model, with the
    count of nodes that had no ONNX mapping (`fallbacks`)."""
    prog = prog if isinstance(prog, Tsprog) else read_tsprog(prog)
    return Exporter(prog, rank).run()


def export_onnx(prog: Tsprog | str | Path, out_path: str | Path, *, rank: int = 0) -> Path:
    """Write rank `rank`'s graph of `prog` as an ONNX model (opset 18) to `out_path`; the model
    passes `onnx.checker.check_model`. Nodes without an ONNX mapping become custom nodes in
    domain "tscompile.torch": their count is warned about on stderr and stored in the model's
    metadata ("tscompile.fallbacks"). Returns the path written."""
    onnx = onnx_module()
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
