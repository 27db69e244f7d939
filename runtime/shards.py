"""Per-rank weight loading for tensor-parallel programs: each rank builds only its local
slice of every parameter, from a safetensors checkpoint or from dummy weights.

What it is: `load_rank_tensors(plans, rank, world, ...)` reads the compiler's sharding plan
(`tscompile.plan.ParamPlan`, one per model tensor) and returns `{name: local tensor}` of shape
`plan.local_shape(world)`. Checkpoint values are read with safetensors' `get_slice`, so a
rank touches only the bytes of its own ranges (a piece that misses the rank's ranges is not
read at all). Dummy values equal slicing `init_dummy_weights`' full tensors (`dummy_values`
holds that one rule for both paths).

What it is not: the plan (`tscompile/plan.py`, written by the compiler), placement choice
(`passes/`), the single-device loader (`runtime/weights.py: load_checkpoint`) or the
communication between ranks (every rank loads independently). Derived buffers (RoPE tables)
and KV caches are not loaded: the runtime makes them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tscompile.plan import CheckpointPiece, ParamPlan
from tscompile.runtime.dummy_weights import dummy_values
from tscompile.runtime.weights import Checkpoint

LOADED_KINDS = ("param", "buffer")
# A plan's stored precision (ParamPlan.stored) as a torch dtype and as safetensors names it.
_STORED = {"float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3"), "float32": (torch.float32, "F32")}

Box = tuple[tuple[int, int], ...]  # one [start, stop) per dim


# ------------------------------------------------------------------------------ checkpoint

class SlicedCheckpoint(Checkpoint):
    """`Checkpoint` plus reading a box of a tensor without reading the rest of it."""

    def read(self, key: str, box: Box) -> torch.Tensor:
        handle = self._open(self._where[key])
        return handle.get_slice(key)[tuple(slice(a, b) for a, b in box)]


def _piece_writes(plan: ParamPlan, piece: CheckpointPiece, rank: int,
                  world: int) -> list[tuple[Box, Box]]:
    """(checkpoint box, local box) pairs: the part of `piece` that this rank holds. The
    checkpoint box has no squeezed dims; the local box has all of the parameter's dims."""
    region = piece.region
    keep = [d for d in range(len(region)) if d not in piece.squeeze]
    if plan.dim is None:
        return [(tuple((0, region[d][1] - region[d][0]) for d in keep), region)]
    d = plan.dim
    a, b = region[d]
    part = plan.shape[d] // (plan.chunks * world)
    out = []
    for j, (g0, g1) in enumerate(plan.ranges(rank, world)):
        lo, hi = max(a, g0), min(b, g1)
        if lo >= hi:
            continue  # this piece lies outside that range: nothing of it is read
        local = list(region)
        local[d] = (j * part + lo - g0, j * part + hi - g0)
        src = [(lo - a, hi - a) if k == d else (0, region[k][1] - region[k][0]) for k in keep]
        out.append((tuple(src), tuple(local)))
    return out


def _check_piece(plan: ParamPlan, piece: CheckpointPiece, ckpt: SlicedCheckpoint) -> None:
    region = piece.region
    bad = len(region) != len(plan.shape) or any(
        not 0 <= a < b <= s for (a, b), s in zip(region, plan.shape)) or any(
        region[d][1] - region[d][0] != 1 for d in piece.squeeze if d < len(region))
    if bad:
        raise ValueError(f"plan for {plan.name}: piece {piece.key!r} has region "
                         f"{[list(r) for r in region]} (squeeze {list(piece.squeeze)}), which "
                         f"is not inside shape {list(plan.shape)}; hint: rebuild the plan "
                         f"from the model's CHECKPOINT_MAP (models/checkpoint.py: plan_pieces)")
    if piece.key not in ckpt:
        raise KeyError(f"checkpoint {ckpt.dir} is missing tensor {piece.key!r}, needed by "
                       f"parameter {plan.name}; hint: is this the checkpoint the program "
                       f"was compiled for?")
    _check_precision(plan, piece, ckpt)
    expected = tuple(b - a for d, (a, b) in enumerate(region) if d not in piece.squeeze)
    found = ckpt.shape(piece.key)
    if found != expected:
        raise ValueError(f"checkpoint tensor {piece.key!r} has shape {list(found)} but "
                         f"parameter {plan.name} expects {list(expected)} for region "
                         f"{[list(r) for r in region]}; hint: the checkpoint's config does not "
                         f"match the compiled model's")


