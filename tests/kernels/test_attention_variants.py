"""Attention variants of the paged GQA ops: sliding window, sinks, logit soft-capping
(kernels/gqa.py for the semantics, kernels/triton/gqa.py for the kernels).

Three oracles, each on the same tensors:
* a dense computation written here (float64, one query and head at a time, an explicit
  position mask over the unpaged K/V, the sink as one more softmax column);
* transformers' own attention functions (GPT-OSS's `eager_attention_forward` with its sinks
  and a mask from `masking_utils.sliding_window_causal_mask_function`; Gemma-2's with
  `softcap`), for the reference backend;
* the reference backend, for the Triton kernels (CPU interpreter; tile and split sizes
  forced small so windows start mid-page and mid-tile, cross several pages, and several
  splits hold nothing).
Also: with no variant the reference computes bit for bit what it computed before the
variants existed (a frozen copy below), and keys before every query's window are never
read (NaN there stays out of the result).

Legend: Hq query heads, Hkv KV heads (group Hq / Hkv = 2), D head dim, PS page size.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from tscompile.kernels import build_metadata, gqa_attention, gqa_decode, gqa_prefill
from tscompile.kernels import gqa as gqa_mod
from tscompile.kernels.gqa import gqa_decode_reference, gqa_prefill_reference

HQ, HKV = 4, 2
SCALE = 0.3

# (name, variant arguments); "sinks" is replaced by a random [Hq] tensor.
VARIANTS = [
    ("window_in_page", dict(window=3)),            # fewer keys than one page holds
    ("window_mid_page", dict(window=10)),          # starts inside a page, spans several
    ("window_beyond_context", dict(window=1000)),  # the same as full attention
    ("sinks", dict(sinks=True)),
    ("softcap", dict(softcap=1.0)),                # scores ~N(0, 1.2): the cap bites
    ("all", dict(window=10, sinks=True, softcap=1.5)),
]
IDS = [name for name, _ in VARIANTS]
# (cached prefix, new tokens), decodes first: contexts over several pages, a chunk with no
# prefix, chunks over a long prefix, a chunk shorter than the window.
SEQS = [(40, 1), (4, 1), (16, 1), (0, 19), (21, 12), (30, 5)]


def variant_args(spec: dict, gen: torch.Generator, hq: int = HQ) -> dict:
    args = dict(spec)
    if args.get("sinks"):
        args["sinks"] = torch.randn(hq, generator=gen) * 2
    return args


def dense(q, k, v, scale, window=0, sinks=None, softcap=0.0):
    """q [n, Hq, D] at the end of the unpaged k/v [L, Hkv, D], in float64."""
    n, hq, _ = q.shape
    length = k.shape[0]
    rep = hq // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    pos = torch.arange(length)
    out = torch.empty(n, hq, q.shape[2], dtype=torch.float64)
    for i in range(n):
        p = length - n + i
        allowed = pos <= p
        if window:
            allowed &= pos > p - window
        for h in range(hq):
            s = k[:, h] @ q[i, h].double() * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~allowed, float("-inf"))
            if sinks is not None:
                s = torch.cat([s, sinks[h:h + 1].double()])
            w = torch.softmax(s, 0)
            out[i, h] = (w[:length] if sinks is not None else w) @ v[:, h]
    return out


def paged_batch(seqs, page_size, d, gen, dtype=torch.float32, hq=HQ, hkv=HKV):
    """Per sequence full K/V [L, Hkv, D] written into scattered pages of a random cache
    (garbage everywhere else), its queries, and the metadata. The cache holds every
    position, new tokens included (what gqa_attention leaves before it dispatches)."""
    lengths = [p + n for p, n in seqs]
    need = [math.ceil(n / page_size) for n in lengths]
    nb = sum(need) + 2
    perm = torch.randperm(nb, generator=gen).tolist()
    tables = []
    for k in need:
        tables.append(perm[:k])
        perm = perm[k:]
    cache = torch.randn(2, nb, page_size, hkv, d, generator=gen)
    ks = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    vs = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    flat = cache.view(2, nb * page_size, hkv, d)
    for table, k, v in zip(tables, ks, vs):
        pos = torch.arange(k.shape[0])
        slots = torch.tensor(table)[pos // page_size] * page_size + pos % page_size
        flat[0, slots], flat[1, slots] = k, v
    meta = build_metadata([n for _, n in seqs], lengths, tables, page_size)
    q = torch.randn(sum(n for _, n in seqs), hq, d, generator=gen)
    return types.SimpleNamespace(
        cache=cache.to(dtype), ks=[k.to(dtype) for k in ks], vs=[v.to(dtype) for v in vs],
        q=q.to(dtype), meta=meta, seqs=seqs, tables=tables)


def rows(batch):
    """(row range, sequence index) of each sequence's queries."""
    start = 0
    for b, (_, n) in enumerate(batch.seqs):
        yield slice(start, start + n), b
        start += n


