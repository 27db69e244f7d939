"""Assembling the ModelProto once every node is exported: the graph outputs (typed, an
Identity where an output is a graph input or repeats), pruning of unread bookkeeping nodes,
the graph inputs actually read, opsets, IR version and the `tscompile.*` metadata.

What it is not: node translation (`exporter.py` and the op modules) or writing/checking the
file (`export_onnx` in `__init__.py`).
"""
from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from tscompile.onnx.custom import sanitize
from tscompile.onnx.values import DOMAIN, FALLBACK_DOMAIN, OPSET, OnnxExport, Val

if TYPE_CHECKING:
    from tscompile.onnx.exporter import Exporter


def assemble(ex: Exporter) -> OnnxExport:
    outputs = _outputs(ex, ex.g.get("output"))
    _prune(ex, outputs)
    return _model(ex, outputs)


def _outputs(ex: Exporter, out: Any) -> list[Any]:
    vals: list[Val] = []

    def collect(a: Any) -> None:
        v = ex.arg(a) if isinstance(a, dict) and "list" not in a else None
        if isinstance(a, dict) and "list" in a:
            for b in a["list"]:
                collect(b)
        elif isinstance(v, Val) and v.kind == "tuple":
            vals.extend(v.items or [])
        elif isinstance(v, Val):
            vals.append(v)

    if out is not None:
        collect(out)
    result, seen = [], set()
    graph_inputs = set(ex.inputs) | set(ex.tensor_inputs)
    for v in vals:
        name = ex.name_of(v)
        if name in graph_inputs or name in seen:
            name = ex.emit("Identity", [name], suffix="output")[0]
        seen.add(name)
        info = ex.value_info.pop(name, None)
        if info is None:
            info = ex.vi(name, v.dtype, v.shape)
        result.append(info)
    return result


def _prune(ex: Exporter, outputs: list[Any]) -> None:
    """Drop prunable nodes nothing reads, to a fixed point (a Shape read only by a dropped
    Gather goes too), and the value_info of what is gone."""
    while True:
        used = {o.name for o in outputs}
        for node in ex.nodes:
            used.update(node.input)
        keep = [nd for nd in ex.nodes
                if id(nd) not in ex.prunable or any(o in used for o in nd.output)]
        if len(keep) == len(ex.nodes):
            break
        ex.nodes = keep
    produced = {o for nd in ex.nodes for o in nd.output}
    ex.value_info = {k: v for k, v in ex.value_info.items() if k in produced}


def _model(ex: Exporter, outputs: list[Any]) -> OnnxExport:
    helper = ex.helper
    man = ex.prog.manifest
    model_info = man.get("model", {}) or {}
    used = {i for nd in ex.nodes for i in nd.input}
    inputs = [vi for name, vi in ex.inputs.items()
              if name in used or name in ("input_ids", "positions")
              or any(o.name == name for o in outputs)]
    inputs += list(ex.tensor_inputs.values())
    title = f"{model_info.get('name', 'model')} rank {ex.rank}/{ex.world}"
    graph = helper.make_graph(ex.nodes, sanitize(title), inputs, outputs,
                              value_info=list(ex.value_info.values()),
                              doc_string=(man.get("mesh", {}) or {}).get("description", ""))
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1),
              helper.make_opsetid(FALLBACK_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tscompile",
                              doc_string=f"{title}: the per-rank graph of {ex.prog.path}"
                                         f" (weights are not inside)")
    try:
        from tscompile import __version__
        model.producer_version = __version__
    except Exception:  # pragma: no cover
        pass
    ir = helper.find_min_ir_version_for(opsets[:1], ignore_unknown=True)
    model.ir_version = max(ir, 9) if ex.uses_float8 else ir
    meta = {"tscompile.model": str(model_info.get("name", "")),
            "tscompile.preset": str(model_info.get("preset", "")),
            "tscompile.mesh": json.dumps(man.get("mesh", {})),
            "tscompile.rank": str(ex.rank),
            "tscompile.world_size": str(ex.world),
            "tscompile.fallbacks": json.dumps(dict(sorted(ex.fallbacks.items())))}
    helper.set_model_props(model, meta)
    return OnnxExport(model, Counter(ex.fallbacks), ex.rank)
