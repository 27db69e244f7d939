"""The paged KV-cache pool: allocation, binding to attention modules, and a block allocator.

What it is: one preallocated cache tensor per attention layer in the layout of
`kernels/paged.py`, bound to the module's `kv_cache` buffer (so the model and, later, CUDA
graphs see fixed addresses), plus a free list of block ids for the offline path.
What it is not: the serving scheduler's allocator with prefix sharing and eviction (that is
the C++ control plane in `runtime/csrc/`).
"""
from __future__ import annotations

import torch
from torch import nn


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "kv_cache_shape")]


def bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    """KV bytes one token costs across all layers (a page of 1 token in a 1-block pool)."""
    elem = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for _, m in attention_modules(model):
        n = 1
        for d in m.kv_cache_shape(1, 1):
            n *= d
        total += n * elem
    return total


def bind_kv_caches(model: nn.Module, num_blocks: int, page_size: int, *,
                   dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    """Allocate and bind one zeroed cache per attention layer; returns them in layer order."""
    if num_blocks <= 0 or page_size <= 0:
        raise ValueError(f"num_blocks={num_blocks} and page_size={page_size} must be positive")
    caches = []
    for name, m in attention_modules(model):
        cache = torch.zeros(m.kv_cache_shape(num_blocks, page_size), dtype=dtype, device=device)
        m.kv_cache = cache
        caches.append(cache)
    if not caches:
        raise ValueError(f"{type(model).__name__} has no attention module with kv_cache_shape()")
    return caches


class BlockAllocator:
    """A free list of physical block ids; every block is free or owned by exactly one caller."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache out of blocks: need {n}, {len(self._free)} free of "
                              f"{self.num_blocks}")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        owned = set(range(self.num_blocks)) - set(self._free)
        for b in blocks:
            if b not in owned:
                raise ValueError(f"block {b} freed but not allocated")
            owned.discard(b)
        self._free.extend(reversed(blocks))