def _check_precision(plan: ParamPlan, piece: CheckpointPiece, ckpt: SlicedCheckpoint) -> None:
    """A quantized tensor must be stored as the program reads it (the reverse, an FP8
    tensor read into an unquantized plan, is refused by `_read`)."""
    if plan.stored is None:
        return
    found = ckpt.dtype(piece.key)
    if found != _STORED[plan.stored][1]:
        raise ValueError(f"checkpoint tensor {piece.key!r} is {found} but the program reads "
                         f"{plan.name} as {plan.stored}; hint: compile with this checkpoint's "
                         f"config.json (its quantization_config)")


def _check_exactly_once(plan: ParamPlan, shape: tuple[int, ...],
                        boxes: list[tuple[Box, str]]) -> None:
    """Every local element written exactly once <=> the boxes lie inside `shape`, are
    pairwise disjoint and their volumes add up to numel. Checked on box coordinates, not
    with a per-element counter that would double the memory of a large shard."""
    def volume(box: Box) -> int:
        n = 1
        for a, b in box:
            n *= b - a
        return n

    def overlap(x: Box, y: Box) -> bool:
        return all(a0 < b1 and a1 < b0 for (a0, b0), (a1, b1) in zip(x, y))

    numel = volume(tuple((0, s) for s in shape))
    total = sum(volume(b) for b, _ in boxes)
    # Sweep along dim 0: only boxes whose dim-0 spans meet can overlap (stacked experts give
    # hundreds of pieces per parameter, all but a few disjoint on dim 0).
    order = sorted(boxes, key=lambda bk: bk[0][0] if shape else (0, 0))
    active: list[tuple[Box, str]] = []
    for box, key in order:
        if shape:
            active = [(b, k) for b, k in active if b[0][1] > box[0][0]]
        for other, okey in active:
            if overlap(box, other):
                raise ValueError(f"plan for {plan.name}: pieces {okey!r} and {key!r} write the "
                                 f"same elements of the local tensor; hint: the plan's pieces "
                                 f"must tile the parameter without overlap")
        active.append((box, key))
    if total != numel:
        raise ValueError(f"plan for {plan.name}: pieces write {total} of the {numel} elements "
                         f"of the local tensor {list(shape)}; hint: the plan's pieces must "
                         f"cover the whole parameter (is a checkpoint rule missing?)")


def _plan_writes(plan: ParamPlan, ckpt: SlicedCheckpoint, rank: int,
                 world: int) -> list[tuple[str, Box, Box]]:
    """Checks `plan` against the checkpoint and returns its reads: (key, checkpoint box,
    local box)."""
    if not plan.pieces:
        raise ValueError(f"plan for {plan.name} ({plan.kind}) has no checkpoint pieces, so "
                         f"there is nothing to load it from; hint: compile with the model's "
                         f"CHECKPOINT_MAP, or load with dummy weights")
    for piece in plan.pieces:
        _check_piece(plan, piece, ckpt)
    writes = [(piece.key, src, dst) for piece in plan.pieces
              for src, dst in _piece_writes(plan, piece, rank, world)]
    _check_exactly_once(plan, plan.local_shape(world), [(dst, key) for key, _, dst in writes])
    return writes


