"""Paged GQA references against a dense formulation on the unpaged K/V."""
from __future__ import annotations

import math

import pytest
import torch

from tscompile.kernels import build_metadata, gqa_attention, gqa_decode, gqa_prefill

HQ, HKV, D = 6, 2, 8


def dense_attention(q, k, v, scale):
    """q [n, Hq, D] at the end of k/v [L, Hkv, D]; plain softmax with a causal mask."""
    n, length = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.empty_like(q)
    for i in range(n):
        visible = length - n + i + 1
        for h in range(q.shape[1]):
            w = torch.softmax(k[:visible, h] @ q[i, h] * scale, dim=0)
            out[i, h] = w @ v[:visible, h]
    return out


def scattered_tables(lengths, page_size, num_blocks, gen):
    """Random, non-contiguous physical blocks for each sequence."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:
        need = math.ceil(n / page_size)
        tables.append(perm[:need])
        perm = perm[need:]
    return tables


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_mixed_batch_matches_dense(page_size):
    gen = torch.Generator().manual_seed(page_size)
    # (cached prefix, new tokens): decodes first, then prefills incl. an empty prefix and a
    # chunk of one token; lengths that end on and off page boundaries.
    seqs = [(7, 1), (0, 1), (16, 1), (0, 9), (5, 1 if page_size > 1 else 2), (12, 4)]
    seqs.sort(key=lambda s: s[1] != 1)
    lengths = [p + n for p, n in seqs]
    nb = sum(math.ceil(n / page_size) for n in lengths) + 3
    tables = scattered_tables(lengths, page_size, nb, gen)
    cache = torch.randn(2, nb, page_size, HKV, D, generator=gen)
    # Full K/V per sequence; the prefix part is written into the cache beforehand.
    ks = [torch.randn(n, HKV, D, generator=gen) for n in lengths]
    vs = [torch.randn(n, HKV, D, generator=gen) for n in lengths]
    for (prefix, _), table, k, v in zip(seqs, tables, ks, vs):
        for pos in range(prefix):
            cache[0, table[pos // page_size], pos % page_size] = k[pos]
            cache[1, table[pos // page_size], pos % page_size] = v[pos]
    meta = build_metadata([n for _, n in seqs], lengths, tables, page_size)
    q = torch.randn(sum(n for _, n in seqs), HQ, D, generator=gen)
    k_new = torch.cat([k[p:] for (p, _), k in zip(seqs, ks)])
    v_new = torch.cat([v[p:] for (p, _), v in zip(seqs, vs)])
    out = gqa_attention(q, k_new, v_new, cache, meta.slot_mapping, meta.block_tables,
                        meta.query_start_loc, meta.seq_lens, meta.num_decodes, 0.35)
    row = 0
    for (prefix, n), k, v in zip(seqs, ks, vs):
        want = dense_attention(q[row:row + n], k, v, 0.35)
        torch.testing.assert_close(out[row:row + n], want, atol=1e-5, rtol=1e-5)
        row += n
    # The step's K/V landed in the cache at slot_mapping.
    flat_k = cache[0].reshape(-1, HKV, D)
    torch.testing.assert_close(flat_k[meta.slot_mapping], k_new)


def test_decode_equals_prefill_of_one_token():
    gen = torch.Generator().manual_seed(7)
    cache = torch.randn(2, 8, 4, HKV, D, generator=gen)
    tables = torch.tensor([[3, 1, 6], [0, 2, 5]], dtype=torch.int32)
    seq_lens = torch.tensor([11, 1], dtype=torch.int32)
    q = torch.randn(2, HQ, D, generator=gen)
    dec = gqa_decode(q, cache, tables, seq_lens, 0.3)
    pre = gqa_prefill(q, cache, tables, torch.tensor([0, 1, 2], dtype=torch.int32), seq_lens, 0.3)
    torch.testing.assert_close(dec, pre)


def test_bad_cache_shape_is_named():
    q = torch.randn(1, 5, D)  # 5 query heads over 2 KV heads
    with pytest.raises(ValueError, match="multiple of KV heads"):
        gqa_decode(q, torch.randn(2, 4, 4, HKV, D), torch.zeros(1, 1, dtype=torch.int32),
                   torch.ones(1, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match=r"kv_cache must be \[2, num_blocks"):
        gqa_decode(torch.randn(1, HQ, D), torch.randn(4, 4, HKV, D),
                   torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)


def test_metadata_validation():
    with pytest.raises(ValueError, match="cannot hold"):
        build_metadata([3], [9], [[0, 1]], 4)
    with pytest.raises(ValueError, match="query length"):
        build_metadata([0], [4], [[0]], 4)
