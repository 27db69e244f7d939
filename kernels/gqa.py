"""Paged grouped-query attention (GQA; MHA and MQA are the cases Hkv = Hq and Hkv = 1).

Ops (layout and metadata: `kernels/paged.py`; legend there):
* `tscompile::gqa_decode(q [B, Hq, D], kv_cache, block_tables, seq_lens, scale) -> [B, Hq, D]`
  one query token per sequence over its whole cached context.
* `tscompile::gqa_prefill(q [T, Hq, D], kv_cache, block_tables, query_start_loc, seq_lens,
  scale) -> [T, Hq, D]` a chunk per sequence over its cached prefix plus itself (causal).
* `tscompile::gqa_attention(q, k, v, kv_cache, slot_mapping, block_tables, query_start_loc,
  seq_lens, num_decodes, scale) -> [T, Hq, D]` what a model calls: writes this step's K/V
  into `kv_cache` (mutated in place), then runs decode for the first `num_decodes`
  sequences and prefill for the rest. One fx node per layer.

Napkin math, decode: bytes = 2 * L * Hkv * D * elem per sequence (K and V read once),
FLOPs = 4 * L * Hq * D, so arithmetic intensity ~ Hq/Hkv FLOP/byte: memory bound.
The references below loop over sequences in plain torch (fp32 softmax): slow, obvious,
the oracle for the GPU kernels.
"""
from __future__ import annotations

import torch

from .paged import gather_pages, write_slots
from .registry import dispatch, kernel_op, register


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of n queries at the end of an L-long context.
    q [n, Hq, D], k/v [L, Hkv, D] -> [n, Hq, D]; query i sits at position L - n + i."""
    n, hq, _ = q.shape
    length, hkv, _ = k.shape
    rep = hq // hkv
    k = k.float().repeat_interleave(rep, dim=1)                # [L, Hq, D]
    v = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale  # [Hq, n, L]
    q_pos = torch.arange(length - n, length, device=q.device)[:, None]
    k_pos = torch.arange(length, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)


@register("gqa_decode", "reference")
def gqa_decode_reference(q, kv_cache, block_tables, seq_lens, scale):
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        length = int(seq_lens[b])
        k = gather_pages(kv_cache[0], block_tables[b], length)
        v = gather_pages(kv_cache[1], block_tables[b], length)
        out[b : b + 1] = _attend(q[b : b + 1], k, v, scale)
    return out


@register("gqa_prefill", "reference")
def gqa_prefill_reference(q, kv_cache, block_tables, query_start_loc, seq_lens, scale):
    out = torch.empty_like(q)
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        length = int(seq_lens[b])
        k = gather_pages(kv_cache[0], block_tables[b], length)
        v = gather_pages(kv_cache[1], block_tables[b], length)
        out[start:end] = _attend(q[start:end], k, v, scale)
    return out


def _check_cache(q: torch.Tensor, kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"GQA kv_cache must be [2, num_blocks, page_size, kv_heads, head_dim], "
                         f"got {list(kv_cache.shape)}")
    hq, d = q.shape[-2:]
    hkv, dc = kv_cache.shape[-2:]
    if d != dc or hq % hkv:
        raise ValueError(f"GQA: query [.., {hq} heads, {d}] does not fit a cache of {hkv} KV heads "
                         f"of dim {dc} (query heads must be a multiple of KV heads)")


@kernel_op("gqa_decode")
def gqa_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    _check_cache(q, kv_cache)
    return dispatch("gqa_decode", q, kv_cache, block_tables, seq_lens, scale,
                    head_dim=q.shape[-1])


@gqa_decode.register_fake
def _(q, kv_cache, block_tables, seq_lens, scale):
    return torch.empty_like(q)


@kernel_op("gqa_prefill")
def gqa_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                scale: float) -> torch.Tensor:
    _check_cache(q, kv_cache)
    return dispatch("gqa_prefill", q, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                    head_dim=q.shape[-1])


@gqa_prefill.register_fake
def _(q, kv_cache, block_tables, query_start_loc, seq_lens, scale):
    return torch.empty_like(q)


@kernel_op("gqa_attention", mutates_args=("kv_cache",))
def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int,
                  scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D]: store K/V at slot_mapping, attend, return [T, Hq, D]."""
    _check_cache(q, kv_cache)
    write_slots(kv_cache[0], slot_mapping, k)
    write_slots(kv_cache[1], slot_mapping, v)
    # Decodes come first (one token each), so their queries are rows 0..num_decodes-1.
    out = torch.empty_like(q)
    if num_decodes:
        out[:num_decodes] = dispatch("gqa_decode", q[:num_decodes], kv_cache,
                                     block_tables[:num_decodes], seq_lens[:num_decodes], scale,
                                     head_dim=q.shape[-1])
    if num_decodes < seq_lens.shape[0]:
        qsl = query_start_loc[num_decodes:] - num_decodes
        out[num_decodes:] = dispatch("gqa_prefill", q[num_decodes:], kv_cache,
                                     block_tables[num_decodes:], qsl, seq_lens[num_decodes:],
                                     scale, head_dim=q.shape[-1])
    return out


@gqa_attention.register_fake
def _(q, k, v, kv_cache, slot_mapping, block_tables, query_start_loc, seq_lens, num_decodes,
      scale):
    return torch.empty_like(q)
