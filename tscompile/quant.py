"""Quantized weights as checkpoints ship them, at build time: which Linear layers read
block-scaled FP8 weights, where their scales come from, and how the two shard together.

What it is, for `quantization_config: {quant_method: "fp8", weight_block_size: [bn, bk]}`
(DeepSeek-V3, Qwen3-FP8; `Fp8Block.from_hf`):
* `apply_fp8_block(model, pieces, quant)`: a model-independent rewrite of the meta model
  before tracing. Every `nn.Linear` whose checkpoint weights are all plain `<module>.weight`
  tensors of modules the config does not keep (`modules_to_not_convert` / `ignored_layers`,
  and always `lm_head`; tied weights are never quantized) becomes an `Fp8BlockLinear`:
  `weight` float8_e4m3fn [N, K] plus `weight_scale_inv` float32 [ceil(N/bn), ceil(K/bk)],
  whose forward is the one kernel op `fp8_block_linear`. Model files need no change.
* the scale's checkpoint pieces, derived from the weight's (`<key>_scale_inv`, its region
  divided by the block): a fused weight ([gate ; up]) gets the fused scale, and a piece that
  does not start on a block boundary is an error naming it;
* `check_fp8_blocks(stage, ...)`, run by the build right after `propagate`: a scale is placed
  like its weight (the `fp8_block_linear` rule shards the block grid on the weight's dim)
  and every rank's slice must be whole blocks; a block that straddles two ranks is an error
  naming the tensor, the block size and the rank's slice.
* `direct_reads(gm, done)`, right after `trace`: a quantized Linear whose weight the model
  reads itself (a router's fp32 matmul, MLA's absorbed `kv_b_proj`) would see FP8 codes
  without their scales; the build then starts over with those Linears left unquantized,
  and their plans say `dequantize: [bn, bk]` (runtime/shards.py multiplies an FP8
  checkpoint tensor by its block scales while loading it).
What it is not: the kernel (kernels/fp8.py), the converter that writes such checkpoints
(tscompile/quantize.py), MoE experts or INT4 (issue 19, later).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tscompile.annotations import Shard
from tscompile.kernels.fp8 import FP8, fp8_block_linear
from tscompile.models.checkpoint import Piece

SCALE_SUFFIX = "_scale_inv"          # <module>.weight -> <module>.weight_scale_inv
ALWAYS_KEPT = ("lm_head",)           # HF keeps the output embedding in full precision


@dataclass(frozen=True, slots=True)
class Fp8Block:
    """A checkpoint's block-scaled FP8 quantization: block [bn, bk] and the modules it keeps."""
    block: tuple[int, int] = (128, 128)
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.block) != 2 or any(not isinstance(b, int) or b <= 0 for b in self.block):
            raise ValueError(f"weight_block_size must be two positive ints, got "
                             f"{list(self.block)}")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Fp8Block | None:
        """From an HF config dict (its `quantization_config`); None when not quantized."""
        q = config.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method")
        if method != "fp8":
            raise ValueError(f"quantization_config.quant_method {method!r} is not supported; "
                             f"supported: 'fp8' with weight_block_size (block-scaled FP8)")
        if not q.get("weight_block_size"):
            raise ValueError("quantization_config: fp8 without weight_block_size (per-tensor "
                             "FP8) is not supported; hint: block-scaled checkpoints set "
                             "weight_block_size: [128, 128]")
        keep = q.get("modules_to_not_convert") or q.get("ignored_layers") or ()
        return cls(tuple(q["weight_block_size"]), tuple(keep))

    def to_hf(self) -> dict[str, Any]:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(self.block),
                "modules_to_not_convert": list(self.modules_to_not_convert)}

    def keeps(self, module: str) -> bool:
        """Whether checkpoint module `module` stays unquantized: it, or a dotted run of its
        name, is listed (`lm_head` always)."""
        padded = f".{module}."
        return any(f".{m}." in padded for m in (*ALWAYS_KEPT, *self.modules_to_not_convert))


class Fp8BlockLinear(nn.Module):
    """`nn.Linear` over a block-scaled FP8 weight, as the checkpoint stores it."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 block: Sequence[int], device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, list(block)
        grid = (-(-out_features // block[0]), -(-in_features // block[1]))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8,
                                               device=device), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(grid, dtype=torch.float32,
                                                         device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_block_linear(x, self.weight, self.weight_scale_inv, self.bias, self.block)


def hf_quantization(config: str | Any | None) -> Fp8Block | None:
    """The quantization of an HF config (dict, or config.json file/folder); None for a preset."""
    if config is None:
        return None
    if isinstance(config, dict):
        return Fp8Block.from_hf(config)
    import json
    from pathlib import Path
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    return Fp8Block.from_hf(json.loads(path.read_text()))


@dataclass
class Quantized:
    """What `apply_fp8_block` did: weight name -> scale name, and the model's pieces with
    the scales' (the build's plan uses these instead of resolving the map again)."""
    quant: Fp8Block
    scales: dict[str, str] = field(default_factory=dict)
    pieces: list[Piece] = field(default_factory=list)
    # Weights of Linears the model reads directly (kept unquantized in the program): the
    # loader dequantizes them if the checkpoint stores them FP8.
    dequantized: set[str] = field(default_factory=set)

    def stored(self) -> dict[str, str]:
        """Tensor name -> the dtype it is held in whatever the run's dtype."""
        out = {w: "float8_e4m3fn" for w in self.scales}
        out.update({s: "float32" for s in self.scales.values()})
        return out