# ---------------------------------------------------------------------------------------
# The reference against the dense oracle and transformers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size,d", [(4, 16), (16, 32)])
@pytest.mark.parametrize("name,spec", VARIANTS, ids=IDS)
def test_reference_matches_dense(monkeypatch, name, spec, page_size, d):
    """A mixed batch through gqa_attention (cache write, decode and prefill references)."""
    monkeypatch.setenv("TSCOMPILE_KERNELS", "gqa_decode=reference,gqa_prefill=reference")
    gen = torch.Generator().manual_seed(page_size + d)
    batch = paged_batch(SEQS, page_size, d, gen)
    args = variant_args(spec, gen)
    m = batch.meta
    # Only the prefixes are in the cache beforehand; the op writes the step's K/V.
    cache = batch.cache.clone()
    k_new = torch.cat([k[p:] for (p, _), k in zip(SEQS, batch.ks)])
    v_new = torch.cat([v[p:] for (p, _), v in zip(SEQS, batch.vs)])
    cache.view(2, -1, HKV, d)[:, m.slot_mapping] = 0.0
    out = gqa_attention(batch.q, k_new, v_new, cache, m.slot_mapping, m.block_tables,
                        m.query_start_loc, m.seq_lens, m.num_decodes, SCALE, **args)
    torch.testing.assert_close(cache, batch.cache)
    for r, b in rows(batch):
        want = dense(batch.q[r], batch.ks[b], batch.vs[b], SCALE, **args)
        torch.testing.assert_close(out[r].double(), want, atol=1e-5, rtol=1e-5)


def _attend_before(q, k, v, scale):
    """kernels/gqa.py's `_attend` as it was before the variants (frozen here)."""
    n, hq, _ = q.shape
    length, hkv, _ = k.shape
    rep = hq // hkv
    k = k.float().repeat_interleave(rep, dim=1)
    v = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    q_pos = torch.arange(length - n, length, device=q.device)[:, None]
    k_pos = torch.arange(length, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)


def test_defaults_are_bitwise_what_they_were():
    gen = torch.Generator().manual_seed(3)
    batch = paged_batch(SEQS, 4, 16, gen)
    m = batch.meta
    nd = m.num_decodes
    qsl = m.query_start_loc[nd:] - nd
    pre = gqa_prefill(batch.q[nd:], batch.cache, m.block_tables[nd:], qsl, m.seq_lens[nd:],
                      SCALE)
    dec = gqa_decode(batch.q[:nd], batch.cache, m.block_tables[:nd], m.seq_lens[:nd], SCALE)
    out = torch.cat([dec, pre])
    for r, b in rows(batch):
        assert torch.equal(out[r], _attend_before(batch.q[r], batch.ks[b], batch.vs[b], SCALE))
    # The variants at their "off" values, and a window longer than every context, too.
    off = gqa_decode(batch.q[:nd], batch.cache, m.block_tables[:nd], m.seq_lens[:nd], SCALE,
                     0, None, 0.0)
    wide = gqa_prefill(batch.q[nd:], batch.cache, m.block_tables[nd:], qsl, m.seq_lens[nd:],
                       SCALE, window=int(m.seq_lens.max()))
    assert torch.equal(off, dec) and torch.equal(wide, pre)


