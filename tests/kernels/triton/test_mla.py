"""Triton MLA (`kernels/triton/mla.py`) against the references in `kernels/mla.py`.

The unmarked tests use tiny, deliberately awkward shapes (non-power-of-2 rank, rope, head and
value dims; pages of 4 tokens; contexts of 1 token; split counts that leave splits empty; row
groups that straddle tokens) in fp32, compared at atol/rtol 1e-4; on the CPU they run in
Triton's interpreter, on a GPU machine compiled (fp32 dots in IEEE mode). One fp16 test
(rel. error < 1e-2; bf16 dots are wrong in the interpreter under NumPy 2.4, so bf16 is tested
on the GPU only). GPU tests (`-m gpu`) run Kimi-sized shapes in bf16 (and an fp8-e4m3 cache)
against the fp32 reference on upcast inputs, by relative Frobenius error < 1e-2.
"""
from __future__ import annotations

import pytest
import torch

from tscompile.kernels import build_metadata, mla_attention, mla_decode, mla_prefill
from tscompile.kernels.mla import mla_decode_reference, mla_prefill_reference
from tscompile.kernels.triton import INTERPRET
from tscompile.kernels.triton import mla as tmla

H, DN, DR, DV, L = 5, 12, 8, 10, 24   # heads, nope dim, rope dim, value dim, kv_lora_rank
R = L + DR
PS = 4                                # page size
SCALE = 0.3
DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _paged(lengths, *, rank=L, rope=DR, page=PS, dtype=torch.float32, device=DEV, seed=0):
    """A random cache (garbage outside the tables) and random, non-contiguous block tables
    with room for `lengths` tokens per sequence."""
    g = torch.Generator().manual_seed(seed)
    need = [max(1, -(-n // page)) for n in lengths]
    nb = sum(need) + 3
    cache = torch.randn(nb, page, rank + rope, generator=g)
    perm = torch.randperm(nb, generator=g).tolist()
    tables = []
    for k in need:
        tables.append(perm[:k])
        perm = perm[k:]
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return cache.to(device=device, dtype=dtype), bt.to(device)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(device=DEV, dtype=dtype)


def _lens(lengths):
    return torch.tensor(lengths, dtype=torch.int32, device=DEV)


def _force(monkeypatch, *ops):
    monkeypatch.setenv("TSCOMPILE_KERNELS", ",".join(f"{op}=triton" for op in ops))


def _rel_err(out, ref):
    assert not out.isnan().any(), "NaN in the kernel's output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ---- decode (absorbed) -------------------------------------------------------------------

@pytest.mark.parametrize("page", [4, 16], ids=["tile-spans-pages", "tile-in-one-page"])
@pytest.mark.parametrize("splits", [None, 1, 3, 7], ids=lambda s: f"splits={s}")
def test_decode_matches_reference(splits, page):
    lengths = [1, 6, 17, 33]                     # a 1-token context; page tails of 1, 2, 1
    cache, bt = _paged(lengths, page=page, seed=1)
    q = _randn(len(lengths), H, R)
    seq_lens = _lens(lengths)
    out = tmla.decode_rows(q, cache, bt, seq_lens, SCALE, L, splits=splits)
    ref = mla_decode_reference(q, cache, bt, seq_lens, SCALE, L)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_decode_two_tiles_per_page():
    # PAGE_SIZE a multiple of BLOCK_N (> 1 tile per page): the carried next-page id is the
    # same page twice, then the next one; splits ending inside a page and empty splits.
    lengths = [4, 40, 75, 16]
    cache, bt = _paged(lengths, page=32, seed=5)
    q = _randn(len(lengths), 4, H, R)
    seq_lens = _lens(lengths)
    ref = _folded_reference(q, cache, bt, seq_lens, SCALE, L)
    for splits in (1, 3, 6):
        out = tmla.mla_decode_folded(q, cache, bt, seq_lens, SCALE, L, splits=splits,
                                     block_n=16)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_decode_through_the_public_op(monkeypatch):
    _force(monkeypatch, "mla_decode")
    lengths = [9, 40]
    cache, bt = _paged(lengths, seed=2)
    q = _randn(2, 20, R)                     # 20 heads: two row groups of 16
    seq_lens = _lens(lengths)
    out = mla_decode(q, cache, bt, seq_lens, SCALE, L)
    torch.testing.assert_close(out, mla_decode_reference(q, cache, bt, seq_lens, SCALE, L),
                               atol=1e-4, rtol=1e-4)


def test_decode_empty_context_gives_zeros_and_leaves_others_alone():
    # A padding sequence of a CUDA-graph bucket (seq_len 0) must not poison the batch.
    lengths = [0, 11]
    cache, bt = _paged(lengths, seed=3)
    q = _randn(2, H, R)
    seq_lens = _lens(lengths)
    for splits in (1, 4):
        out = tmla.decode_rows(q, cache, bt, seq_lens, SCALE, L, splits=splits)
        assert torch.equal(out[0], torch.zeros(H, L, device=DEV))
        ref = mla_decode_reference(q[1:], cache, bt[1:], seq_lens[1:], SCALE, L)
        torch.testing.assert_close(out[1:], ref, atol=1e-4, rtol=1e-4)


def _folded_reference(q, cache, bt, seq_lens, scale, rank):
    """Q causal one-token decodes: token i of Q sees seq_len - Q + 1 + i positions."""
    q_len = q.shape[1]
    return torch.stack([mla_decode_reference(q[:, i], cache, bt, seq_lens - (q_len - 1 - i),
                                             scale, rank) for i in range(q_len)], dim=1)


@pytest.mark.parametrize("page", [4, 16], ids=["tile-spans-pages", "tile-in-one-page"])
@pytest.mark.parametrize("q_len,heads,splits", [(2, 5, None), (3, 6, 5), (4, 4, 1)])
def test_decode_folded_query_tokens_are_causal(q_len, heads, splits, page):
    lengths = [q_len, q_len + 5, 30]              # the first: token 0 sees one key
    cache, bt = _paged(lengths, page=page, seed=4)
    q = _randn(len(lengths), q_len, heads, R)
    seq_lens = _lens(lengths)
    out = tmla.mla_decode_folded(q, cache, bt, seq_lens, SCALE, L, splits=splits)
    assert out.shape == (len(lengths), q_len, heads, L)
    torch.testing.assert_close(out, _folded_reference(q, cache, bt, seq_lens, SCALE, L),
                               atol=1e-4, rtol=1e-4)


def test_decode_folded_rejects_a_flat_query():
    cache, bt = _paged([4], seed=5)
    with pytest.raises(ValueError, match=r"q must be \[B, Q, H, 32\]"):
        tmla.mla_decode_folded(_randn(1, H, R), cache, bt, _lens([4]), SCALE, L)


# ---- prefill (expanded) ------------------------------------------------------------------

def _prefill_inputs(qlens, lengths, heads=H, seed=6, dtype=torch.float32, device=DEV,
                    dims=(DN, DR, DV, L), page=PS):
    dn, dr, dv, rank = dims
    cache, bt = _paged(lengths, rank=rank, rope=dr, page=page, dtype=dtype, device=device,
                       seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = sum(qlens)
    q_nope, q_pe = torch.randn(t, heads, dn, generator=g), torch.randn(t, heads, dr, generator=g)
    w_kc = torch.randn(heads, dn, rank, generator=g) / rank ** 0.5
    w_vc = torch.randn(heads, rank, dv, generator=g) / rank ** 0.5
    meta = build_metadata(qlens, lengths, bt.tolist(), page, device=device)
    to = dict(device=device, dtype=dtype)
    return (q_nope.to(**to), q_pe.to(**to), cache, w_kc.to(**to), w_vc.to(**to),
            meta.block_tables, meta.query_start_loc, meta.seq_lens)


@pytest.mark.parametrize("qlens,lengths", [
    ([3, 20, 2], [3, 47, 6]),        # empty prefix; 2 query tiles over a 27-token prefix
    ([1], [13]),                     # a chunk of one token
    ([5, 1], [5, 1]),                # whole prompts, one of a single token
], ids=["mixed", "chunk-of-1", "no-prefix"])
def test_prefill_matches_reference(monkeypatch, qlens, lengths):
    _force(monkeypatch, "mla_prefill")
    args = _prefill_inputs(qlens, lengths)
    out = mla_prefill(*args, SCALE)
    assert out.shape == (sum(qlens), H, DV)
    torch.testing.assert_close(out, mla_prefill_reference(*args, SCALE), atol=1e-4, rtol=1e-4)


def test_attention_op_runs_both_triton_kernels(monkeypatch):
    """mla_attention (cache write, absorbed decode of the first two, expanded prefill of the
    rest) with both kernels forced equals the all-reference run."""
    qlens, lengths = [1, 1, 6], [9, 3, 14]
    q_nope, q_pe, cache, w_kc, w_vc, bt, _, _ = _prefill_inputs(qlens, lengths, seed=8)
    meta = build_metadata(qlens, lengths, bt.tolist(), PS, device=DEV)
    kv_c, k_pe = _randn(8, L), _randn(8, DR)
    outs = []
    for forced in ("mla_decode=triton,mla_prefill=triton", "*=reference"):
        monkeypatch.setenv("TSCOMPILE_KERNELS", forced)
        outs.append(mla_attention(q_nope, q_pe, kv_c, k_pe, cache.clone(), w_kc, w_vc,
                                  meta.slot_mapping, meta.block_tables, meta.query_start_loc,
                                  meta.seq_lens, meta.num_decodes, SCALE))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_prefill_fp16():
    args = _prefill_inputs([3, 20], [3, 41], seed=14, dtype=torch.float16)
    out = tmla.prefill(*args, SCALE)
    ref = mla_prefill_reference(*[a.float() if a.is_floating_point() else a for a in args],
                                SCALE)
    assert _rel_err(out, ref) < 1e-2


def test_fp8_cache_prefill_and_decode_fp16():
    """An fp8-e4m3 latent cache (`--kv-cache-dtype fp8`) under fp16 queries: the expand and
    decode kernels upcast the cache rows; the reference reads the same fp8 values."""
    args = list(_prefill_inputs([3, 20], [3, 41], seed=16, dtype=torch.float16))
    args[2] = args[2].to(torch.float8_e4m3fn)
    out = tmla.prefill(*args, SCALE)
    ref = mla_prefill_reference(*[a.float() if a.is_floating_point() else a for a in args],
                                SCALE)
    assert _rel_err(out, ref) < 1e-2
    cache, bt = _paged([2, 40], seed=17)
    cache8 = cache.to(torch.float8_e4m3fn)
    q = _randn(2, H, R, dtype=torch.float16)
    out = tmla.decode_rows(q, cache8, bt, _lens([2, 40]), SCALE, L)
    ref = mla_decode_reference(q.float(), cache8.float(), bt, _lens([2, 40]), SCALE, L)
    assert _rel_err(out, ref) < 1e-2


def test_decode_folded_fp16():
    cache, bt = _paged([2, 40], dtype=torch.float16, seed=15)
    q = _randn(2, 2, 9, R, dtype=torch.float16)
    out = tmla.mla_decode_folded(q, cache, bt, _lens([2, 40]), SCALE, L, splits=3)
    ref = _folded_reference(q.float(), cache.float(), bt, _lens([2, 40]), SCALE, L)
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.skipif(not INTERPRET, reason="the CPU registration exists under the interpreter")
def test_registered_below_reference_on_cpu():
    from tscompile.kernels import REGISTRY
    from tscompile.kernels.registry import Query

    q = Query(torch.device("cpu"), torch.float32, (("kv_lora_rank", 512), ("rope_dim", 64)))
    assert REGISTRY.select("mla_decode", q).backend == "reference"
    assert "mla_decode/triton (priority -10): eligible" in REGISTRY.explain("mla_decode", q)
    big = Query(torch.device("cpu"), torch.float32, (("kv_lora_rank", 4096),))
    assert "kv_lora_rank 4096 outside" in REGISTRY.explain("mla_prefill", big)


# ---- GPU, Kimi K2.5 shapes (kv_lora_rank 512, rope 64, nope/value 128) -------------------

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads,lengths,page", [
    (16, [1, 700, 5000, 64], 64), (128, [3000, 257], 64), (16, [999, 2], 16), (64, [4097], 64),
], ids=["tp4", "tp1-128h", "page16", "64h"])
def test_gpu_decode_bf16(heads, lengths, page):
    cache, bt = _paged(lengths, rank=512, rope=64, page=page, dtype=torch.bfloat16,
                       device="cuda", seed=10)
    q = torch.randn(len(lengths), heads, 576, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    ref = mla_decode_reference(q.float(), cache.float(), bt, seq_lens, 576 ** -0.5, 512)
    for splits in (None, 1, 9):
        out = tmla.decode_rows(q, cache, bt, seq_lens, 576 ** -0.5, 512, splits=splits)
        assert _rel_err(out, ref) < 1e-2, splits


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("q_len,heads", [(2, 16), (4, 16), (4, 32), (3, 16)])
def test_gpu_decode_folded_bf16(q_len, heads):
    lengths = [q_len, 3000, 777]
    cache, bt = _paged(lengths, rank=512, rope=64, page=64, dtype=torch.bfloat16,
                       device="cuda", seed=11)
    q = torch.randn(3, q_len, heads, 576, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = tmla.mla_decode_folded(q, cache, bt, seq_lens, 576 ** -0.5, 512)
    ref = _folded_reference(q.float(), cache.float(), bt, seq_lens, 576 ** -0.5, 512)
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("launch", [
    {}, dict(block_h=64, block_n=32, num_warps=8, num_stages=4),
    dict(block_h=64, block_n=32, num_warps=8, num_stages=3),
    dict(block_h=64, block_n=16, num_warps=8, num_stages=6),
], ids=["default", "bn32-s4", "bn32-s3", "bn16-s6"])
def test_gpu_decode_folded_launches(launch):
    # The q_len 4 x 16 heads configurations of the benchmark sweep: contexts shorter than
    # the pipeline's depth, page tails, splits that end mid-page or are empty.
    lengths = [4, 37, 129, 3000, 64]
    cache, bt = _paged(lengths, rank=512, rope=64, page=64, dtype=torch.bfloat16,
                       device="cuda", seed=14)
    q = torch.randn(len(lengths), 4, 16, 576, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    ref = _folded_reference(q.float(), cache.float(), bt, seq_lens, 576 ** -0.5, 512)
    for splits in (None, 1, 7):
        out = tmla.mla_decode_folded(q, cache, bt, seq_lens, 576 ** -0.5, 512, splits=splits,
                                     **launch)
        assert _rel_err(out, ref) < 1e-2, splits


@pytest.mark.gpu
@gpu
def test_gpu_decode_fp8_cache():
    lengths = [1500, 33]
    cache, bt = _paged(lengths, rank=512, rope=64, page=64, dtype=torch.bfloat16,
                       device="cuda", seed=12)
    cache8 = cache.to(torch.float8_e4m3fn)
    q = torch.randn(2, 16, 576, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = tmla.decode_rows(q, cache8, bt, seq_lens, 576 ** -0.5, 512)
    assert out.dtype == torch.bfloat16
    ref = mla_decode_reference(q.float(), cache8.float(), bt, seq_lens, 576 ** -0.5, 512)
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("qlens,lengths", [([300, 1], [2300, 40]), ([129], [129])])
def test_gpu_prefill_bf16(qlens, lengths):
    args = _prefill_inputs(qlens, lengths, heads=16, seed=13, dtype=torch.bfloat16,
                           device="cuda", dims=(128, 64, 128, 512), page=64)
    out = tmla.prefill(*args, 192 ** -0.5)
    ref = mla_prefill_reference(*[a.float() if a.is_floating_point() else a for a in args],
                                192 ** -0.5)
    assert _rel_err(out, ref) < 1e-2
