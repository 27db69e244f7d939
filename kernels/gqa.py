"""Paged grouped-query attention (GQA; MHA and MQA are the cases Hkv = Hq and Hkv = 1).

Ops (layout and metadata: `kernels/paged.py`; legend there; variants below):
* `tscompile::gqa_decode(q [B, Hq, D], kv_cache, block_tables, seq_lens, scale, window,
  sinks, softcap) -> [B, Hq, D]` one query token per sequence over its cached context.
* `tscompile::gqa_prefill(q [T, Hq, D], kv_cache, block_tables, query_start_loc, seq_lens,
  scale, window, sinks, softcap) -> [T, Hq, D]` a chunk per sequence over its cached prefix
  plus itself (causal).
* `tscompile::gqa_attention(q, k, v, kv_cache, slot_mapping, block_tables, query_start_loc,
  seq_lens, num_decodes, scale, window, sinks, softcap) -> [T, Hq, D]` what a model calls:
  writes this step's K/V into `kv_cache` (mutated in place), then runs decode for the first
  `num_decodes` sequences and prefill for the rest. One fx node per layer.

Variants (optional trailing arguments; their defaults are plain causal softmax attention,
computed exactly as without them). Semantics are transformers' (5.x):
* `window: int = 0` sliding-window attention (Mistral, Gemma-2/3, GPT-OSS's alternate
  layers): a query at absolute position p sees keys at positions (p - window, p], i.e.
  itself and the window - 1 before it (`masking_utils.sliding_window_overlay`:
  `kv_idx > q_idx - sliding_window`). 0 = the whole context. A per-call argument, so a model
  alternates full and windowed layers by passing each layer's own value.
* `sinks: Tensor [Hq] | None` attention sinks (GPT-OSS): one learned logit s_h per query
  head joins the softmax as a key whose value is 0:
  `out = sum_j e^(x_j - m) v_j / (sum_j e^(x_j - m) + e^(s_h - m))`, m over the scores and
  s_h (`modeling_gpt_oss.eager_attention_forward`). Not scaled, not soft-capped; fp32.
* `softcap: float = 0.0` logit soft-capping (Gemma-2): scores (already times `scale`) become
  `softcap * tanh(scores / softcap)` before the mask and the softmax
  (`modeling_gemma2.eager_attention_forward`). 0 = off.
A backend that cannot run a variant must refuse it in its requirements: the registry query
carries `sliding_window=W`, `sinks=1` and `softcap=1` when they are on, and every backend
is called with all arguments (one without a parameter fails loudly, never ignores it).

Napkin math, decode: bytes = 2 * L * Hkv * D * elem per sequence (K and V read once),
FLOPs = 4 * L * Hq * D, so arithmetic intensity ~ Hq/Hkv FLOP/byte: memory bound. With a
window, L becomes min(L, window): the keys before the window are never read.
The references below loop over sequences in plain torch (fp32 softmax): slow, obvious,
the oracle for the GPU kernels.
"""
from __future__ import annotations

import torch

