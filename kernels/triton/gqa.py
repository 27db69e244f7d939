"""Triton paged GQA attention: split-KV decode and a flash-attention prefill over pages.

What it is: the "triton" backend of `gqa_decode` and `gqa_prefill` (reference and op
definitions: `kernels/gqa.py`; cache layout and metadata: `kernels/paged.py`). Both read
`kv_cache[2, NB, PS, Hkv, D]` through `block_tables` token by token (any page size), keep the
softmax in fp32 (exp2 of `s * scale * log2(e) - max`, one FMA a score) and write
`out [.., Hq, D]` in q's dtype. Limits: head dim <= 128 (any, masked to a power of two),
scale > 0, up to 128 query heads per KV head; bf16/fp16 (fp32 too, exact but slow on GPU).
The cache may be fp8-e4m3 (`tsrun --kv-cache-dtype fp8`): each K/V tile is upcast to q's
dtype after the load, so the dots and the softmax are those of a bf16 cache on half the
bytes. No host synchronisation and no data-dependent launch shape: both run inside
CUDA-graph capture. What it is not: the cache write (`gqa_attention` does that before
dispatching), per-head fp8 scales or ALiBi.

Variants (semantics: `kernels/gqa.py`), each a constexpr flag, so the plain path compiles
to the same code as without them:
* sliding window W: decode reads only the last W keys (the splits divide
  `[max(L - W, 0), L)`, and S is picked for min(capacity, W)); a prefill query tile starts
  at the window of its first query, `prefix + m0 - W + 1`, with one masked phase for the
  tiles that cross the window's lower edge before the unmasked and diagonal phases. Keys
  before the window of a chunk's first query (and their block-table entries) are never
  read, so their pages may hold anything.
* sinks: folded in once per row after the key loop (decode: in the reduction when S > 1)
  as `l = l * 2^(m - m') + 2^(s_h log2(e) - m')`, `m' = max(m, s_h log2(e))`.
* softcap c: `s <- (c / scale) * tanh(s * scale / c)` on each QK^T tile before the max, so
  the rest of the loop is unchanged. tanh is computed as (1 - e^-2|x|) / (1 + e^-2|x|) with
  exp2 (the interpreter has no libdevice): one more exp2 and a division per score.

Legend: B sequences, T query tokens, Hq query heads, Hkv KV heads, G = Hq / Hkv query heads
per KV head, D head dim, L context length, PS page size, S splits of the context.

Decode (flash-decoding): grid (B, Hkv, S). A program owns one KV head and the
L/S-long slice `[s*chunk, (s+1)*chunk)` of one sequence (chunk rounded to BLOCK_N, computed
per sequence in-kernel, so short and long sequences are both spread over all S programs); it
loads each K/V page of its slice once for all G query heads of the group (q is a [G, D]
tile padded to >= 16 rows, so QK^T and PV are tensor-core dots), runs an online softmax
and writes partial (max, sum, acc) in fp32. `_decode_reduce_kernel` (grid (B, Hq)) rescales
and sums the S partials. With S == 1 the split kernel normalises and writes `out` itself (no
second launch).
    bytes  = 2 * L * Hkv * D * elem per sequence (K and V once) + q + out
             + partials 2 * B * Hq * S * (D + 2) * 4 (under 1% at the sizes below)
    FLOPs  = 4 * L * Hq * D per sequence: bf16 intensity 4 Hq D / (2 Hkv D 2) = G FLOP/byte,
    memory bound by far (H100: ~3 TB/s vs ~800 TFLOP/s, ridge ~270 FLOP/byte).
    e.g. Llama-3.1-8B (Hq 32, Hkv 8, D 128) bf16, 32 x 8K: 1.07 GB of K/V -> ~360 us at 3 TB/s.
    With a window W, L -> min(L, W): GPT-OSS-20B's windowed layers (W 128, Hkv 8, D 64)
    read 256 KB per sequence whatever the context, launch-latency bound at small batch.
S is picked on the host from the static shapes (B, Hkv, the block table's capacity
MB*PS, the SM count): the most splits that keep B*Hkv*S within one wave of resident programs
(4 per SM), so the GPU fills at B=1 and 128K context (S = 64, 2K tokens per program) and
S -> 1 once B*Hkv reaches 4*SMs.
Measured (bf16, Llama-8B heads, PS 16, scattered pages, CUDA graph): the gqa_decode_* rows
of benchmarks/results/kernels/h100_all_ebb1674.json (H100) and h200_all_run2.json (H200);
the figures first written here (H100) are in NOTES_from_docstrings.md.

Prefill (flash-attention forward over pages): grid (T // BLOCK_M + B, Hq). Query tiles are
laid out per sequence (sequence b's tiles start at query_start_loc[b] // BLOCK_M + b, the
mapping inverted by a binary search in-kernel; surplus programs exit), heaviest tiles first.
A program holds BLOCK_M queries of one head and streams K/V tiles of BLOCK_N keys: keys
before the tile's first query position `prefix + m0` are visible to every row (no mask);
only the tiles that cross the diagonal (`[prefix + m0, prefix + m0 + BLOCK_M)`) are masked.
    FLOPs  = 4 * Hq * D * sum_i (prefix + i + 1) over the chunk's queries (causal)
    bytes  = q + out + K/V of the context, re-read from L2 by each query tile and head.
    Compute bound (4K chunk over 16K prefix: ~1.3 TFLOP for Llama-8B vs ~0.1 GB).
Measured: the gqa_prefill_* rows of the same files (about half the bf16 mm roof; the
figures first written here are in NOTES_from_docstrings.md). The K/V tiles are gathered
token by token (cp.async, 16-byte rows), not by TMA, and there is no warp specialisation:
the gap to FA3-class kernels (~70% of the mm roof) is there.
Tile sizes are fixed per head dim (no autotuning: first calls may be inside graph capture).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..registry import Query, register
from . import INTERPRET, requirements

PRIO = -10 if INTERPRET else 10
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 128               # tuned for 64 and 128; larger D: reference
_MAX_GROUP = 128
_LOG2E_C: tl.constexpr = tl.constexpr(_LOG2E)


def _shape_check(q: Query) -> str | None:
    d = q.get("head_dim")
    if d is not None and not 1 <= d <= _MAX_HEAD_DIM:
        return f"head_dim {d} outside [1, {_MAX_HEAD_DIM}]"
    return None


# Every variant of kernels/gqa.py (sliding_window, sinks, softcap) runs here: nothing to refuse.
REQ = requirements(frozenset({torch.bfloat16, torch.float16, torch.float32}), _shape_check)


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    # fp32 caches: exact fp32 products (tf32 would miss the reference by ~1e-3). Also bf16
    # under the interpreter, whose dot multiplies bf16's raw uint16 storage: upcasting the
    # (already bf16-rounded) operands gives what the tensor cores compute.
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def _fp32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


@triton.jit
def _softcap(s, cap_in, cap_out):
    # cap_out * tanh(s * cap_in), with cap_in = scale / c and cap_out = c / scale: the capped
    # score c * tanh(s * scale / c) divided by scale again, so the caller's `s * qk_scale`
    # stays as it is. tanh|x| = (1 - e^-2|x|) / (1 + e^-2|x|): no overflow for any x.
    x = s * cap_in
    t = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E_C))
    th = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -th, th) * cap_out


@triton.jit
def _fold_sink(m_i, l_i, acc, sink):
    # The sink as one more key of value 0: rescale to m' = max(m, sink), add 2^(sink - m').
    # All in log2 units; m_i = -inf (no key) gives alpha = 0 and l = 1, out = 0.
    m_f = tl.maximum(m_i, sink)
    alpha = tl.exp2(m_i - m_f)
    return l_i * alpha + tl.exp2(sink - m_f), acc * alpha[:, None]


# ----------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, sinks_ptr,
    qk_scale,                                  # scale * log2(e)
    window, cap_in, cap_out,                   # variants (read only under their flags)
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cblk, stride_cslot, stride_chead,   # kv_cache[i] strides (block, slot, head)
    stride_btb,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
    WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    hq = tl.num_programs(1) * G

    seq_len = tl.load(seq_lens_ptr + b)
    if WINDOW:
        # The query (position seq_len - 1) sees [seq_len - window, seq_len): split that.
        lo = tl.maximum(seq_len - window, 0)
        chunk = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * chunk
    else:
        chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    d_mask = offs_d < HEAD_DIM
    heads = kvh * G + offs_g                                          # [BG] query heads
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)     # [BG, BD]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n                                             # [BN] key positions
        n_mask = pos < end
        blk = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0)
        row = (blk.to(tl.int64) * stride_cblk + (pos % PAGE_SIZE) * stride_cslot
               + kvh * stride_chead)                                  # [BN]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(q_ptr.dtype.element_ty)                # fp8 cache: upcast
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(q_ptr.dtype.element_ty)
        s = _dot(q, tl.trans(k), FP32_DOT)                            # [BG, BN]
        if SOFTCAP:
            s = _softcap(s, cap_in, cap_out)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)              # log2 units
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    if NUM_SPLITS == 1:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0).to(tl.float32)
            l_i, acc = _fold_sink(m_i, l_i, acc, sink * _LOG2E_C)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        # partials: m/l [B, Hq, S], acc [B, Hq, S, D] (fp32, contiguous)
        ml = (b * hq + heads) * NUM_SPLITS + split                    # [BG]
        tl.store(m_ptr + ml, m_i, mask=g_mask)
        tl.store(l_ptr + ml, l_i, mask=g_mask)
        tl.store(acc_ptr + ml.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, sinks_ptr, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    ms = tl.load(m_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    # Splits past the last non-empty one (a context shorter than the graph's longest) are
    # never read below.
    s_mask = offs_s < tl.max(tl.where(ms > float("-inf"), offs_s + 1, 0), 0)
    ls = tl.load(l_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    m = tl.max(ms, 0)
    if HAS_SINKS:                                   # the sink joins the max and the sum
        sink = tl.load(sinks_ptr + h).to(tl.float32) * _LOG2E_C
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)        # every split empty (seq_len 0): no NaN
    w = tl.exp2(ms - m)                             # empty splits: exp2(-inf) = 0
    l_sum = tl.sum(ls * w, 0)
    if HAS_SINKS:
        l_sum += tl.exp2(sink - m)
    accs = tl.load(acc_ptr + (row.to(tl.int64) * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM
                   + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(accs * w[:, None], 0) / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4                                   # interpreter: a pretend 4-SM GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, kv_heads: int, max_context: int, device: torch.device,
               *, programs_per_sm: int = 4, min_chunk: int = 128, max_splits: int = 64) -> int:
    """Splits of each sequence's context: the most that keep batch * kv_heads * S within one
    wave of resident programs (`programs_per_sm` per SM: the split kernel's occupancy at
    4 warps), with at least `min_chunk` tokens of the longest possible context per split
    (128, two key tiles: at 512, batch 1 of an engine with a 2.6K max_model_len got 6
    splits, 48 programs on 132 SMs, and its 2K-context decode took 12.7 us a layer for
    8 MB of K/V on an H200; benchmarks/results/engine_step/).
    Rounding down matters: 8 x 32K at S=9 on an H100 is 576 programs for 528 slots, and its
    48-program second wave, run on a mostly idle GPU, made it slower than S=8 (the times:
    benchmarks/results/kernels/NOTES_from_docstrings.md)."""
    fit = programs_per_sm * _sm_count(device) // max(1, batch * kv_heads)
    return max(1, min(fit, max_splits, math.ceil(max_context / min_chunk)))


def _check_scale(scale: float) -> None:
    # The kernels take the row max before scaling (max(s) * scale): valid for scale > 0.
    if not scale > 0:
        raise ValueError(f"GQA (triton): softmax scale must be positive, got {scale}")


def _contig_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _variant_args(scale: float, window: int, sinks: torch.Tensor | None, softcap: float,
                  dummy: torch.Tensor) -> tuple[torch.Tensor, int, float, float, dict]:
    """(sinks pointer, window, cap_in, cap_out, constexpr flags) for a kernel launch."""
    flags = dict(WINDOW=window > 0, HAS_SINKS=sinks is not None, SOFTCAP=softcap > 0)
    cap_in, cap_out = (scale / softcap, softcap / scale) if softcap > 0 else (1.0, 1.0)
    return (dummy if sinks is None else sinks.contiguous()), max(window, 0), cap_in, cap_out, flags


def decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, scale: float, window: int = 0,
           sinks: torch.Tensor | None = None, softcap: float = 0.0, *,
           splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
           num_stages: int = 3) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]; keyword arguments override the launch heuristics."""
    batch, hq, d = q.shape
    _, _, page_size, hkv, _ = kv_cache.shape
    _check_scale(scale)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    q, kv_cache = _contig_last(q), _contig_last(kv_cache)
    group = hq // hkv
    if group > _MAX_GROUP:
        raise ValueError(f"gqa_decode (triton): {group} query heads per KV head > {_MAX_GROUP}")
    if splits is None:
        context = block_tables.shape[1] * page_size           # the longest a sequence can be
        splits = num_splits(batch, hkv, min(context, window) if window > 0 else context,
                            q.device)
    if block_n is None:
        block_n = 16 if INTERPRET else 64
    block_d = max(16, triton.next_power_of_2(d))
    block_g = max(16, triton.next_power_of_2(group))
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if splits > 1:
        m = torch.empty(batch, hq, splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(batch, hq, splits, d, dtype=torch.float32, device=q.device)
    else:
        m = l = acc = out                          # unused by the kernel when S == 1
    sinks_arg, window, cap_in, cap_out, flags = _variant_args(scale, window, sinks, softcap, q)
    _decode_split_kernel[(batch, hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, m, l, acc, sinks_arg,
        scale * _LOG2E, window, cap_in, cap_out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        G=group, HEAD_DIM=d, PAGE_SIZE=page_size, NUM_SPLITS=splits, BLOCK_G=block_g,
        BLOCK_D=block_d, BLOCK_N=block_n, FP32_DOT=_fp32_dot(q.dtype), **flags,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _decode_reduce_kernel[(batch, hq)](
            m, l, acc, out, sinks_arg, out.stride(0), out.stride(1), HEAD_DIM=d,
            NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
            HAS_SINKS=flags["HAS_SINKS"], num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------------
@triton.jit
def _query_tile(qsl_ptr, num_seqs, tile, BLOCK_M: tl.constexpr):
    """(sequence b, its first query token, its query length, the tile's first row m0) of
    query tile `tile`. Sequence b owns tiles [qsl[b] // BLOCK_M + b, qsl[b+1] // BLOCK_M +
    b + 1): the last b whose first tile is <= tile (binary search over query_start_loc).
    m0 >= q_len: a surplus tile, which the caller skips."""
    lo = tl.zeros((), tl.int32)
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(qsl_ptr + mid) // BLOCK_M + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid)
    q_start = tl.load(qsl_ptr + lo)
    q_len = tl.load(qsl_ptr + lo + 1) - q_start
    return lo, q_start, q_len, (tile - (q_start // BLOCK_M + lo)) * BLOCK_M


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr, sinks_ptr,
    qk_scale, num_seqs,
    window, cap_in, cap_out,                   # variants (read only under their flags)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cblk, stride_cslot, stride_chead, stride_btb,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32_DOT: tl.constexpr,
    WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # Heaviest tiles (the last ones of the last sequences) first.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    b, q_start, q_len, m0 = _query_tile(qsl_ptr, num_seqs, tile, BLOCK_M)
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)     # [BM, BD]
    q_pos = prefix + offs_m                                           # absolute positions

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = kvh * stride_chead

    # 1) Keys every row sees: [0, prefix + m0) rounded down to whole tiles, no mask.
    full_end = (prefix + m0) // BLOCK_N * BLOCK_N
    n_first = 0
    if WINDOW:
        # 0) The window's lower edge: from the first row's first key, prefix + m0 - W + 1,
        # up to the first key every row's window holds, prefix + m0 + BLOCK_M - W (in whole
        # tiles from `lo`), masked; earlier keys are never loaded. Phase 1 then starts there
        # (every key of it is in every row's window), and phase 2 needs no window mask.
        lo = tl.maximum(prefix + m0 - window + 1, 0)
        edge = tl.maximum(prefix + m0 + BLOCK_M - window, lo)
        n_first = lo + tl.cdiv(edge - lo, BLOCK_N) * BLOCK_N
        for n0 in range(lo, n_first, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < seq_len
            blk = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0)
            row = blk.to(tl.int64) * stride_cblk + (pos % PAGE_SIZE) * stride_cslot + head_off
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                        other=0.0).to(q_ptr.dtype.element_ty)
            v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                        other=0.0).to(q_ptr.dtype.element_ty)
            s = _dot(q, tl.trans(k), FP32_DOT)
            if SOFTCAP:
                s = _softcap(s, cap_in, cap_out)
            visible = ((pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
                       & n_mask[None, :])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            # A row whose keys in this tile are all hidden (m_new = -inf so far): no NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s * qk_scale - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
            m_i = m_new
        full_end = n_first + tl.maximum(prefix + m0 - n_first, 0) // BLOCK_N * BLOCK_N
    for n0 in range(n_first, full_end, BLOCK_N):
        pos = n0 + offs_n
        blk = tl.load(bt_row + pos // PAGE_SIZE)
        row = blk.to(tl.int64) * stride_cblk + (pos % PAGE_SIZE) * stride_cslot + head_off
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=d_mask[None, :],
                    other=0.0).to(q_ptr.dtype.element_ty)                # fp8 cache: upcast
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=d_mask[None, :],
                    other=0.0).to(q_ptr.dtype.element_ty)
        s = _dot(q, tl.trans(k), FP32_DOT)                            # [BM, BN]
        if SOFTCAP:
            s = _softcap(s, cap_in, cap_out)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)              # log2 units
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])                    # one FMA a score
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    # 2) The tiles crossing the diagonal: causal mask and the context end.
    diag_end = tl.minimum(prefix + m0 + BLOCK_M, seq_len)
    for n0 in range(full_end, diag_end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < seq_len
        blk = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0)
        row = blk.to(tl.int64) * stride_cblk + (pos % PAGE_SIZE) * stride_cslot + head_off
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(q_ptr.dtype.element_ty)                # fp8 cache: upcast
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(q_ptr.dtype.element_ty)
        s = _dot(q, tl.trans(k), FP32_DOT)
        if SOFTCAP:
            s = _softcap(s, cap_in, cap_out)
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * _LOG2E_C
        l_i, acc = _fold_sink(m_i, l_i, acc, sink)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _prefill_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, num_seqs,
    window, cap_in, cap_out,
    stride_qt, stride_qh,
    stride_cblk, stride_cslot, stride_chead, stride_btb,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Split-KV prefill: program (tile, h, split) runs the online softmax of one query tile
    over the split-th slice of the keys its rows can see and writes unnormalised partials
    (max, sum, acc) [T, Hq, S], reduced by `_decode_reduce_kernel` (sinks folded there)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    kvh = h // G
    b, q_start, q_len, m0 = _query_tile(qsl_ptr, num_seqs, tile, BLOCK_M)
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = prefix + offs_m

    # The tile's keys: [k_lo, k_hi), k_hi past its last row's position; split in BLOCK_N
    # multiples so no two programs load the same key.
    k_hi = tl.minimum(prefix + m0 + BLOCK_M, seq_len)
    k_lo = 0
    if WINDOW:
        k_lo = tl.maximum(prefix + m0 - window + 1, 0)
    chunk = tl.cdiv(tl.cdiv(k_hi - k_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = k_lo + split * chunk
    end = tl.minimum(start + chunk, k_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = kvh * stride_chead
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        blk = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0)
        row = blk.to(tl.int64) * stride_cblk + (pos % PAGE_SIZE) * stride_cslot + head_off
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(q_ptr.dtype.element_ty)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(q_ptr.dtype.element_ty)
        s = _dot(q, tl.trans(k), FP32_DOT)
        if SOFTCAP:
            s = _softcap(s, cap_in, cap_out)
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # a row that sees nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s * qk_scale - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    ml = (tok * tl.num_programs(1) + h) * NUM_SPLITS + split        # [BM] partial rows
    tl.store(m_ptr + ml, m_i, mask=m_mask)
    tl.store(l_ptr + ml, l_i, mask=m_mask)
    tl.store(acc_ptr + ml[:, None] * HEAD_DIM + offs_d[None, :], acc,
             mask=m_mask[:, None] & d_mask[None, :])


def prefill_splits(tokens: int, block_m: int, split_block_m: int, heads: int, context: int,
                   device: torch.device, programs_per_sm: int = 4) -> int:
    """Key splits of a prefill launch of `tokens` query tokens over `heads` heads: 1 (the
    plain kernel, BLOCK_M = `block_m`) when its tiles fill a wave of the GPU; else the most
    splits that keep the split kernel's tiles (`split_block_m`) x heads x S within one wave,
    with >= 512 keys of the longest possible context a split: a short chunk over a long
    cached prefix (an agent's next turn) would otherwise run on a few SMs, each streaming the
    whole prefix. Tiles are counted as cdiv(tokens, BLOCK_M) + 1 (a chunk boundary may split
    one more), not per sequence slot: empty slots' programs exit at once."""
    if (triton.cdiv(tokens, block_m) + 1) * heads >= programs_per_sm * _sm_count(device):
        return 1
    return num_splits(triton.cdiv(tokens, split_block_m) + 1, heads, context, device,
                      programs_per_sm=programs_per_sm, min_chunk=512)


def _prefill_config(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, tuned on H100."""
    if INTERPRET:
        return 16, 16, 4, 1
    # Picked by a sweep on an H100, 4K chunk over 16K prefix (Llama-8B heads): every other
    # configuration tried was slower; the times are in
    # benchmarks/results/kernels/NOTES_from_docstrings.md.
    if d <= 64:
        return 128, 64, 8, 4
    return 128, 128, 8, 3


def prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
            window: int = 0, sinks: torch.Tensor | None = None, softcap: float = 0.0, *,
            block_m: int | None = None, block_n: int | None = None,
            num_warps: int | None = None, num_stages: int | None = None,
            splits: int | None = None) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]; keyword arguments override the tile configuration and
    the number of key splits (`prefill_splits`; 1: the plain kernel)."""
    tokens, hq, d = q.shape
    _, _, page_size, hkv, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    _check_scale(scale)
    out = torch.empty_like(q)
    if tokens == 0 or num_seqs == 0:
        return out
    q, kv_cache = _contig_last(q), _contig_last(kv_cache)
    bm, bn, nw, ns = _prefill_config(d)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    sinks_arg, window, cap_in, cap_out, flags = _variant_args(scale, window, sinks, softcap, q)
    context = block_tables.shape[1] * page_size              # the longest a sequence can be
    sm = block_m or (16 if INTERPRET else min(64, max(16, triton.next_power_of_2(tokens))))
    if splits is None:
        # From static shapes only (the launch may be inside a graph capture).
        splits = prefill_splits(tokens, block_m or bm, sm, hq,
                                min(context, window) if window > 0 else context, q.device)
    if splits > 1:
        # Few tiles: smaller query tiles (a short chunk pads less) and the keys split.
        sn = block_n or (16 if INTERPRET else 64)
        m = torch.empty(tokens, hq, splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(tokens, hq, splits, d, dtype=torch.float32, device=q.device)
        block_d = max(16, triton.next_power_of_2(d))
        _prefill_split_kernel[(tokens // sm + num_seqs, hq, splits)](
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, m, l, acc,
            scale * _LOG2E, num_seqs, window, cap_in, cap_out, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            G=hq // hkv, HEAD_DIM=d, PAGE_SIZE=page_size, NUM_SPLITS=splits, BLOCK_M=sm,
            BLOCK_N=sn, BLOCK_D=block_d, FP32_DOT=_fp32_dot(q.dtype),
            WINDOW=flags["WINDOW"], SOFTCAP=flags["SOFTCAP"], num_warps=4,
            num_stages=1 if INTERPRET else 3,
        )
        _decode_reduce_kernel[(tokens, hq)](
            m, l, acc, out, sinks_arg, out.stride(0), out.stride(1), HEAD_DIM=d,
            NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
            HAS_SINKS=flags["HAS_SINKS"], num_warps=4,
        )
        return out
    bm, bn = block_m or bm, block_n or bn
    nw, ns = num_warps or nw, num_stages or ns
    grid = (tokens // bm + num_seqs, hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, sinks_arg,
        scale * _LOG2E, num_seqs, window, cap_in, cap_out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        G=hq // hkv, HEAD_DIM=d, PAGE_SIZE=page_size, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=max(16, triton.next_power_of_2(d)), FP32_DOT=_fp32_dot(q.dtype), **flags,
        num_warps=nw, num_stages=ns,
    )
    return out


# ----------------------------------------------------------------------------------------
# Registered entry points (signatures of the references in kernels/gqa.py)
# ----------------------------------------------------------------------------------------
@register("gqa_decode", "triton", priority=PRIO, requires=REQ)
def gqa_decode_triton(q, kv_cache, block_tables, seq_lens, scale, window=0, sinks=None,
                      softcap=0.0):
    return decode(q, kv_cache, block_tables, seq_lens, scale, window, sinks, softcap)


@register("gqa_prefill", "triton", priority=PRIO, requires=REQ)
def gqa_prefill_triton(q, kv_cache, block_tables, query_start_loc, seq_lens, scale, window=0,
                       sinks=None, softcap=0.0):
    return prefill(q, kv_cache, block_tables, query_start_loc, seq_lens, scale, window, sinks,
                   softcap)