def _hf_layout(q, k, v):
    """[n, H, D] -> transformers' [1, H, n, D]."""
    return (t.transpose(0, 1)[None] for t in (q, k, v))


def test_reference_matches_transformers_gpt_oss_sinks_and_sliding_window():
    from transformers.masking_utils import sliding_window_causal_mask_function
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    gen = torch.Generator().manual_seed(11)
    window, prefix, n, d = 7, 13, 9, 16               # a chunk over a cached prefix
    batch = paged_batch([(prefix, n)], 4, d, gen)
    sinks = torch.randn(HQ, generator=gen) * 2
    m = batch.meta
    ours = gqa_prefill_reference(batch.q, batch.cache, m.block_tables, m.query_start_loc,
                                 m.seq_lens, SCALE, window, sinks)
    q_idx = torch.arange(prefix, prefix + n)[:, None]            # absolute positions
    kv_idx = torch.arange(prefix + n)[None, :]
    allowed = sliding_window_causal_mask_function(window)(0, 0, q_idx, kv_idx)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = types.SimpleNamespace(sinks=sinks, num_key_value_groups=HQ // HKV, training=False)
    q, k, v = _hf_layout(batch.q, batch.ks[0], batch.vs[0])
    theirs, _ = eager_attention_forward(module, q, k, v, mask[None, None], SCALE)
    torch.testing.assert_close(ours, theirs[0], atol=1e-6, rtol=1e-5)


def test_reference_matches_transformers_gemma2_softcap():
    from transformers.masking_utils import sliding_window_causal_mask_function
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    gen = torch.Generator().manual_seed(12)
    softcap, window, prefix, n, d = 0.8, 6, 10, 7, 32   # Gemma-2: capped, windowed layer
    batch = paged_batch([(prefix, n)], 16, d, gen)
    m = batch.meta
    module = types.SimpleNamespace(num_key_value_groups=HQ // HKV, training=False,
                                   head_dim=d)
    q, k, v = _hf_layout(batch.q, batch.ks[0], batch.vs[0])
    q_idx = torch.arange(prefix, prefix + n)[:, None]
    kv_idx = torch.arange(prefix + n)[None, :]
    for w in (0, window):
        allowed = (kv_idx <= q_idx if w == 0
                   else sliding_window_causal_mask_function(w)(0, 0, q_idx, kv_idx))
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        theirs, _ = eager_attention_forward(module, q, k, v, mask[None, None], scaling=SCALE,
                                            softcap=softcap)
        ours = gqa_prefill_reference(batch.q, batch.cache, m.block_tables, m.query_start_loc,
                                     m.seq_lens, SCALE, w, None, softcap)
        torch.testing.assert_close(ours, theirs[0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# The op surface: validation, registry facts, fake shapes
# ---------------------------------------------------------------------------------------
def test_bad_variant_arguments_are_named():
    gen = torch.Generator().manual_seed(0)
    batch = paged_batch([(3, 1)], 4, 16, gen)
    m = batch.meta
    call = lambda **kw: gqa_decode(batch.q, batch.cache, m.block_tables, m.seq_lens,  # noqa
                                   SCALE, **kw)
    with pytest.raises(ValueError, match=r"sinks must be a floating \[4\] tensor .* \[8\]"):
        call(sinks=torch.zeros(8))
    with pytest.raises(ValueError, match="window must be >= 0"):
        call(window=-1)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        call(softcap=-2.0)


def test_registry_queries_name_the_variants_that_are_on(monkeypatch):
    """A backend that cannot run a variant refuses it from these facts (none is dropped)."""
    seen = []

    def spy(op, *args, **facts):
        seen.append((op, len(args), facts))
        return torch.empty_like(args[0])

    monkeypatch.setattr(gqa_mod, "dispatch", spy)
    gen = torch.Generator().manual_seed(0)
    batch = paged_batch([(3, 1), (0, 5)], 4, 16, gen)
    m = batch.meta
    sinks = torch.zeros(HQ)
    gqa_attention(batch.q, batch.q[:, :HKV], batch.q[:, :HKV], batch.cache, m.slot_mapping,
                  m.block_tables, m.query_start_loc, m.seq_lens, m.num_decodes, SCALE)
    gqa_attention(batch.q, batch.q[:, :HKV], batch.q[:, :HKV], batch.cache, m.slot_mapping,
                  m.block_tables, m.query_start_loc, m.seq_lens, m.num_decodes, SCALE,
                  window=8, sinks=sinks, softcap=30.0)
    plain = {"head_dim": 16}
    on = {"head_dim": 16, "sliding_window": 8, "sinks": 1, "softcap": 1}
    assert seen == [("gqa_decode", 8, plain), ("gqa_prefill", 9, plain),
                    ("gqa_decode", 8, on), ("gqa_prefill", 9, on)]


def test_ops_trace_on_meta_with_variants():
    q = torch.empty(5, HQ, 16, device="meta")
    kv = torch.empty(5, HKV, 16, device="meta")
    cache = torch.empty(2, 4, 4, HKV, 16, device="meta")
    i32 = dict(dtype=torch.int32, device="meta")
    out = torch.ops.tscompile.gqa_attention(
        q, kv, kv, cache, torch.empty(5, dtype=torch.int64, device="meta"),
        torch.empty(2, 2, **i32), torch.empty(3, **i32), torch.empty(2, **i32), 1, SCALE,
        window=128, sinks=torch.empty(HQ, device="meta"), softcap=30.0)
    assert out.shape == (5, HQ, 16)
    schema = str(torch.ops.tscompile.gqa_attention.default._schema)
    assert "SymInt window=0, Tensor? sinks=None, float softcap=0." in schema


# ---------------------------------------------------------------------------------------
# Triton kernels against the reference (interpreter)
# ---------------------------------------------------------------------------------------
try:
    from tscompile.kernels.triton import gqa as tgqa
except ImportError:                                # no triton: the reference tests still run
    tgqa = None
needs_triton = pytest.mark.skipif(tgqa is None, reason="needs the triton package")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def close(out, want, dtype=torch.float32):
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


DECODE_SEQS = [(0, 1), (4, 1), (16, 1), (39, 1), (63, 1)]   # contexts 1 .. 64
PREFILL_SEQS = [(0, 19), (9, 1), (21, 40), (3, 5), (32, 16)]


@needs_triton
@pytest.mark.parametrize("page_size,d", [(4, 16), (16, 32)])
@pytest.mark.parametrize("name,spec", VARIANTS, ids=IDS)
def test_triton_decode_matches_reference(name, spec, page_size, d):
    gen = torch.Generator().manual_seed(page_size * d)
    batch = paged_batch(DECODE_SEQS, page_size, d, gen)
    args = variant_args(spec, gen)
    m = batch.meta
    want = gqa_decode_reference(batch.q, batch.cache, m.block_tables, m.seq_lens, SCALE,
                                **args)
    for splits in (1, 3):                      # 3: the reduction kernel folds the sinks
        out = tgqa.decode(batch.q, batch.cache, m.block_tables, m.seq_lens, SCALE, **args,
                          splits=splits, block_n=16)
        close(out, want)


@needs_triton
@pytest.mark.parametrize("page_size,d", [(4, 16), (16, 32)])
@pytest.mark.parametrize("name,spec", VARIANTS, ids=IDS)
def test_triton_prefill_matches_reference(name, spec, page_size, d):
    gen = torch.Generator().manual_seed(page_size + d)
    batch = paged_batch(PREFILL_SEQS, page_size, d, gen)
    args = variant_args(spec, gen)
    m = batch.meta
    want = gqa_prefill_reference(batch.q, batch.cache, m.block_tables, m.query_start_loc,
                                 m.seq_lens, SCALE, **args)
    out = tgqa.prefill(batch.q, batch.cache, m.block_tables, m.query_start_loc, m.seq_lens,
                       SCALE, **args, block_m=16, block_n=16)
    close(out, want)


@needs_triton
@pytest.mark.parametrize("name,spec", VARIANTS, ids=IDS)
def test_triton_split_prefill_matches_reference(name, spec):
    """The split-KV prefill with each variant: windows cut the splits' ranges, sinks are
    folded in the reduction, the soft cap applies per split."""
    gen = torch.Generator().manual_seed(len(name))
    batch = paged_batch([(40, 3), (9, 1), (21, 40), (0, 12)], 4, 16, gen)
    args = variant_args(spec, gen)
    m = batch.meta
    want = gqa_prefill_reference(batch.q, batch.cache, m.block_tables, m.query_start_loc,
                                 m.seq_lens, SCALE, **args)
    for splits in (2, 5):
        out = tgqa.prefill(batch.q, batch.cache, m.block_tables, m.query_start_loc,
                           m.seq_lens, SCALE, **args, block_m=16, block_n=16, splits=splits)
        close(out, want)


@needs_triton
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 32), (32, 16)])
def test_triton_prefill_window_phases(block_m, block_n):
    """Windows around the tile sizes, so the masked lower-edge phase, the unmasked middle
    and the diagonal meet at every offset; with sinks on every other window."""
    gen = torch.Generator().manual_seed(block_m * block_n)
    batch = paged_batch([(0, 50), (37, 33), (70, 20)], 4, 16, gen)
    m = batch.meta
    sinks = torch.randn(HQ, generator=gen)
    for i, window in enumerate((1, 2, 7, 16, 17, 31, 48)):
        s = sinks if i % 2 else None
        want = gqa_prefill_reference(batch.q, batch.cache, m.block_tables, m.query_start_loc,
                                     m.seq_lens, SCALE, window, s)
        out = tgqa.prefill(batch.q, batch.cache, m.block_tables, m.query_start_loc,
                           m.seq_lens, SCALE, window, s, block_m=block_m, block_n=block_n)
        close(out, want)


