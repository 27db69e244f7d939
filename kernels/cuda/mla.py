"""CUDA sm_90a paged MLA decode (`mla_decode_sm90.cu`): backend "cuda" of `mla_decode`, and
`mla_decode_folded` for q_len > 1 query tokens per sequence.

What it is: the host side of the warp-specialised Hopper kernel (the kernel's header comment
says how it works): argument checks, the split count (the Triton kernel's rule with one
program per SM), the launch through ctypes on the current stream (CUDA-graph capturable once
built and loaded: the first call, outside any capture, builds and loads it), and the merge of
the split partials by the Triton reduce kernel. Shapes: kv_lora_rank 512, rope 64 (DeepSeek
V3 / Kimi K2.5), bf16 query and cache, page size a multiple of 8 up to 64 or a multiple of
64, 32 or more query rows per sequence (below that the Triton kernel's 16-row tile already
reads the cache at the bandwidth roof and this kernel's 64-row tile would waste rows).
What it is not: fp8 caches (the Triton kernel takes those), prefill.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from ..registry import Query, Requirements, register
from . import library, unavailable

ARCH = (9, 0)
RANK, ROPE = 512, 64
MIN_ROWS = 32
_LOG2E = 1.4426950408889634


def page_size_ok(page_size: int) -> bool:
    return (page_size <= 64 and page_size % 8 == 0 and 64 % page_size == 0) or \
        page_size % 64 == 0


def _shape_check(q: Query) -> str | None:
    rank, rope = q.get("kv_lora_rank"), q.get("rope_dim")
    if (rank, rope) != (RANK, ROPE):
        return f"kv_lora_rank/rope_dim {rank}/{rope}; the kernel is built for {RANK}/{ROPE}"
    if (heads := q.get("heads")) is not None and heads < MIN_ROWS:
        return f"{heads} heads: under {MIN_ROWS} rows the Triton 16-row kernel serves"
    if (page := q.get("page_size")) is not None and not page_size_ok(page):
        return f"page size {page}: needs a multiple of 8 dividing 64, or of 64"
    if (item := q.get("cache_itemsize")) is not None and item != 2:
        return f"cache of {item}-byte elements: the kernel reads a bf16 cache"
    return None


def _available() -> str | None:
    from ..triton import AVAILABLE
    if not AVAILABLE:
        return "triton not importable (it merges the split partials)"
    return unavailable(ARCH)


REQ = Requirements(devices=frozenset({"cuda"}), min_arch=ARCH, max_arch=ARCH,
                   dtypes=frozenset({torch.bfloat16}), shape_check=_shape_check,
                   available=_available)


@functools.cache
def _launcher():
    lib = library("mla_decode_sm90")
    fn = lib.tsc_mla_decode_sm90
    p, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    fn.argtypes = [p, i64, i64, p, i64, p, i64, p, p, i64, i64, p, p, ctypes.c_float,
                   i32, i32, i32, i32, i32, i32, p]
    fn.restype = ctypes.c_int
    return fn


def decode_rows(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, scale: float, kv_lora_rank: int, *, q_len: int = 1,
                splits: int | None = None) -> torch.Tensor:
    """q [B, M = q_len * H, 576] bf16 (row m: token m // H, head m % H) -> [B, M, 512]."""
    from ..triton import mla as tmla

    batch, rows, width = q.shape
    if q.dtype != torch.bfloat16 or kv_cache.dtype != torch.bfloat16:
        raise ValueError(f"mla decode (cuda): q and cache must be bf16, got {q.dtype} and "
                         f"{kv_cache.dtype}")
    if kv_lora_rank != RANK or width != RANK + ROPE or kv_cache.shape[-1] != width:
        raise ValueError(f"mla decode (cuda): rows of {RANK} + {ROPE} only, got "
                         f"kv_lora_rank={kv_lora_rank}, q width {width}, cache rows "
                         f"{kv_cache.shape[-1]}")
    if rows % q_len:
        raise ValueError(f"mla decode: {rows} query rows are not q_len={q_len} tokens x heads")
    page_size = kv_cache.shape[1]
    if not page_size_ok(page_size):
        raise ValueError(f"mla decode (cuda): page size {page_size} unsupported")
    if not kv_cache.is_contiguous():
        raise ValueError("mla decode (cuda): the cache must be contiguous (TMA over its rows)")
    out = q.new_empty(batch, rows, RANK)
    if batch == 0 or rows == 0:
        return out
    if q.stride(-1) != 1 or q.stride(0) % 8 or q.stride(1) % 8 or q.data_ptr() % 16:
        q = q.contiguous()
    block_tables = block_tables.to(torch.int32)
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    groups = -(-rows // 64)
    if splits is None:
        splits = tmla.num_splits(batch, groups, block_tables.shape[1] * page_size, q.device,
                                 programs_per_sm=1)
    part_o, part_lse = tmla.split_partials(out, splits)
    err = _launcher()(
        q.data_ptr(), q.stride(0), q.stride(1), kv_cache.data_ptr(),
        kv_cache.shape[0] * page_size, block_tables.data_ptr(), block_tables.stride(0),
        seq_lens.data_ptr(), out.data_ptr(), out.stride(0), out.stride(1),
        part_o.data_ptr(), part_lse.data_ptr(), scale * _LOG2E, batch, rows, rows // q_len,
        q_len, splits, page_size,
        torch.cuda.current_stream(q.device).cuda_stream)
    if err:
        raise RuntimeError(f"mla decode (cuda) launch failed: error {err}")
    if splits > 1:
        tmla.reduce_partials(part_o, part_lse, out)
    return out


def mla_decode_folded(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                      **launch) -> torch.Tensor:
    """q [B, Q, H, R] -> [B, Q, H, L]: the Triton `mla_decode_folded` contract (token i at
    position seq_lens - Q + i, causal among the Q tokens), one pass over the cache."""
    from ..triton.mla import fold_query_tokens

    return fold_query_tokens(decode_rows, q, kv_cache, block_tables, seq_lens, scale,
                             kv_lora_rank, **launch)


@register("mla_decode", "cuda", priority=20, requires=REQ)
def mla_decode_cuda(q, kv_cache, block_tables, seq_lens, scale, kv_lora_rank):
    return decode_rows(q, kv_cache, block_tables, seq_lens, scale, kv_lora_rank)
