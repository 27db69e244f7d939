"""Triton paged GQA (kernels/triton/gqa.py) against the reference backend.

CPU: the Triton interpreter on tiny shapes, with the split-KV and tile sizes forced small so
that several splits, several key tiles, page boundaries and masked tails all occur. fp32
caches are compared at atol 1e-4; bf16/fp16 caches at atol 2e-2 (P is rounded to the cache
dtype before the PV product, as in every flash kernel; the reference keeps it in fp32).
GPU (`-m gpu`): Llama-3.1-8B head shapes against the reference.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from tscompile.kernels import gqa_attention, gqa_decode, gqa_prefill  # noqa: E402
from tscompile.kernels import build_metadata  # noqa: E402
from tscompile.kernels.gqa import gqa_decode_reference, gqa_prefill_reference  # noqa: E402
from tscompile.kernels.triton import gqa as tgqa  # noqa: E402


TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def make_cache(lengths, page_size, hkv, d, dtype, device="cpu", spare=3, gen=None):
    """A random cache and scattered (non-contiguous, shuffled) block tables."""
    need = [math.ceil(n / page_size) for n in lengths]
    nb = sum(need) + spare
    perm = torch.randperm(nb, generator=gen).tolist()
    width = max(need) + 1                      # one padding column, filled with 0
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    for b, k in enumerate(need):
        tables[b, :k] = torch.tensor(perm[:k])
        perm = perm[k:]
    cache = torch.randn(2, nb, page_size, hkv, d, generator=gen).to(dtype)
    return cache.to(device), tables.to(device)


def check(out, want, dtype):
    assert not out.isnan().any()
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size,splits", [(1, 1), (5, 3), (16, 4)])
def test_decode_matches_reference(dtype, page_size, splits):
    gen = torch.Generator().manual_seed(page_size * 10 + splits)
    hq, hkv, d = 6, 2, 24                      # G = 3 (padded to 16 rows), D not a power of 2
    lengths = [1, 37, page_size, 2 * page_size + 1, 50]
    cache, tables = make_cache(lengths, page_size, hkv, d, dtype, gen=gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), hq, d, generator=gen).to(dtype)
    out = tgqa.decode(q, cache, tables, seq_lens, 0.3, splits=splits, block_n=16)
    check(out, gqa_decode_reference(q, cache, tables, seq_lens, 0.3), dtype)


def test_decode_more_splits_than_tiles():
    """Splits with nothing to do (seq_len 1 over 8 splits) leave empty partials that the
    reduction must ignore; MQA (one KV head, 8 query heads)."""
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 3, 20]
    cache, tables = make_cache(lengths, 4, 1, 16, torch.float32, gen=gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(3, 8, 16, generator=gen)
    out = tgqa.decode(q, cache, tables, seq_lens, 0.25, splits=8, block_n=16)
    check(out, gqa_decode_reference(q, cache, tables, seq_lens, 0.25), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size", [1, 4, 7])
def test_prefill_matches_reference(dtype, page_size):
    gen = torch.Generator().manual_seed(page_size)
    hq, hkv, d = 4, 2, 16
    # (cached prefix, chunk): empty prefix, one-token chunk, chunks over several query
    # tiles, a prefix ending mid-tile.
    seqs = [(0, 19), (9, 1), (21, 40), (3, 5), (32, 16)]
    lengths = [p + n for p, n in seqs]
    cache, tables = make_cache(lengths, page_size, hkv, d, dtype, gen=gen)
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor([n for _, n in seqs]), 0)),
                       dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, d, generator=gen).to(dtype)
    out = tgqa.prefill(q, cache, tables, qsl, seq_lens, 0.2, block_m=16, block_n=16)
    check(out, gqa_prefill_reference(q, cache, tables, qsl, seq_lens, 0.2), dtype)


def test_prefill_tiles_unequal_sizes():
    """BLOCK_M != BLOCK_N, head dim 64 (the real tile path's D), MHA (G = 1)."""
    gen = torch.Generator().manual_seed(3)
    seqs = [(5, 33), (0, 16)]
    lengths = [p + n for p, n in seqs]
    cache, tables = make_cache(lengths, 16, 2, 64, torch.float32, gen=gen)
    qsl = torch.tensor([0, 33, 49], dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(49, 2, 64, generator=gen)
    for bm, bn in [(16, 32), (32, 16)]:
        out = tgqa.prefill(q, cache, tables, qsl, seq_lens, 0.125, block_m=bm, block_n=bn)
        check(out, gqa_prefill_reference(q, cache, tables, qsl, seq_lens, 0.125),
              torch.float32)


def test_registry_path_mixed_batch(monkeypatch):
    """gqa_attention with both ops forced to triton: cache write, then decode + prefill."""
    monkeypatch.setenv("TSCOMPILE_KERNELS", "gqa_decode=triton,gqa_prefill=triton")
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, ps = 6, 3, 32, 4
    seqs = [(7, 1), (16, 1), (0, 9), (12, 4)]            # decodes first
    lengths = [p + n for p, n in seqs]
    cache, tables = make_cache(lengths, ps, hkv, d, torch.float32, gen=gen)
    meta = build_metadata([n for _, n in seqs], lengths,
                          [t[: math.ceil(n / ps)].tolist() for t, n in zip(tables, lengths)], ps)
    t = sum(n for _, n in seqs)
    q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hkv, hkv))
    ref_cache = cache.clone()
    out = gqa_attention(q, k, v, cache, meta.slot_mapping, meta.block_tables,
                        meta.query_start_loc, meta.seq_lens, meta.num_decodes, 0.3)
    monkeypatch.setenv("TSCOMPILE_KERNELS", "*=reference")
    want = gqa_attention(q, k, v, ref_cache, meta.slot_mapping, meta.block_tables,
                         meta.query_start_loc, meta.seq_lens, meta.num_decodes, 0.3)
    check(out, want, torch.float32)
    # The public ops select triton when forced, and it refuses nothing here.
    monkeypatch.setenv("TSCOMPILE_KERNELS", "gqa_decode=triton,gqa_prefill=triton")
    dec = gqa_decode(q[:2], cache, meta.block_tables[:2], meta.seq_lens[:2], 0.3)
    check(dec, want[:2], torch.float32)
    qsl = meta.query_start_loc[2:] - 2
    pre = gqa_prefill(q[2:], cache, meta.block_tables[2:], qsl, meta.seq_lens[2:], 0.3)
    check(pre, want[2:], torch.float32)


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32])
def test_fp8_cache_decode_and_prefill_match_the_reference_on_the_same_cache(qdtype):
    """An fp8-e4m3 cache: the kernels upcast each K/V tile to q's dtype; the reference reads
    the same fp8 values in fp32. Also: the cache write saturates an outlier to 448 instead
    of the NaN a plain cast gives."""
    gen = torch.Generator().manual_seed(11)
    hq, hkv, d, ps = 6, 2, 24, 5
    seqs = [(12, 1), (30, 1), (0, 19), (21, 7)]          # decodes first
    lengths = [p + n for p, n in seqs]
    cache, tables = make_cache(lengths, ps, hkv, d, FP8, gen=gen)
    assert cache.dtype == FP8 and not cache.float().isnan().any()
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(2, hq, d, generator=gen).to(qdtype)
    out = tgqa.decode(q, cache, tables[:2], seq_lens[:2], 0.3, splits=3, block_n=16)
    check(out, gqa_decode_reference(q, cache, tables[:2], seq_lens[:2], 0.3), qdtype)
    qsl = torch.tensor([0, 19, 26], dtype=torch.int32)
    qp = torch.randn(26, hq, d, generator=gen).to(qdtype)
    out = tgqa.prefill(qp, cache, tables[2:], qsl, seq_lens[2:], 0.3, block_m=16, block_n=16)
    check(out, gqa_prefill_reference(qp, cache, tables[2:], qsl, seq_lens[2:], 0.3), qdtype)

    meta = build_metadata([1], [4], [[0]], ps)
    k = torch.full((1, hkv, d), 1000.0)
    gqa_attention(torch.randn(1, hq, d), k, -k, cache, meta.slot_mapping, meta.block_tables,
                  meta.query_start_loc, meta.seq_lens, meta.num_decodes, 0.3)
    assert cache[0, 0, 3].float().eq(448).all() and cache[1, 0, 3].float().eq(-448).all()