@needs_triton
def test_triton_bf16_all_variants():
    gen = torch.Generator().manual_seed(21)
    args = variant_args(dict(window=10, sinks=True, softcap=1.5), gen)
    dec = paged_batch(DECODE_SEQS, 4, 32, gen, dtype=torch.bfloat16)
    m = dec.meta
    close(tgqa.decode(dec.q, dec.cache, m.block_tables, m.seq_lens, SCALE, **args, splits=3,
                      block_n=16),
          gqa_decode_reference(dec.q, dec.cache, m.block_tables, m.seq_lens, SCALE, **args),
          torch.bfloat16)
    pre = paged_batch(PREFILL_SEQS, 16, 32, gen, dtype=torch.bfloat16)
    m = pre.meta
    close(tgqa.prefill(pre.q, pre.cache, m.block_tables, m.query_start_loc, m.seq_lens, SCALE,
                       **args, block_m=16, block_n=16),
          gqa_prefill_reference(pre.q, pre.cache, m.block_tables, m.query_start_loc,
                                m.seq_lens, SCALE, **args), torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("page_size", [4, 16])
def test_keys_before_the_window_are_never_read(page_size):
    """NaN in every K/V position that no query of the step can see (before the window of
    each sequence's first query): the kernels skip those keys, so nothing turns NaN, and
    the result is the dense one on the clean K/V."""
    gen = torch.Generator().manual_seed(page_size)
    window = 6
    seqs = [(45, 1), (22, 1), (30, 17), (9, 12)]          # decodes first
    batch = paged_batch(seqs, page_size, 16, gen)
    m = batch.meta
    flat = batch.cache.view(2, -1, HKV, 16)
    for (prefix, _), table in zip(seqs, batch.tables):
        first = max(prefix - window + 1, 0)               # the first query's first key
        pos = torch.arange(first)
        flat[:, torch.tensor(table, dtype=torch.long)[pos // page_size] * page_size
             + pos % page_size] = float("nan")
    sinks = torch.randn(HQ, generator=gen)
    nd = m.num_decodes
    dec = tgqa.decode(batch.q[:nd], batch.cache, m.block_tables[:nd], m.seq_lens[:nd], SCALE,
                      window, sinks, splits=2, block_n=16)
    qsl = m.query_start_loc[nd:] - nd
    pre = tgqa.prefill(batch.q[nd:], batch.cache, m.block_tables[nd:], qsl, m.seq_lens[nd:],
                       SCALE, window, sinks, block_m=16, block_n=16)
    ref = gqa_prefill_reference(batch.q, batch.cache, m.block_tables, m.query_start_loc,
                                m.seq_lens, SCALE, window, sinks)
    out = torch.cat([dec, pre])
    for r, b in rows(batch):
        want = dense(batch.q[r], batch.ks[b], batch.vs[b], SCALE, window, sinks)
        close(out[r], want)
        close(ref[r], want)


@needs_triton
def test_triton_through_the_op_mixed_batch(monkeypatch):
    """gqa_attention with the Triton backends forced: cache write, then both kernels, with
    every variant on, against the same call on the reference backends."""
    gen = torch.Generator().manual_seed(5)
    batch = paged_batch(SEQS, 4, 32, gen)
    args = variant_args(dict(window=10, sinks=True, softcap=1.5), gen)
    m = batch.meta
    k_new = torch.cat([k[p:] for (p, _), k in zip(SEQS, batch.ks)])
    v_new = torch.cat([v[p:] for (p, _), v in zip(SEQS, batch.vs)])
    outs = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("TSCOMPILE_KERNELS", f"gqa_decode={backend},gqa_prefill={backend}")
        cache = batch.cache.clone()
        outs.append(gqa_attention(batch.q, k_new, v_new, cache, m.slot_mapping, m.block_tables,
                                  m.query_start_loc, m.seq_lens, m.num_decodes, SCALE, **args))
    close(*outs)


# ---------------------------------------------------------------------------------------
# GPT-OSS-20B head shapes on a GPU (`-m gpu`): Hq 64, Hkv 8, D 64, window 128, bf16
# ---------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_VARIANTS = [("default", {}), ("window", dict(window=128)), ("sinks", dict(sinks=True)),
                ("softcap", dict(softcap=30.0)), ("window+sinks", dict(window=128, sinks=True))]


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("name,spec", GPU_VARIANTS, ids=[n for n, _ in GPU_VARIANTS])
def test_gpu_gpt_oss_shapes(name, spec):
    gen = torch.Generator().manual_seed(0)
    args = variant_args(spec, gen, hq=64)
    args = {k: v.cuda() if torch.is_tensor(v) else v for k, v in args.items()}
    dec = paged_batch([(20000, 1), (3000, 1), (100, 1), (130, 1)], 16, 64, gen,
                      dtype=torch.bfloat16, hq=64, hkv=8)
    m = dec.meta.to("cuda")
    q, cache = dec.q.cuda(), dec.cache.cuda()
    close(tgqa.decode(q, cache, m.block_tables, m.seq_lens, 0.125, **args),
          gqa_decode_reference(q, cache, m.block_tables, m.seq_lens, 0.125, **args),
          torch.bfloat16)
    pre = paged_batch([(3000, 517), (0, 1), (130, 300)], 16, 64, gen, dtype=torch.bfloat16,
                      hq=64, hkv=8)
    m = pre.meta.to("cuda")
    q, cache = pre.q.cuda(), pre.cache.cuda()
    close(tgqa.prefill(q, cache, m.block_tables, m.query_start_loc, m.seq_lens, 0.125, **args),
          gqa_prefill_reference(q, cache, m.block_tables, m.query_start_loc, m.seq_lens, 0.125,
                                **args), torch.bfloat16)
