"""Running a compiled `.tsprog` on one rank: load the generated program, this rank's weight
slices, derived buffers and KV caches, and call it with the forward contract.

What it is: `RankProgram`, a callable with the same interface the offline runner and the
server use for a single-device model (`__call__(input_ids, positions, meta) -> logits`,
`bind_kv_caches(num_blocks, page_size, dtype, device)`). What it is not: process launch or
collectives (runtime/distributed.py; the program calls the tscompile collectives on
the default process group, so one rank of a world-1 program needs no process group).
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import torch

from tscompile.kernels import direct_ops
from tscompile.plan import ParamPlan
from tscompile.runtime.shards import load_rank_tensors
from tscompile.tsprog import Tsprog, read_tsprog


def _model_module(prog: Tsprog) -> types.ModuleType:
    """The model file the program was compiled from: the installed one for built-in models
    (same source, checked), else the copy inside the .tsprog."""
    name = prog.manifest["model"]["module"]
    if name.startswith("tscompile.models."):
        module = importlib.import_module(name)
        if Path(module.__file__).read_text() == prog.model_source:
            return module
    key = f"tscompile_tsprog_model_{abs(hash(prog.model_source))}"
    if key not in sys.modules:
        module = types.ModuleType(key)
        module.__file__ = f"{prog.path}!model.py"
        sys.modules[key] = module
        exec(compile(prog.model_source, module.__file__, "exec"), module.__dict__)
    return sys.modules[key]


def model_config(prog: Tsprog) -> Any:
    module = _model_module(prog)
    fields = prog.manifest["model"]["config"]
    return module.CONFIG(**fields)


def _derived(prog: Tsprog, plans: dict[str, ParamPlan], rank: int, world: int,
             dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Buffers computed from the config (RoPE tables): build the model on meta, materialise
    only the modules that own such buffers, and slice them like any other tensor."""
    wanted = {n: p for n, p in plans.items() if p.kind == "derived"}
    if not wanted:
        return {}
    module = _model_module(prog)
    with torch.device("meta"):
        net = module.MODEL(model_config(prog))
    for m in net.modules():
        if hasattr(m, "init_buffers"):
            m.to_empty(device=device)
            m.init_buffers()
    buffers = dict(net.named_buffers())
    out = {}
    for name, p in wanted.items():
        t = buffers[name].to(dtype)
        if p.dim is not None:
            t = torch.cat([t.narrow(p.dim, a, b - a) for a, b in p.ranges(rank, world)], p.dim)
        out[name] = t.contiguous()
    return out


def pack_tensors(tensors: dict[str, torch.Tensor], packed: dict[str, dict]) -> None:
    """Build the manifest's packed tensors (passes/pack_linears.py) in place: each is this
    rank's parts concatenated along `dim`; a part no longer read by the program is dropped
    as soon as its pack exists, so at most one pack's worth of extra memory is held."""
    parts_left: dict[str, int] = {}
    for spec in packed.values():
        for p in spec["parts"]:
            parts_left[p] = parts_left.get(p, 0) + 1
    for name, spec in packed.items():
        missing = [p for p in spec["parts"] if p not in tensors]
        if missing:
            raise ValueError(f"packed tensor {name} needs {missing}, which were not loaded")
        tensors[name] = torch.cat([tensors[p] for p in spec["parts"]], spec["dim"])
        for p in spec["parts"]:
            parts_left[p] -= 1
            if not parts_left[p]:
                del tensors[p]


class RankProgram:
    """One rank of a compiled program with its tensors loaded."""

    def __init__(self, prog: Tsprog | str | Path, rank: int, *,
                 weights: str | Path | None = None, dummy_seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.prog = prog if isinstance(prog, Tsprog) else read_tsprog(prog)
        self.world = self.prog.world_size
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside the program's world of {self.world}")
        self.rank, self.dtype, self.device = rank, dtype, torch.device(device)
        self.plans = {n: ParamPlan.from_json(n, d)
                      for n, d in self.prog.manifest["tensors"].items()}
        self.tensors = load_rank_tensors(self.plans, rank, self.world, weights=weights,
                                         dummy_seed=dummy_seed, dtype=dtype, device=device)
        self.tensors.update(_derived(self.prog, self.plans, rank, self.world, dtype,
                                     self.device))
        pack_tensors(self.tensors, self.prog.manifest.get("packed", {}))
        namespace: dict[str, Any] = {"__name__": "tscompile_program"}
        exec(compile(self.prog.program_source, f"{self.prog.path}!program.py", "exec"),
             namespace)
        self._program_cls = namespace["Program"]
        self._program = None
        self.config = model_config(self.prog)
        self.caches: list[torch.Tensor] = []

    def kv_cache_shapes(self, num_blocks: int, page_size: int) -> dict[str, tuple[int, ...]]:
        out = {}
        for layer in self.prog.manifest["kv_cache"]["layers"]:
            shape = [num_blocks if s == "num_blocks" else page_size if s == "page_size" else s
                     for s in layer["shape"]]
            if layer["dim"] is not None:
                shape[layer["dim"]] //= self.world
            out[layer["name"]] = tuple(shape)
        return out

    def bind_kv_caches(self, num_blocks: int, page_size: int, *, dtype: torch.dtype,
                       device: torch.device | str) -> list[torch.Tensor]:
        if num_blocks <= 0 or page_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and page_size={page_size} must be "
                             f"positive")
        self.caches = []
        for name, shape in self.kv_cache_shapes(num_blocks, page_size).items():
            cache = torch.zeros(shape, dtype=dtype, device=device)
            self.tensors[name] = cache
            self.caches.append(cache)
        self._program = self._program_cls(self.rank, self.tensors, ops=direct_ops())
        return self.caches

    def unbind_kv_caches(self) -> None:
        """Drop the caches (and the program that holds them), e.g. after a profile run."""
        for layer in self.prog.manifest["kv_cache"]["layers"]:
            self.tensors.pop(layer["name"], None)
        self.caches, self._program = [], None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any
                 ) -> torch.Tensor:
        if self._program is None:
            raise RuntimeError("bind_kv_caches() before running the program")
        return self._program(input_ids, positions, meta)


