"""Deterministic dummy weights (benchmarks and tests in real shapes, no checkpoint).

What it is: `dummy_values`, the one rule that gives every tensor's values as a pure function
of (seed, name), and `init_dummy_weights`, which fills a whole single-device model by it.
Per-rank loading (runtime/shards.py) draws a rank's slice by the same rule, so a sharded
program on dummy weights equals the single-device model on them. What it is not: loading
checkpoints (runtime/weights.py, runtime/shards.py).
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

from tscompile.models.checkpoint import loadable_tensors


def _generator(seed: int, name: str, slab: int | None) -> torch.Generator:
    base = seed * 1_000_003 + zlib.crc32(name.encode())
    if slab is not None:
        base = base * 1_000_003 + slab + 1
    return torch.Generator().manual_seed(base & 0x7FFF_FFFF_FFFF_FFFF)


def _slab(name: str, shape: tuple[int, ...], seed: int, i: int) -> torch.Tensor:
    """Slab `i` (index i of dim 0) of a >= 3-D dummy tensor."""
    return torch.randn(shape[1:], generator=_generator(seed, name, i),
                       dtype=torch.float32) * shape[-1] ** -0.5


def dummy_values(name: str, shape: tuple[int, ...], seed: int, *, dim: int | None = None,
                 ranges: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Float32 dummy values of tensor `name`, a pure function of (seed, name): 1-D tensors
    whose name contains "norm" are 1, other 1-D tensors N(0, 1) * 0.02, matrices
    N(0, 1) * fan_in ** -0.5 with fan_in = shape[-1], drawn from one generator seeded by
    (seed, name). Tensors with >= 3 dims (stacked experts) are drawn slab by slab along
    dim 0, slab i from a generator seeded by (seed, name, i), so a rank that holds some
    slabs draws only those.

    With `dim` and `ranges` (a plan's sharded dim and `ranges(rank, world)`), returns the
    ranges of that dim concatenated in order, i.e. the rank's local tensor."""
    shape = tuple(shape)
    ranges = ranges if dim is not None else None
    if len(shape) < 3:
        if len(shape) == 1 and "norm" in name:
            full = torch.ones(shape, dtype=torch.float32)
        else:
            full = torch.randn(shape, generator=_generator(seed, name, None), dtype=torch.float32)
            full = full * (0.02 if len(shape) <= 1 else shape[-1] ** -0.5)
        return full if ranges is None else _take(full, dim, ranges)
    if shape[0] == 0:
        return torch.empty(shape)  # no slab to draw (torch.stack needs one)
    if dim == 0:
        # The point of the slab rule: draw only the slabs this rank holds.
        rows = [i for a, b in ranges for i in range(a, b)]
        return torch.stack([_slab(name, shape, seed, i) for i in rows])
    return torch.stack([_slab(name, shape, seed, i) if ranges is None else
                        _take(_slab(name, shape, seed, i), dim - 1, ranges)
                        for i in range(shape[0])])


def _take(t: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Deterministic random weights at a sensible scale, a pure function of (seed, name):
    matrices ~ N(0, 1/fan_in) with fan_in = shape[-1] (activations keep unit scale through
    the stack), 1-D norm weights 1, other 1-D tensors (biases, router correction biases)
    N(0, 1) * 0.02, each tensor from one generator seeded by (seed, name). Tensors with
    >= 3 dims (stacked experts) are drawn slab by slab along dim 0, slab i from a generator
    seeded by (seed, name, i), so a tensor-parallel rank can draw just its slabs and still
    get exactly the slice of these values (`dummy_values`, the rule's one implementation, shared
    by both paths)."""
    for name, t in sorted(loadable_tensors(model).items()):
        t.copy_(dummy_values(name, tuple(t.shape), seed))
