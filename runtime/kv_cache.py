"""The paged KV-cache pool: its size, allocation, binding to attention modules, and a block
allocator for the offline path.

What it is: one preallocated cache tensor per attention layer in the layout of
`kernels/paged.py`, bound to the module's `kv_cache` buffer (so the model and CUDA graphs
see fixed addresses); the pool's size in blocks (`kv_blocks`: explicit, or what GPU memory
leaves after the weights and a profiled largest step) and a rank's binding of it
(`bind_rank`), which every rank of a replica calls with the same numbers; a free list of
block ids for the offline path. What it is not: the serving scheduler's allocator with
prefix sharing and eviction (that is the C++ control plane in `runtime/csrc/`).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from tscompile.kernels import REGISTRY, build_metadata
from tscompile.runtime.cuda_graphs import StepGraphs

if TYPE_CHECKING:
    from tscompile.runtime.engine import EngineConfig
    from tscompile.runtime.program import RankProgram

log = logging.getLogger(__name__)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "kv_cache_shape")]


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


def bind_rank(program: RankProgram, cfg: EngineConfig, num_blocks: int, max_model_len: int,
              dtype: torch.dtype, device: torch.device) -> StepGraphs | None:
    """Give a rank its KV caches (the scheduler's `num_blocks` plus the scratch block that
    CUDA-graph padding writes to), run one warm-up step into the scratch block, and, on
    CUDA unless --enforce-eager, capture its step graphs (decode buckets, and mixed /
    prefill buckets unless the program has MLA layers: `prefill_capturable`). Every rank of a replica calls
    this with the same numbers, so they replay alike. Afterwards every kernel the program
    uses has been selected: the log names each one (and a CUDA run warns for each op that
    fell back to `reference`)."""
    program.bind_kv_caches(num_blocks + 1, cfg.page_size, dtype=cfg.cache_dtype(dtype),
                           device=device)
    warm_up(program, cfg.page_size, scratch_block=num_blocks, device=device)
    graphs = None
    if device.type == "cuda" and not cfg.enforce_eager:
        max_blocks = -(-max_model_len // cfg.page_size)
        prefill = cfg.prefill_buckets(max_blocks * cfg.page_size)
        if prefill and not prefill_capturable(program):
            log.info("MLA layers: the MLA prefill reads its context length back to the host, "
                     "so steps with prefill chunks run eagerly (counted as eager steps); "
                     "decode steps replay graphs")
            prefill = ()
        max_batch = cfg.max_graph_batch or cfg.max_num_seqs
        # Speculation: verify buckets for up to every sequence as a 1 + K token verify row.
        verify = (min(prefill[-1], max(prefill[0], max_batch * (1 + cfg.num_speculative_tokens)))
                  if cfg.speculative and prefill else 0)
        graphs = StepGraphs(program, max_batch=max_batch,
                            max_blocks=max_blocks, page_size=cfg.page_size,
                            scratch_block=num_blocks, device=device, prefill_sizes=prefill,
                            verify_tokens=verify)
    log.info("kernels: %s", ", ".join(f"{k}={v}" for k, v in REGISTRY.selections().items()))
    return graphs


def prefill_capturable(program: RankProgram) -> bool:
    """Whether the program's prefill attention can be captured in a CUDA graph: GQA
    layers (cache `[2, NB, PS, Hkv, D]`) can; MLA layers (cache `[NB, PS, R]`) cannot, as
    kernels/triton/mla.py `prefill` sizes its expanded context on the host."""
    return all(len(layer["shape"]) == 5 for layer in program.prog.manifest["kv_cache"]["layers"])


@torch.no_grad()
def warm_up(program: RankProgram, page_size: int, *, scratch_block: int,
            device: torch.device) -> None:
    """One step of a decode (1 token) and a prefill (2 tokens), both in the scratch block:
    selects the kernels of both paths before the first request, and on a GPU compiles them
    for these shapes (a long first prefill still compiles other variants on its path:
    benchmarks/results/first_prefill/README.md)."""
    prefill_blocks = [scratch_block] * -(-2 // page_size)
    meta = build_metadata([1, 2], [1, 2], [[scratch_block], prefill_blocks], page_size,
                          device=device)
    program(torch.zeros(3, dtype=torch.int64, device=device),
            torch.tensor([0, 0, 1], device=device), meta)


def activation_peak(program: RankProgram, cfg: EngineConfig, max_model_len: int,
                    dtype: torch.dtype, device: torch.device) -> int:
    """Bytes the largest step allocates beyond the weights (vLLM's profile run): one
    prefill chunk of max_num_batched_tokens tokens through a temporary cache, measured
    with the allocator's peak statistics. Every rank of a replica runs it (collectives)."""
    tokens = min(cfg.max_num_batched_tokens, max_model_len)
    blocks = -(-tokens // cfg.page_size)
    program.bind_kv_caches(blocks, cfg.page_size, dtype=cfg.cache_dtype(dtype), device=device)
    meta = build_metadata([tokens], [tokens], [list(range(blocks))], cfg.page_size,
                          device=device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    program(torch.zeros(tokens, dtype=torch.int64, device=device),
            torch.arange(tokens, device=device), meta)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    program.unbind_kv_caches()
    torch.cuda.empty_cache()
    log.info("profile run: a %d-token step needs %.0f MiB of activations", tokens,
             peak / 2**20)
    return peak


def kv_blocks(cfg: EngineConfig, program: RankProgram, dtype: torch.dtype,
              device: torch.device, max_model_len: int) -> int:
    """The scheduler's pool size in blocks: explicit tokens; else on CUDA a fraction of the
    memory left free by the weights and the profiled activation peak (less the scratch
    block); else (CPU) 16K tokens."""
    elem = torch.empty(0, dtype=cfg.cache_dtype(dtype)).element_size()
    bytes_per_token = program.prog.manifest["kv_cache"]["elements_per_token_per_rank"] * elem
    if cfg.kv_cache_tokens is not None:
        tokens = cfg.kv_cache_tokens
    elif device.type == "cuda":
        peak = activation_peak(program, cfg, max_model_len, dtype, device)
        free, _ = torch.cuda.mem_get_info(device)
        usable = int((free - peak) * (cfg.kv_memory_fraction or 0.9))
        if usable < bytes_per_token * cfg.page_size * 2:
            raise ValueError(f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB "
                             f"free after the weights, a {cfg.max_num_batched_tokens}-token "
                             f"step needs {peak / 2**30:.1f} GiB; lower "
                             f"--max-num-batched-tokens or use more GPUs")
        tokens = usable // max(1, bytes_per_token) - cfg.page_size
    else:
        tokens = 16384
    return max(1, tokens // cfg.page_size)
