"""The sharding plan: for every parameter and buffer of a compiled program, its global shape,
its placement over the group and where its values come from in the checkpoint.

What it is: plain frozen values the compiler writes into `manifest.json` and the runtime
reads back to load only each rank's slice. What it is not: the rules that choose placements
(`passes/`) or the loader itself (`runtime/shards.py`).

Slicing convention. A parameter sharded on `dim` over a group of `world` ranks gives rank r
the r-th of `world` equal contiguous parts of that dim. With `chunks=k` (a fused projection
such as `gate_up_proj` = [gate ; up]) the dim is first cut into k equal chunks and every
chunk is split the same way; rank r's local tensor is its part of chunk 0, then of chunk 1,
... concatenated, so `silu_and_mul` still sees [gate_r ; up_r] locally.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("param", "buffer", "derived", "kv_cache")


@dataclass(frozen=True, slots=True)
class CheckpointPiece:
    """Checkpoint tensor `key` fills `region` of the (global) parameter: one (start, stop)
    per parameter dim; a dim the piece does not span is (i, i + 1) with `squeeze` listing
    it (stacked experts: piece e covers dim 0 = (e, e + 1) of a [E, ...] parameter)."""
    key: str
    region: tuple[tuple[int, int], ...]
    squeeze: tuple[int, ...] = ()

    def to_json(self) -> list[Any]:
        return [self.key, [list(r) for r in self.region], list(self.squeeze)]

    @classmethod
    def from_json(cls, d: list[Any]) -> CheckpointPiece:
        return cls(d[0], tuple((a, b) for a, b in d[1]), tuple(d[2]))


@dataclass(frozen=True, slots=True)
class ParamPlan:
    name: str                          # model tensor name, e.g. layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]             # global (single-device) shape
    dtype: str                         # torch dtype name without "torch.", e.g. "float32"
    kind: str                          # param | buffer (persistent) | derived | kv_cache
    dim: int | None = None             # sharded dim (None: replicated)
    chunks: int = 1                    # see module docstring
    pieces: tuple[CheckpointPiece, ...] = ()
    # The dtype the tensor is loaded and kept in whatever the run's dtype: the stored
    # precision of a quantized weight ("float8_e4m3fn") and of its scales ("float32"), which
    # the kernels read as stored. None: the run's dtype (--dtype), cast from the checkpoint.
    stored: str | None = None
    # [bn, bk]: the checkpoint may hold this tensor block-scaled FP8 (with
    # `<key>_scale_inv`) although the program reads it unquantized (a Linear whose weight
    # the model reads itself, e.g. MLA's absorbed kv_b_proj): dequantized while loading.
    dequantize: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ParamPlan {self.name}: kind {self.kind!r} not in {KINDS}")
        if self.dim is not None and not 0 <= self.dim < len(self.shape):
            raise ValueError(f"ParamPlan {self.name}: dim {self.dim} outside shape {self.shape}")

    @property
    def placement(self) -> str:
        if self.dim is None:
            return "R"
        return f"S({self.dim})" + (f"x{self.chunks}" if self.chunks > 1 else "")

    def check(self, world: int) -> None:
        """Raise if `world` ranks cannot split this tensor evenly."""
        if self.dim is None:
            return
        size = self.shape[self.dim]
        if size % (self.chunks * world):
            what = f"{self.chunks} chunks x " if self.chunks > 1 else ""
            raise ValueError(f"cannot shard {self.name} dim {self.dim} (size {size}) into "
                             f"{what}{world} ranks: {size} % {self.chunks * world} != 0")

    def ranges(self, rank: int, world: int) -> list[tuple[int, int]]:
        """Global [start, stop) intervals of the sharded dim that `rank` holds, in local
        order (the whole dim when replicated)."""
        if self.dim is None:
            return [(0, self.shape[0] if self.shape else 1)]
        self.check(world)
        chunk = self.shape[self.dim] // self.chunks
        part = chunk // world
        return [(k * chunk + rank * part, k * chunk + (rank + 1) * part)
                for k in range(self.chunks)]

    def local_shape(self, world: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        self.check(world)
        return tuple(s // world if i == self.dim else s for i, s in enumerate(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "kind": self.kind,
                "placement": self.placement, "dim": self.dim, "chunks": self.chunks,
                "pieces": [p.to_json() for p in self.pieces], "stored": self.stored,
                "dequantize": list(self.dequantize) if self.dequantize else None}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> ParamPlan:
        return cls(name, tuple(d["shape"]), d["dtype"], d["kind"], d["dim"], d["chunks"],
                   tuple(CheckpointPiece.from_json(p) for p in d["pieces"]), d.get("stored"),
                   tuple(d["dequantize"]) if d.get("dequantize") else None)