def _dequantized(ckpt: SlicedCheckpoint, key: str, src: Box, values: torch.Tensor,
                 block: tuple[int, int]) -> torch.Tensor:
    """FP8 `values` (the checkpoint box `src` of 2-D tensor `key`) times their block scales
    (`<key>_scale_inv`, the blocks the box touches), in fp32."""
    scale_key = key + "_scale_inv"
    if len(src) != 2 or scale_key not in ckpt:
        raise ValueError(f"checkpoint tensor {key!r} is float8_e4m3fn, but "
                         f"{scale_key!r} (its [{block[0]}, {block[1]}] block scales) is "
                         f"missing or it is not 2-D, so it cannot be dequantized")
    (r0, r1), (c0, c1) = src
    (bn, bk) = block
    box = ((r0 // bn, -(-r1 // bn)), (c0 // bk, -(-c1 // bk)))
    scale = ckpt.read(scale_key, box).float()
    scale = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    scale = scale[r0 - box[0][0] * bn:r1 - box[0][0] * bn, c0 - box[1][0] * bk:c1 - box[1][0] * bk]
    return values.reshape(r1 - r0, c1 - c0).float() * scale


def _read(ckpt: SlicedCheckpoint, shape: tuple[int, ...], writes: list[tuple[str, Box, Box]],
          dtype: torch.dtype, device, dequantize: tuple[int, int] | None = None
          ) -> torch.Tensor:
    local = torch.empty(shape, dtype=dtype, device=device)
    for key, src, dst in writes:
        # Squeezed dims (stacked experts) come back as size-1 dims of the local box.
        values = ckpt.read(key, src)
        if values.dtype == torch.float8_e4m3fn and dequantize and dtype != values.dtype:
            values = _dequantized(ckpt, key, src, values, dequantize)
        values = values.reshape(tuple(b - a for a, b in dst))
        if values.dtype == torch.float8_e4m3fn and dtype != values.dtype:
            raise ValueError(f"checkpoint tensor {key!r} is float8_e4m3fn (quantized) but the "
                             f"program was compiled with it unquantized, and casting it "
                             f"would drop its scales; hint: compile with this checkpoint's "
                             f"config.json, whose quantization_config makes it an FP8 linear")
        local[tuple(slice(a, b) for a, b in dst)].copy_(values.to(dtype))
    return local


# ---------------------------------------------------------------------------------- entry

@torch.no_grad()
def load_rank_tensors(plans: dict[str, ParamPlan], rank: int, world: int, *,
                      weights: str | Path | None = None, dummy_seed: int | None = None,
                      dtype: torch.dtype, device: torch.device | str = "cpu",
                      ) -> dict[str, torch.Tensor]:
    """`{name: local tensor}` (shape `plan.local_shape(world)`, `dtype`, on `device`) for
    every plan of kind param or buffer; derived buffers and KV caches are skipped.

    Give exactly one source. `weights`: a checkpoint folder (one `*.safetensors` or a
    sharded `model.safetensors.index.json`); each plan piece is intersected with the rank's
    ranges and only that sub-box is read. `dummy_seed`: values identical to slicing the
    full tensors of `init_dummy_weights(model, dummy_seed)` (see `dummy_values`).

    Raises ValueError for a bad rank, a size that `world` does not divide, a checkpoint
    tensor of the wrong shape, a plan without pieces or pieces that do not write every
    local element exactly once; KeyError for a tensor missing from the checkpoint. Every
    plan is checked before any values are read."""
    if (weights is None) == (dummy_seed is None):
        raise ValueError("load_rank_tensors: give exactly one of weights=DIR or dummy_seed=N")
    if not 0 <= rank < world:
        raise ValueError(f"load_rank_tensors: rank {rank} is outside a group of {world} ranks")
    todo = {name: p for name, p in plans.items() if p.kind in LOADED_KINDS}
    for p in todo.values():
        p.check(world)  # every divisibility error before a single byte is read
    if dummy_seed is not None:
        return {name: _dummy(p, rank, world, dummy_seed).to(device=device,
                                                            dtype=_dtype(p, dtype))
                for name, p in todo.items()}
    with SlicedCheckpoint(weights) as ckpt:
        writes = {name: _plan_writes(p, ckpt, rank, world) for name, p in todo.items()}
        return {name: _read(ckpt, p.local_shape(world), writes[name], _dtype(p, dtype), device,
                            p.dequantize)
                for name, p in todo.items()}


def _dtype(plan: ParamPlan, run: torch.dtype) -> torch.dtype:
    return run if plan.stored is None else _STORED[plan.stored][0]


def _dummy(plan: ParamPlan, rank: int, world: int, seed: int) -> torch.Tensor:
    """Dummy values; an FP8 weight's are its float dummy values cast to FP8, with block
    scales of 1 (so the dequantized weight is the FP8 rounding of the float one)."""
    if plan.stored == "float32" and plan.name.endswith("_scale_inv"):
        return torch.ones(plan.local_shape(world))
    return dummy_values(plan.name, plan.shape, seed, dim=plan.dim, ranges=plan.ranges(rank, world))
