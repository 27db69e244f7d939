"""The build pipeline: model file -> passes -> program.py + manifest -> `.tsprog`.

    load (meta device) -> trace -> propagate -> insert_collectives -> localize -> fuse
    -> verify -> codegen -> pack

Every pass is timed; with TSCOMPILE_DUMP=dir (or `dump_dir`) the graph after each pass is
written as dir/NN_<pass>.txt with placements beside nodes, and always packed into the
.tsprog under dumps/. No weights and no GPU are needed: the model lives on the meta device.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from tscompile import envs
from tscompile.annotations import Mesh
from tscompile.codegen import graph_json, render_program
from tscompile.models import (build_config, load_model_file, model_file_for_hf,
                              read_hf_config)
from tscompile.models.checkpoint import Rule, loadable_tensors, plan_pieces, resolve
from tscompile.passes.collectives import insert_collectives
from tscompile.passes.fuse import fuse
from tscompile.passes.fuse_kernels import fuse_kernels
from tscompile.passes.pack_linears import pack_linears
from tscompile.passes.ir import Stage, dump
from tscompile.passes.localize import localize
from tscompile.passes.propagate import propagate
from tscompile.passes.trace import trace
from tscompile.passes.verify import verify
from tscompile.plan import ParamPlan
from tscompile.quant import (
    BUILD_QUANT, Quantized, apply_fp8_block, check_fp8_blocks, direct_reads, hf_quantization,
)
from tscompile.runtime.kv_cache import attention_modules, bind_kv_caches
from tscompile.tsprog import FORMAT_VERSION, write_tsprog

log = logging.getLogger(__name__)

PASSES: tuple[tuple[str, Callable[[Stage], Stage]], ...] = (
    ("trace", trace), ("propagate", propagate), ("insert_collectives", insert_collectives),
    ("localize", localize), ("fuse", fuse), ("pack_linears", pack_linears),
    ("fuse_kernels", fuse_kernels), ("verify", verify))
# graph.json (the ONNX export's input) is the graph after this pass: checkpoint tensors and
# the tscompile ops an exporter knows, before the per-rank packing and kernel fusions.
GRAPH_JSON_AFTER = "fuse"


@dataclass
class Built:
    stage: Stage
    manifest: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)   # program.py, model.py, dumps/*

    def save(self, path: str | Path) -> Path:
        return write_tsprog(path, self.manifest, self.files)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _kinds(model: torch.nn.Module) -> dict[str, str]:
    kinds = {}
    persistent = loadable_tensors(model)
    for name, _ in model.named_parameters():
        kinds[name] = "param"
    for name, _ in model.named_buffers():
        kinds.setdefault(name, "buffer" if name in persistent else "derived")
    for name, _ in attention_modules(model):
        kinds[f"{name}.kv_cache" if name else "kv_cache"] = "kv_cache"
    return kinds


def _rules(module: ModuleType) -> tuple[Rule, ...]:
    return getattr(module.MODEL, "CHECKPOINT_MAP", (Rule("{*}", "{*}"),))


def _plan(stage: Stage, module: ModuleType, quantized: Quantized | None = None
          ) -> dict[str, ParamPlan]:
    model = stage.model
    tensors = loadable_tensors(model)
    resolved = quantized.pieces if quantized else resolve(model, _rules(module))
    pieces = plan_pieces(resolved, {k: tuple(v.shape) for k, v in tensors.items()})
    stored = quantized.stored() if quantized else {}
    kinds = _kinds(model)
    all_tensors = dict(model.named_parameters())
    all_tensors.update(dict(model.named_buffers()))
    plans = {}
    for name, p in stage.facts["param_placements"].items():
        t = all_tensors[name]
        dim = getattr(p, "dim", None)
        # Quantized checkpoint: any tensor the program reads unquantized may be stored FP8
        # there (routed experts, a Linear the model reads itself): dequantized at load.
        deq = (tuple(quantized.quant.block)
               if quantized and name not in stored and kinds[name] == "param" else None)
        plans[name] = ParamPlan(name, tuple(t.shape), _dtype_name(t), kinds[name], dim,
                                getattr(p, "chunks", 1), pieces.get(name, ()),
                                stored.get(name), deq)
    return plans


def _kv_layout(model: torch.nn.Module, plans: dict[str, ParamPlan], world: int
               ) -> dict[str, Any]:
    """Per layer: the cache shape with 'num_blocks'/'page_size' in place, the sharded dim,
    and elements per token per rank."""
    layers, per_token = [], 0
    for name, m in attention_modules(model):
        a, b = m.kv_cache_shape(5, 7), m.kv_cache_shape(11, 13)
        shape = ["num_blocks" if (x, y) == (5, 11) else "page_size" if (x, y) == (7, 13) else x
                 for x, y in zip(a, b)]
        key = f"{name}.kv_cache"
        dim = plans[key].dim if key in plans else None
        elems = 1
        for i, s in enumerate(shape):
            if isinstance(s, int):
                elems *= s // world if i == dim else s
        per_token += elems
        layers.append({"name": key, "shape": shape, "dim": dim, "elements_per_token": elems})
    return {"layers": layers, "elements_per_token_per_rank": per_token,
            "bytes_per_token_per_rank": {"bfloat16": per_token * 2, "float32": per_token * 4}}


class _DirectReads(Exception):
    def __init__(self, names: list[str]):
        super().__init__(names)
        self.names = names


def _run_passes(module: ModuleType, cfg: Any, mesh: Mesh, qcfg: Any, direct: Sequence[str],
                dump_dir: str | Path | None):
    """The meta model (FP8 Linears swapped in, but those in `direct`) through every pass:
    (model, Quantized | None, final stage, pass timings, dumps, graph.json)."""
    with torch.device("meta"):
        net = module.MODEL(cfg).eval()
    quantized = (apply_fp8_block(net, resolve(net, _rules(module)), qcfg, direct)
                 if qcfg else None)
    if attention_modules(net):           # shapes only: a 4-block pool on the meta device
        bind_kv_caches(net, 4, 4, dtype=torch.float32, device="meta")
    stage = Stage(None, mesh, net, cfg)          # type: ignore[arg-type]
    timings, dumps, graph = [], {}, None
    for i, (name, fn) in enumerate(PASSES):
        t0 = time.perf_counter()
        stage = fn(stage)
        if name == GRAPH_JSON_AFTER:
            graph = graph_json(stage)
        timings.append({"pass": name, "seconds": round(time.perf_counter() - t0, 4)})
        text = dump(stage)
        dumps[f"dumps/{i:02d}_{name}.txt"] = text
        if dump_dir:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            (Path(dump_dir) / f"{i:02d}_{name}.txt").write_text(text)
        log.info("pass %s: %.3f s", name, timings[-1]["seconds"])
        if name == "trace" and quantized and not direct:
            names = direct_reads(stage.gm, quantized)
            if names:
                raise _DirectReads(names)
        if name == "propagate" and quantized:     # before localize divides the block grids
            check_fp8_blocks(stage.facts["param_placements"],
                             {k: tuple(v.shape) for k, v in net.named_parameters()},
                             quantized, mesh.world_size)
    return net, quantized, stage, timings, dumps, graph


def build(model: str | Path | None, *, mesh: Mesh, preset: str | None = None,
          config: str | Path | dict[str, Any] | None = None,
          dump_dir: str | Path | None = None, model_path: Sequence[str | Path] = (),
          quant: str | None = None) -> Built:
    """`model` is a model file or name; None finds it by the config's model_type (built-ins,
    entry points, then `model_path` and TSCOMPILE_MODEL_PATH: tscompile.models).
    `quant` ("fp8-block"): quantize an unquantized preset or config's Linears at build
    time, as `tscompile quantize` would its checkpoint (dummy weights, byte reports)."""
    module, config = _model_file(model, preset, config, model_path)
    cfg = build_config(module, preset=preset, config=config)
    # Quantized checkpoints (quantization_config): FP8 Linears become fp8_block_linear.
    qcfg = hf_quantization(config)
    if quant is not None:
        if quant not in BUILD_QUANT:
            raise ValueError(f"--quant {quant!r} is not supported; supported: "
                             f"{', '.join(BUILD_QUANT)}")
        if qcfg is not None:
            raise ValueError(f"--quant {quant}: the config is already quantized "
                             f"({qcfg.to_hf()['quant_method']}); drop --quant")
        qcfg = BUILD_QUANT[quant]()
    dump_dir = dump_dir or envs.TSCOMPILE_DUMP.get() or None
    try:
        net, quantized, stage, timings, dumps, graph = _run_passes(
            module, cfg, mesh, qcfg, (), dump_dir)
    except _DirectReads as e:            # keep those Linears unquantized, and start over
        net, quantized, stage, timings, dumps, graph = _run_passes(
            module, cfg, mesh, qcfg, e.names, dump_dir)
    plans = _plan(stage, module, quantized)
    world = mesh.world_size
    for p in plans.values():
        p.check(world)
    kv = _kv_layout(net, plans, world)
    label = Path(str(model) if model is not None else module.__file__).stem
    program = render_program(stage, title=f"{label} ({preset or 'config'}) on "
                             f"{mesh.describe()}", model=f"{module.__name__}",
                             format_version=FORMAT_VERSION)
    loaded = [p for p in plans.values() if p.kind in ("param", "buffer")]
    param_elems = sum(_numel(p.local_shape(world)) for p in loaded)
    manifest = {
        "model": {"name": label, "module": module.__name__, "class": module.MODEL.__name__,
                  "preset": preset, "config": dataclasses.asdict(cfg)},
        "mesh": dict(mesh.to_json(), description=mesh.describe()),
        "tensors": {n: p.to_json() for n, p in plans.items()},
        "kv_cache": kv,
        "param_elements_per_rank": param_elems,
        "param_bytes_per_rank": _param_bytes(loaded, world),
        "schedule": stage.facts["schedule"],
        "collectives_per_layer": _per_layer(stage.facts["schedule"]),
        "fused_all_reduce_norm": stage.facts.get("fused_all_reduce_norm", 0),
        "fused_kernels": stage.facts.get("fused_kernels", {}),
        # Tensors the runtime builds after loading, from this rank's slices of their parts.
        "packed": stage.facts.get("packed", {}),
        "warnings": stage.facts.get("warnings", []),
        "passes": timings,
        "inputs": ["input_ids [T] int64", "positions [T] int64", "meta: AttentionMetadata"],
    }
    if quantized:
        manifest["quantization"] = dict(quantized.quant.to_hf(),
                                        quantized_tensors=sorted(quantized.scales))
    files = {"program.py": program, "model.py": Path(module.__file__).read_text(),
             "graph.json": json.dumps(graph, indent=None), **dumps}
    return Built(stage, manifest, files)


def _model_file(model: str | Path | None, preset: str | None,
                config: str | Path | dict[str, Any] | None, model_path: Sequence[str | Path]
                ) -> tuple[ModuleType, str | Path | dict[str, Any] | None]:
    if model is not None:
        if model_path:
            raise ValueError("--model-path only finds a model file by --config's model_type; "
                             "drop it, or drop the model argument")
        return load_model_file(model), config
    if config is None:
        raise ValueError("give a model file or name"
                         + (f" for preset {preset!r}" if preset else "")
                         + ", or --config config.json, whose model_type picks the model file")
    d = config if isinstance(config, dict) else read_hf_config(config)
    return model_file_for_hf(d, model_path), d


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_BYTES = {"bfloat16": 2, "float32": 4, "float8_e4m3fn": 1}


def _param_bytes(plans: list[ParamPlan], world: int) -> dict[str, int]:
    """Bytes per rank when run in bf16 / fp32: tensors with a stored precision (FP8 weights,
    their fp32 scales) count at that precision in both."""
    return {run: sum(_numel(p.local_shape(world)) * _BYTES[p.stored or run] for p in plans)
            for run in ("bfloat16", "float32")}


def _per_layer(schedule: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in schedule:
        key = "top" if c["layer"] is None else str(c["layer"])
        out.setdefault(key, []).append(f"{c['kind']} {c['from']}->{c['to']} @ {c['scope']}")
    return out
