"""Paged multi-head latent attention (MLA; DeepSeek-V2 2024, DeepSeek-V3 2024, Kimi K2).

MLA caches one small latent per token instead of per-head K and V: the normalised
compressed KV `c` (kv_lora_rank wide) and one decoupled, already roped key `k_pe` shared by
every head. Per head, K and V are linear in `c`: k_nope_h = W_UK_h c, v_h = W_UV_h c.

Legend (layout and metadata: `kernels/paged.py`): T tokens in the step, B sequences,
H query heads, L kv_lora_rank, dr qk_rope_head_dim, dn qk_nope_head_dim, dv v_head_dim,
R = L + dr (the cache row), Lctx a sequence's context length.
Cache: `kv_cache[NB, PS, R]`, each row `[c (L) ; k_pe (dr)]`.
Weights: `w_kc[H, dn, L]` (W_UK per head), `w_vc[H, L, dv]` (W_UV per head, transposed),
both plain views of the checkpoint's `kv_b_proj.weight [H*(dn+dv), L]`.

Ops:
* `tscompile::mla_decode(q [B, H, R], kv_cache, block_tables, seq_lens, scale, kv_lora_rank)
  -> [B, H, L]`: the *absorbed* form. The query arrives already multiplied into latent
  space, q = [q_nope W_UK ; q_pe], so scores are q . [c ; k_pe] over the raw cache and the
  output stays latent, probs @ c; the caller applies W_UV. `kv_lora_rank` says where a
  cache row splits into c and k_pe (the shapes alone cannot tell).
* `tscompile::mla_prefill(q_nope [T, H, dn], q_pe [T, H, dr], kv_cache, w_kc, w_vc,
  block_tables, query_start_loc, seq_lens, scale) -> [T, H, dv]`: the *expanded* form for
  prefill chunks: gather the latents of the context, expand k_nope = c W_UK^T and
  v = c W_UV per head, attend causally over cached prefix + chunk. Expanding costs
  Lctx*H*(dn+dv)*L MACs once per chunk but keeps the per-query work at dn+dr (not L+dr)
  per head: cheaper when a chunk has many queries.
* `tscompile::mla_attention(q_nope, q_pe, kv_c [T, L], k_pe [T, dr], kv_cache, w_kc, w_vc,
  slot_mapping, block_tables, query_start_loc, seq_lens, num_decodes, scale) -> [T, H, dv]`:
  what a model calls (one fx node per layer). Writes [kv_c ; k_pe] at slot_mapping
  (kv_cache mutated in place), runs the first num_decodes sequences (one token each)
  absorbed through mla_decode and the rest expanded through mla_prefill.

Napkin math, decode (absorbed): per sequence the latent is read once and shared by all H
heads, bytes ~ Lctx * R * elem, FLOPs ~ 2 * H * Lctx * (R + L) (scores, then probs @ c).
Intensity = 2H(R + L) / (R * elem); bf16, R = 576, L = 512: H * 1088 / 576 ~ 1.9 H FLOP/byte.
Kimi K2.5 with 64 heads at TP 1 gives ~120, 16 heads per rank at TP 4 ~30, both under the
H100 ridge (~990 TFLOP/s / 3.35 TB/s ~ 295 FLOP/byte): memory bound, the cache read sets
the speed. Folding n query tokens into the head axis (speculative verification) multiplies
the intensity by n at no extra bytes.

The references below loop over sequences in plain torch with fp32 softmax: slow, obvious,
the oracle for the GPU kernels.
"""
from __future__ import annotations

import torch

from .paged import gather_pages, write_slots2
from .registry import dispatch, kernel_op, register


def _attend_latent(q: torch.Tensor, latent: torch.Tensor, visible: torch.Tensor, scale: float,
                   kv_lora_rank: int) -> torch.Tensor:
    """Absorbed attention of M query rows over one sequence's latent cache.
    q [M, R], latent [Lctx, R], visible [M] (row m sees positions 0 .. visible[m]-1)
    -> [M, L] fp32.

    Rows are anything that shares the latent: the H heads of one decode token today. A
    sequence with n query tokens (speculative verification) folds them into the rows as
    M = n * H with visible[i * H + h] = Lctx - n + i + 1; nothing else changes."""
    latent = latent.float()
    scores = (q.float() @ latent.T) * scale                         # [M, Lctx]
    k_pos = torch.arange(latent.shape[0], device=q.device)[None, :]
    scores = scores.masked_fill(k_pos >= visible[:, None], float("-inf"))
    return scores.softmax(dim=-1) @ latent[:, :kv_lora_rank]        # [M, L]