def test_num_splits_fills_the_gpu(monkeypatch):
    monkeypatch.setattr(tgqa, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert tgqa.num_splits(1, 8, 131072, cuda) == 64          # capped at max_splits
    assert tgqa.num_splits(8, 8, 32768, cuda) == 8            # 512 <= 4 * 132 programs
    assert tgqa.num_splits(32, 8, 8192, cuda) == 2
    assert tgqa.num_splits(64, 8, 4096, cuda) == 1            # 512 programs already
    assert tgqa.num_splits(1, 8, 600, cuda) == 5              # >= 128 tokens a split


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("page_size", [1, 5])
def test_prefill_split_kv_matches_reference(splits, page_size):
    """The split-KV prefill (short chunks over long prefixes): more splits than some tiles
    have key tiles (empty splits), prefixes ending mid-tile, a one-token chunk, an empty
    prefix, and sequence slots with no query tokens (a graph bucket's empty slots)."""
    gen = torch.Generator().manual_seed(splits * page_size)
    hq, hkv, d = 4, 2, 16
    seqs = [(70, 3), (0, 19), (9, 1), (45, 40), (0, 0), (130, 16), (0, 0)]
    lengths = [p + n for p, n in seqs]
    cache, tables = make_cache([max(n, 1) for n in lengths], page_size, hkv, d,
                               torch.float32, gen=gen)
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor([n for _, n in seqs]), 0)),
                       dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, d, generator=gen)
    want = gqa_prefill_reference(q, cache, tables, qsl, seq_lens, 0.2)
    out = tgqa.prefill(q, cache, tables, qsl, seq_lens, 0.2, block_m=16, block_n=16,
                       splits=splits)
    check(out, want, torch.float32)
    qb = q.to(torch.bfloat16)
    check(tgqa.prefill(qb, cache.to(torch.bfloat16), tables, qsl, seq_lens, 0.2,
                       splits=splits),
          gqa_prefill_reference(qb, cache.to(torch.bfloat16), tables, qsl, seq_lens, 0.2),
          torch.bfloat16)


