"""MLA references (`kernels/mla.py`) against dense formulations through torch's own
scaled_dot_product_attention on unpaged tensors; random inputs, never zeros."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tscompile.kernels import build_metadata, mla_attention, mla_decode, mla_prefill

H, DN, DR, DV, L = 4, 12, 8, 10, 16   # heads, nope dim, rope dim, value dim, kv_lora_rank
R = L + DR
PS, NB = 4, 40                        # page size, blocks in the pool
SCALE = 0.3


def _paged(lengths: list[int], seed: int):
    """Dense latents per sequence, the same rows scattered into a paged cache through
    random, non-contiguous block tables."""
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(n, R, generator=g) for n in lengths]
    perm = torch.randperm(NB, generator=g).tolist()
    tables, cache = [], torch.randn(NB, PS, R, generator=g)  # garbage outside the tables
    for lat in latents:
        need = -(-lat.shape[0] // PS)
        tables.append(perm[:need])
        perm = perm[need:]
        for pos in range(lat.shape[0]):
            cache[tables[-1][pos // PS], pos % PS] = lat[pos]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return latents, cache, block_tables


def _weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, DN, L, generator=g) / L ** 0.5, torch.randn(H, L, DV, generator=g)


def _dense_expanded(q_nope, q_pe, latent, w_kc, w_vc, scale):
    """Chunk of n queries at the end of an unpaged context: k = [c W_UK^T ; k_pe],
    v = c W_UV per head, causal by absolute position; via SDPA. -> [n, H, dv]"""
    n, length = q_nope.shape[0], latent.shape[0]
    c, k_pe = latent[:, :L], latent[:, L:]
    k = torch.cat([torch.einsum("lc,hdc->hld", c, w_kc), k_pe.expand(H, length, DR)], -1)
    v = torch.einsum("lc,hcv->hlv", c, w_vc)
    q = torch.cat([q_nope, q_pe], -1).transpose(0, 1)                  # [H, n, dn+dr]
    mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)


def test_decode_matches_dense_softmax_over_the_latent():
    lengths = [1, 5, 17, 33]                      # incl. a single-token context
    latents, cache, tables = _paged(lengths, 0)
    q = torch.randn(len(lengths), H, R, generator=torch.Generator().manual_seed(1))
    out = mla_decode(q, cache, tables, torch.tensor(lengths, dtype=torch.int32), SCALE, L)
    assert out.shape == (len(lengths), H, L)
    for b, lat in enumerate(latents):
        # Latent-space attention: keys are whole cache rows, values their first L columns.
        ref = F.scaled_dot_product_attention(q[b][:, None], lat.expand(H, -1, -1),
                                             lat[:, :L].expand(H, -1, -1), scale=SCALE)
        torch.testing.assert_close(out[b], ref[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix,chunk", [(0, 9), (40, 7), (12, 1)],
                         ids=["empty-prefix", "long-prefix", "chunk-of-1"])
def test_prefill_matches_dense_expanded_attention(prefix, chunk):
    # The same chunk beside two other sequences, so query_start_loc offsets are exercised.
    qlens, lengths = [3, chunk, 2], [3, prefix + chunk, 6]
    latents, cache, tables = _paged(lengths, 2)
    g = torch.Generator().manual_seed(3)
    t = sum(qlens)
    q_nope, q_pe = torch.randn(t, H, DN, generator=g), torch.randn(t, H, DR, generator=g)
    w_kc, w_vc = _weights(4)
    meta = build_metadata(qlens, lengths, tables.tolist(), PS)
    out = mla_prefill(q_nope, q_pe, cache, w_kc, w_vc, meta.block_tables, meta.query_start_loc,
                      meta.seq_lens, SCALE)
    assert out.shape == (t, H, DV)
    start = 0
    for n, lat in zip(qlens, latents):
        ref = _dense_expanded(q_nope[start:start + n], q_pe[start:start + n], lat, w_kc, w_vc,
                              SCALE)
        torch.testing.assert_close(out[start:start + n], ref, rtol=1e-5, atol=1e-5)
        start += n


def _step_inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H, DN, generator=g), torch.randn(n, H, DR, generator=g),
            torch.randn(n, L, generator=g), torch.randn(n, DR, generator=g))


def test_attention_decode_path_equals_prefill_path():
    """The absorbed decode (q W_UK against the latent, then W_UV) and the expanded prefill
    give the same output for the same one-token steps, and both write the cache alike."""
    lengths = [6, 1, 13]                      # context after this step's token
    _, cache, tables = _paged(lengths, 5)
    w_kc, w_vc = _weights(6)
    q_nope, q_pe, kv_c, k_pe = _step_inputs(len(lengths), 7)
    meta = build_metadata([1] * 3, lengths, tables.tolist(), PS)
    outs, caches = [], []
    for num_decodes in (3, 0):                # all decodes vs all prefill chunks of length 1
        c = cache.clone()
        outs.append(mla_attention(q_nope, q_pe, kv_c, k_pe, c, w_kc, w_vc, meta.slot_mapping,
                                  meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                  num_decodes, SCALE))
        caches.append(c)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0], caches[1])
    flat = caches[0].view(NB * PS, R)
    assert torch.equal(flat[meta.slot_mapping], torch.cat([kv_c, k_pe], -1))


def test_attention_mixed_batch_matches_dense():
    """Two decodes then a prefill chunk in one call; every row against the dense oracle
    over the cache as written by the op."""
    qlens, lengths = [1, 1, 5], [9, 3, 14]
    latents, cache, tables = _paged(lengths, 8)
    w_kc, w_vc = _weights(9)
    q_nope, q_pe, kv_c, k_pe = _step_inputs(sum(qlens), 10)
    meta = build_metadata(qlens, lengths, tables.tolist(), PS)
    assert meta.num_decodes == 2
    out = mla_attention(q_nope, q_pe, kv_c, k_pe, cache, w_kc, w_vc, meta.slot_mapping,
                        meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.num_decodes,
                        SCALE)
    start = 0
    for n, lat in zip(qlens, latents):
        lat = lat.clone()
        lat[-n:] = torch.cat([kv_c[start:start + n], k_pe[start:start + n]], -1)  # new rows
        ref = _dense_expanded(q_nope[start:start + n], q_pe[start:start + n], lat, w_kc, w_vc,
                              SCALE)
        torch.testing.assert_close(out[start:start + n], ref, rtol=1e-5, atol=1e-5)
        start += n


def test_fake_kernels_agree_with_real_shapes():
    """register_fake is what fx / torch.compile see: same shapes and dtypes as the real op."""
    lengths = [5, 3]
    _, cache, tables = _paged(lengths, 11)
    w_kc, w_vc = _weights(12)
    q_nope, q_pe, kv_c, k_pe = _step_inputs(2, 13)
    meta = build_metadata([1, 1], lengths, tables.tolist(), PS)
    q = torch.randn(2, H, R)
    args = {
        mla_decode: (q, cache, tables, meta.seq_lens, SCALE, L),
        mla_prefill: (q_nope, q_pe, cache, w_kc, w_vc, tables, meta.query_start_loc,
                      meta.seq_lens, SCALE),
        mla_attention: (q_nope, q_pe, kv_c, k_pe, cache, w_kc, w_vc, meta.slot_mapping, tables,
                        meta.query_start_loc, meta.seq_lens, 2, SCALE),
    }
    for op, a in args.items():
        torch.library.opcheck(op, a, test_utils=("test_schema", "test_faketensor"))


def _good():
    _, cache, tables = _paged([4], 14)
    w_kc, w_vc = _weights(15)
    q_nope, q_pe, kv_c, k_pe = _step_inputs(1, 16)
    meta = build_metadata([1], [4], tables.tolist(), PS)
    return dict(q_nope=q_nope, q_pe=q_pe, kv_c=kv_c, k_pe=k_pe, kv_cache=cache, w_kc=w_kc,
                w_vc=w_vc, slot_mapping=meta.slot_mapping, block_tables=meta.block_tables,
                query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, num_decodes=1,
                scale=SCALE)


@pytest.mark.parametrize("name,bad,match", [
    ("kv_cache", torch.randn(2, NB, PS, R), r"kv_cache must be \[num_blocks, page_size"),
    ("kv_cache", torch.randn(NB, PS, R + 1), "cache rows of 25 do not hold kv_lora_rank=16"),
    ("q_pe", torch.randn(1, H + 1, DR), "q_nope .* and q_pe .* must agree on T and H"),
    ("w_kc", torch.randn(H, DN + 1, L), r"w_kc must be \[H=4, dn=12, kv_lora_rank\]"),
    ("w_vc", torch.randn(H, L + 1, DV), r"w_vc must be \[H=4, kv_lora_rank=16, dv\]"),
    ("kv_c", torch.randn(1, L - 1), r"kv_c must be \[T=1, kv_lora_rank=16\]"),
    ("k_pe", torch.randn(1, DR + 2), r"k_pe \[T=1, qk_rope_head_dim=8\]"),
])
def test_attention_bad_shapes_raise(name, bad, match):
    with pytest.raises(ValueError, match=match):
        mla_attention(**{**_good(), name: bad})


def test_decode_bad_shapes_raise():
    _, cache, tables = _paged([4], 17)
    seq_lens = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q must be \[B, H, 24\]"):
        mla_decode(torch.randn(1, H, R - 1), cache, tables, seq_lens, SCALE, L)
    with pytest.raises(ValueError, match=r"kv_lora_rank=24 must be in \(0, 24\)"):
        mla_decode(torch.randn(1, H, R), cache, tables, seq_lens, SCALE, R)