@register("mla_decode", "reference")
def mla_decode_reference(q, kv_cache, block_tables, seq_lens, scale, kv_lora_rank):
    b, h, _ = q.shape
    out = q.new_empty(b, h, kv_lora_rank)
    for i in range(b):
        length = int(seq_lens[i])
        latent = gather_pages(kv_cache, block_tables[i], length)    # [Lctx, R]
        visible = torch.full((h,), length, device=q.device)         # one token: sees all
        out[i] = _attend_latent(q[i], latent, visible, scale, kv_lora_rank).to(q.dtype)
    return out


@register("mla_prefill", "reference")
def mla_prefill_reference(q_nope, q_pe, kv_cache, w_kc, w_vc, block_tables, query_start_loc,
                          seq_lens, scale):
    t, h, _ = q_nope.shape
    rank = w_kc.shape[-1]
    out = q_nope.new_empty(t, h, w_vc.shape[-1])
    w_kc, w_vc = w_kc.float(), w_vc.float()
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        length, n = int(seq_lens[b]), end - start
        latent = gather_pages(kv_cache, block_tables[b], length).float()
        c, k_pe = latent[:, :rank], latent[:, rank:]                 # [Lctx, L], [Lctx, dr]
        k_nope = torch.einsum("lc,hdc->lhd", c, w_kc)                # [Lctx, H, dn]
        v = torch.einsum("lc,hcv->lhv", c, w_vc)                     # [Lctx, H, dv]
        scores = (torch.einsum("nhd,lhd->hnl", q_nope[start:end].float(), k_nope)
                  + torch.einsum("nhr,lr->hnl", q_pe[start:end].float(), k_pe)) * scale
        # Query i of the chunk sits at position length - n + i (kernels/paged.py).
        q_pos = torch.arange(length - n, length, device=q_nope.device)[:, None]
        k_pos = torch.arange(length, device=q_nope.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[start:end] = torch.einsum("hnl,lhv->nhv", scores.softmax(-1), v).to(out.dtype)
    return out


# ---- shape checks (ValueError naming the tensor, the expectation and what arrived) ----

def _check_cache(kv_cache: torch.Tensor) -> int:
    if kv_cache.dim() != 3:
        raise ValueError(f"MLA kv_cache must be [num_blocks, page_size, kv_lora_rank + "
                         f"qk_rope_head_dim], got {list(kv_cache.shape)}")
    return kv_cache.shape[-1]


def _check_weights(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                   w_kc: torch.Tensor, w_vc: torch.Tensor) -> None:
    r = _check_cache(kv_cache)
    if q_nope.dim() != 3 or q_pe.dim() != 3 or q_nope.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"MLA: q_nope [T, H, dn] and q_pe [T, H, dr] must agree on T and H, "
                         f"got {list(q_nope.shape)} and {list(q_pe.shape)}")
    h, dn = q_nope.shape[1:]
    if w_kc.dim() != 3 or w_kc.shape[:2] != (h, dn):
        raise ValueError(f"MLA: w_kc must be [H={h}, dn={dn}, kv_lora_rank], "
                         f"got {list(w_kc.shape)}")
    rank = w_kc.shape[-1]
    if w_vc.dim() != 3 or w_vc.shape[:2] != (h, rank):
        raise ValueError(f"MLA: w_vc must be [H={h}, kv_lora_rank={rank}, dv], "
                         f"got {list(w_vc.shape)}")
    if rank + q_pe.shape[-1] != r:
        raise ValueError(f"MLA: cache rows of {r} do not hold kv_lora_rank={rank} + "
                         f"qk_rope_head_dim={q_pe.shape[-1]}")


def _decode_shape(q: torch.Tensor, kv_cache: torch.Tensor, rank: int) -> dict[str, int]:
    """The shape facts a decode backend is selected by (registry Query keys)."""
    return dict(kv_lora_rank=rank, rope_dim=kv_cache.shape[-1] - rank, heads=q.shape[1],
                page_size=kv_cache.shape[1], cache_itemsize=kv_cache.element_size())