from .paged import gather_pages, write_slots2
from .registry import dispatch, kernel_op, register


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0,
            sinks: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Causal attention of n queries at the end of an L-long context.
    q [n, Hq, D], k/v [L, Hkv, D] -> [n, Hq, D]; query i sits at position L - n + i."""
    n, hq, _ = q.shape
    length, hkv, _ = k.shape
    first = 0                        # keys before `first` are outside every query's window
    if window > 0:
        first = max(0, length - n - window + 1)
        k, v = k[first:], v[first:]
    rep = hq // hkv
    k = k.float().repeat_interleave(rep, dim=1)                # [L', Hq, D]
    v = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale  # [Hq, n, L']
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(length - n, length, device=q.device)[:, None]
    k_pos = torch.arange(first, length, device=q.device)[None, :]
    hidden = k_pos > q_pos
    if window > 0:
        hidden = hidden | (k_pos <= q_pos - window)
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is None:
        probs = scores.softmax(dim=-1)
    else:                            # the sink: one more column, dropped after the softmax
        sink = sinks.float()[:, None, None].expand(hq, n, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)


@register("gqa_decode", "reference")
def gqa_decode_reference(q, kv_cache, block_tables, seq_lens, scale, window=0, sinks=None,
                         softcap=0.0):
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        length = int(seq_lens[b])
        k = gather_pages(kv_cache[0], block_tables[b], length)
        v = gather_pages(kv_cache[1], block_tables[b], length)
        out[b : b + 1] = _attend(q[b : b + 1], k, v, scale, window, sinks, softcap)
    return out


@register("gqa_prefill", "reference")
def gqa_prefill_reference(q, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                          window=0, sinks=None, softcap=0.0):
    out = torch.empty_like(q)
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        length = int(seq_lens[b])
        k = gather_pages(kv_cache[0], block_tables[b], length)
        v = gather_pages(kv_cache[1], block_tables[b], length)
        out[start:end] = _attend(q[start:end], k, v, scale, window, sinks, softcap)
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


def _variants(q: torch.Tensor, window: int, sinks: torch.Tensor | None,
              softcap: float) -> dict[str, int]:
    """Validate the variant arguments (shapes only: no device value is read) and return
    the registry query facts of those that are on."""
    facts: dict[str, int] = {}
    if window < 0:
        raise ValueError(f"GQA: window must be >= 0 (0 = full attention), got {window}")
    if window > 0:
        facts["sliding_window"] = window
    if sinks is not None:
        hq = q.shape[-2]
        if sinks.shape != (hq,) or not sinks.is_floating_point() or sinks.device != q.device:
            raise ValueError(
                f"GQA: sinks must be a floating [{hq}] tensor (one logit per query head) on "
                f"{q.device}, got {sinks.dtype} {list(sinks.shape)} on {sinks.device}; under "
                f"tensor parallelism it is split with the heads")
        facts["sinks"] = 1
    if not softcap >= 0:
        raise ValueError(f"GQA: softcap must be >= 0 (0 = off), got {softcap}")
    if softcap > 0:
        facts["softcap"] = 1
    return facts


@kernel_op("gqa_decode")
def gqa_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, window: int = 0,
               sinks: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    _check_cache(q, kv_cache)
    facts = _variants(q, window, sinks, softcap)
    return dispatch("gqa_decode", q, kv_cache, block_tables, seq_lens, scale, window, sinks,
                    softcap, head_dim=q.shape[-1], **facts)


@gqa_decode.register_fake
def _(q, kv_cache, block_tables, seq_lens, scale, window=0, sinks=None, softcap=0.0):
    return torch.empty_like(q)


@kernel_op("gqa_prefill")
def gqa_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                window: int = 0, sinks: torch.Tensor | None = None,
                softcap: float = 0.0) -> torch.Tensor:
    _check_cache(q, kv_cache)
    facts = _variants(q, window, sinks, softcap)
    return dispatch("gqa_prefill", q, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                    window, sinks, softcap, head_dim=q.shape[-1], **facts)


@gqa_prefill.register_fake
def _(q, kv_cache, block_tables, query_start_loc, seq_lens, scale, window=0, sinks=None,
      softcap=0.0):
    return torch.empty_like(q)


@kernel_op("gqa_attention", mutates_args=("kv_cache",))
def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int,
                  scale: float, window: int = 0, sinks: torch.Tensor | None = None,
                  softcap: float = 0.0) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D]: store K/V at slot_mapping, attend, return [T, Hq, D]."""
    _check_cache(q, kv_cache)
    facts = _variants(q, window, sinks, softcap)
    write_slots2(kv_cache[0], kv_cache[1], slot_mapping, k, v)
    # Decodes come first (one token each), so their queries are rows 0..num_decodes-1.
    if num_decodes == seq_lens.shape[0] == q.shape[0]:     # a pure decode step: no copy
        return dispatch("gqa_decode", q, kv_cache, block_tables, seq_lens, scale, window,
                        sinks, softcap, head_dim=q.shape[-1], **facts)
    out = torch.empty_like(q)
    if num_decodes:
        out[:num_decodes] = dispatch("gqa_decode", q[:num_decodes], kv_cache,
                                     block_tables[:num_decodes], seq_lens[:num_decodes], scale,
                                     window, sinks, softcap, head_dim=q.shape[-1], **facts)
    if num_decodes < seq_lens.shape[0]:
        qsl = query_start_loc[num_decodes:] - num_decodes
        out[num_decodes:] = dispatch("gqa_prefill", q[num_decodes:], kv_cache,
                                     block_tables[num_decodes:], qsl, seq_lens[num_decodes:],
                                     scale, window, sinks, softcap, head_dim=q.shape[-1],
                                     **facts)
    return out


@gqa_attention.register_fake
def _(q, k, v, kv_cache, slot_mapping, block_tables, query_start_loc, seq_lens, num_decodes,
      scale, window=0, sinks=None, softcap=0.0):
    return torch.empty_like(q)