def test_prefill_splits_only_when_the_tiles_underfill_the_gpu(monkeypatch):
    monkeypatch.setattr(tgqa, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    # Qwen3-8B heads (32): a 4096-token bucket fills the GPU with 128-row tiles.
    assert tgqa.prefill_splits(4096, 128, 64, 32, 131072, cuda) == 1
    assert tgqa.prefill_splits(512, 128, 64, 32, 131072, cuda) == 1   # 5 tiles x 32 = 160
    # A 16-token chunk: 2 tiles x 32 heads = 64 programs, 8 splits make one wave of 528.
    assert tgqa.prefill_splits(16, 128, 16, 32, 131072, cuda) == 8
    assert tgqa.prefill_splits(16, 128, 16, 32, 1024, cuda) == 2      # >= 512 keys a split
    assert tgqa.prefill_splits(16, 128, 16, 8, 131072, cuda) == 33


# ---------------------------------------------------------------------------------------
# Real shapes on a GPU
# ---------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("batch,ctx", [(1, 20000), (7, 3001), (64, 257)])
def test_gpu_decode(dtype, d, batch, ctx):
    gen = torch.Generator().manual_seed(ctx)
    lengths = [max(1, ctx - 97 * i) for i in range(batch)]
    cache, tables = make_cache(lengths, 16, 8, d, dtype, device="cuda", gen=gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, 32, d, generator=gen).to(dtype).cuda()
    out = tgqa.decode(q, cache, tables, seq_lens, d ** -0.5)
    check(out, gqa_decode_reference(q, cache, tables, seq_lens, d ** -0.5), dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seqs", [[(0, 1000)], [(3000, 517), (0, 1), (130, 300)]])
def test_gpu_prefill(dtype, d, seqs):
    gen = torch.Generator().manual_seed(d)
    lengths = [p + n for p, n in seqs]
    cache, tables = make_cache(lengths, 16, 8, d, dtype, device="cuda", gen=gen)
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor([n for _, n in seqs]), 0)),
                       dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(int(qsl[-1]), 32, d, generator=gen).to(dtype).cuda()
    out = tgqa.prefill(q, cache, tables, qsl, seq_lens, d ** -0.5)
    check(out, gqa_prefill_reference(q, cache, tables, qsl, seq_lens, d ** -0.5), dtype)