@kernel_op("mla_decode")
def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, kv_lora_rank: int) -> torch.Tensor:
    r = _check_cache(kv_cache)
    if q.dim() != 3 or q.shape[-1] != r:
        raise ValueError(f"mla_decode: q must be [B, H, {r}] (absorbed query matching the "
                         f"cache row), got {list(q.shape)}")
    if not 0 < kv_lora_rank < r:
        raise ValueError(f"mla_decode: kv_lora_rank={kv_lora_rank} must be in (0, {r})")
    return dispatch("mla_decode", q, kv_cache, block_tables, seq_lens, scale, kv_lora_rank,
                    **_decode_shape(q, kv_cache, kv_lora_rank))


@mla_decode.register_fake
def _(q, kv_cache, block_tables, seq_lens, scale, kv_lora_rank):
    return q.new_empty(q.shape[0], q.shape[1], kv_lora_rank)


@kernel_op("mla_prefill")
def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                w_kc: torch.Tensor, w_vc: torch.Tensor, block_tables: torch.Tensor,
                query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                scale: float) -> torch.Tensor:
    _check_weights(q_nope, q_pe, kv_cache, w_kc, w_vc)
    return dispatch("mla_prefill", q_nope, q_pe, kv_cache, w_kc, w_vc, block_tables,
                    query_start_loc, seq_lens, scale, kv_lora_rank=w_kc.shape[-1])


@mla_prefill.register_fake
def _(q_nope, q_pe, kv_cache, w_kc, w_vc, block_tables, query_start_loc, seq_lens, scale):
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_vc.shape[-1])


@kernel_op("mla_attention", mutates_args=("kv_cache",))
def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor,
                  k_pe: torch.Tensor, kv_cache: torch.Tensor, w_kc: torch.Tensor,
                  w_vc: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int,
                  scale: float) -> torch.Tensor:
    """Store [kv_c ; k_pe] at slot_mapping, attend, return [T, H, dv]."""
    _check_weights(q_nope, q_pe, kv_cache, w_kc, w_vc)
    t, rank = q_nope.shape[0], w_kc.shape[-1]
    if kv_c.shape != (t, rank) or k_pe.shape != (t, q_pe.shape[-1]):
        raise ValueError(f"mla_attention: kv_c must be [T={t}, kv_lora_rank={rank}] and k_pe "
                         f"[T={t}, qk_rope_head_dim={q_pe.shape[-1]}], got "
                         f"{list(kv_c.shape)} and {list(k_pe.shape)}")
    write_slots2(kv_cache[..., :rank], kv_cache[..., rank:], slot_mapping, kv_c, k_pe)
    out = q_nope.new_empty(t, q_nope.shape[1], w_vc.shape[-1])
    # Decodes come first (one token each), so their queries are rows 0..num_decodes-1.
    if num_decodes:
        # Absorb W_UK into the query: [nd, H, dn] x [H, dn, L] -> [nd, H, L].
        q_lat = torch.einsum("thd,hdc->thc", q_nope[:num_decodes], w_kc)
        q = torch.cat([q_lat, q_pe[:num_decodes].to(q_lat.dtype)], dim=-1)  # [nd, H, R]
        lat = dispatch("mla_decode", q, kv_cache, block_tables[:num_decodes],
                       seq_lens[:num_decodes], scale, rank,
                       **_decode_shape(q, kv_cache, rank))                    # [nd, H, L]
        out[:num_decodes] = torch.einsum("thc,hcv->thv", lat, w_vc)           # W_UV after
    if num_decodes < seq_lens.shape[0]:
        qsl = query_start_loc[num_decodes:] - num_decodes
        out[num_decodes:] = dispatch("mla_prefill", q_nope[num_decodes:], q_pe[num_decodes:],
                                     kv_cache, w_kc, w_vc, block_tables[num_decodes:], qsl,
                                     seq_lens[num_decodes:], scale, kv_lora_rank=rank)
    return out


@mla_attention.register_fake
def _(q_nope, q_pe, kv_c, k_pe, kv_cache, w_kc, w_vc, slot_mapping, block_tables,
      query_start_loc, seq_lens, num_decodes, scale):
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_vc.shape[-1])