def _shared(model: nn.Module) -> set[str]:
    """Names of parameters that are one tensor under several names (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}


def apply_fp8_block(model: nn.Module, pieces: Iterable[Piece], quant: Fp8Block,
                    direct: Iterable[str] = ()) -> Quantized:
    """Swap the quantized `nn.Linear`s of a meta `model` for `Fp8BlockLinear`s (in place).
    `pieces`: `resolve(model, CHECKPOINT_MAP)` of the unquantized model. `direct`: weight
    names the model reads itself (`direct_reads`), left as Linears and dequantized at load."""
    direct = set(direct)
    pieces = list(pieces)
    by_param: dict[str, list[Piece]] = {}
    for p in pieces:
        by_param.setdefault(p.param, []).append(p)
    shared = _shared(model)
    done = Quantized(quant)
    for path, m in list(model.named_modules()):
        if type(m) is not nn.Linear:
            continue
        name = f"{path}.weight"
        keys = [p.ckpt for p in by_param.get(name, ())]
        if name in shared or not keys or any(
                not k.endswith(".weight") or quant.keeps(k.removesuffix(".weight"))
                for k in keys):
            continue
        if name in direct:
            done.dequantized.add(name)
            continue
        parent, _, child = path.rpartition(".")
        new = Fp8BlockLinear(m.in_features, m.out_features, m.bias is not None, quant.block,
                             device=m.weight.device)
        setattr(model.get_submodule(parent) if parent else model, child, new)
        done.scales[name] = name + SCALE_SUFFIX
    for p in pieces:
        done.pieces.append(p)
        if p.param in done.scales:
            done.pieces.append(_scale_piece(p, done.scales[p.param], quant.block,
                                            tuple(model.get_parameter(p.param).shape)))
    return done


def _scale_piece(p: Piece, scale: str, block: Sequence[int], shape: tuple[int, ...]) -> Piece:
    """The piece of `scale` that checkpoint tensor `<p.ckpt>_scale_inv` fills: p's region of
    the weight, in blocks. The region must start on a block boundary and end on one (or at
    the end of the dim), or its blocks are not the checkpoint's."""
    index: list[slice] = []
    for d, (i, size, b) in enumerate(zip(p.index, shape, block)):
        start, stop, _ = i.indices(size)
        if start % b or (stop % b and stop != size):
            raise ValueError(
                f"checkpoint tensor {p.ckpt!r} fills [{start}, {stop}) of {p.param} dim {d}, "
                f"which is not whole {b}-blocks (FP8 block {list(block)}): its "
                f"{p.ckpt + SCALE_SUFFIX!r} cannot be placed in the fused scale; hint: the "
                f"fused parts must be multiples of the block size")
        index.append(slice(start // b, -(-stop // b)))
    grid = tuple(-(-s // b) for s, b in zip(p.shape, block))
    return Piece(scale, tuple(index), grid, p.ckpt + SCALE_SUFFIX)


def check_fp8_blocks(placements: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                     done: Quantized, world: int) -> None:
    """Every rank's slice of a quantized weight is whole blocks, and its scale is split the
    same way (S(0) weight -> S(0) scale rows, S(1) -> S(1) scale columns)."""
    for weight, scale in done.scales.items():
        p, ps = placements.get(weight), placements.get(scale)
        assert p == ps, f"{weight} is {p} but its scale {scale} is {ps}"  # the rule's job
        if not isinstance(p, Shard) or world == 1:
            continue
        size, b = shapes[weight][p.dim], done.quant.block[p.dim]
        if size % (p.chunks * world):
            continue                     # localize names the size that does not divide
        chunk = size // p.chunks
        part = chunk // world
        if part % b:
            what = "rows" if p.dim == 0 else "columns"
            of = f" of each of its {p.chunks} fused chunks" if p.chunks > 1 else ""
            raise ValueError(
                f"cannot shard FP8 weight {weight} [{', '.join(map(str, shapes[weight]))}] "
                f"on dim {p.dim} over {world} ranks: rank 0 would hold {what} [0, {part})"
                f"{of}, but its scales cover {b}-{what[:-1]} blocks (weight_block_size "
                f"{list(done.quant.block)}), so block [{part // b * b}, {part // b * b + b}) "
                f"straddles ranks 0 and 1; hint: a tp "
                f"degree with {part * world} / tp a multiple of {b}, or list the module in "
                f"quantization_config.modules_to_not_convert")


def direct_reads(gm, done: Quantized) -> list[str]:
    """After tracing: the FP8 weights read other than by their module's `fp8_block_linear`
    (an MoE router's fp32 matmul on `gate.weight`, MLA's absorbed `kv_b_proj.weight`): as
    FP8 codes without their scales they would be wrong, so the build keeps those Linears
    unquantized (`apply_fp8_block(direct=...)`) and the loader dequantizes their weights."""
    target = torch.ops.tscompile.fp8_block_linear.default
    return sorted(n.target for n in gm.graph.nodes
                  if n.op == "get_attr" and n.target in done.scales
                  and any(not (u.op == "call_function" and u.target is target) for u in n.users))


# `tscompile build --quant`: quantize a preset (dummy-weight runs, per-rank byte reports):
# every Linear the model calls, as in DeepSeek-V3's checkpoints (the ones it reads itself,
# routers and MLA's kv_b_proj, stay unquantized: `direct_reads`).
BUILD_QUANT = {"fp8-block": lambda: Fp8Block((128, 128))}
