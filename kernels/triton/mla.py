"""Triton paged MLA: split-KV absorbed decode (with query-length folding) and expanded prefill.

What it is: the "triton" backend of `mla_decode` and `mla_prefill` (op definitions and the
references: `kernels/mla.py`; cache layout and metadata: `kernels/paged.py`), plus
`mla_decode_folded`, the same decode kernel for q_len > 1 query tokens per sequence
(speculative verification), which the reference op does not take. Softmax in fp32 (exp2
with the scale folded into log2 e); outputs in q's dtype. What it is not: the cache write
(`mla_attention` does it), the W_UK / W_UV absorption around decode (the caller's einsums),
sliding windows or soft-capping. An fp8-e4m3 cache works with a bf16/fp16 query (rows are
upcast on load, no scale factor: the reference has none), tested on the GPU only.

Legend: B sequences, H query heads, Q query tokens per sequence (decode), M = Q * H rows,
L kv_lora_rank (512), dr rope dim (64), R = L + dr (576, one cache row), dn / dv the nope /
value head dims (128 / 128), Lctx a context length, S splits of a context, PS page size.

Decode, absorbed (flash-decoding over the latent): grid (G, S, B) with G = cdiv(M, BLOCK_H)
row groups varying fastest, so the G programs reading the same slice of a context run side
by side and share it through L2. A program owns BLOCK_H rows (all 16 heads of a Kimi TP4
rank, or 64 of 128 heads) and the slice `[s*chunk, (s+1)*chunk)` of one sequence (chunk
rounded to BLOCK_N, computed per sequence in-kernel). It loads each [BLOCK_N, R] tile of
cache rows ONCE and uses it for both tensor-core dots of all its rows:
    s  = q_c [BH, L] @ c^T + q_pe [BH, dr] @ k_pe^T          # [BH, BN]
    acc[BH, L] += softmax-weights(s) @ c                      # the same c tile
then writes partial (acc / l, log2-sum-exp) in fp32; `_decode_reduce_kernel` (grid (M, B))
merges the S partials. With S == 1 the split kernel writes `out` itself.
Query-length folding: q [B, Q, H, R] viewed as [B, Q*H, R] is just more rows; row m is token
i = m // H at position seq_len - Q + i and sees keys `pos < seq_len - Q + 1 + i`, so a
q_len 4 step reads the cache once, like q_len 1, and only the last Q - 1 keys are masked.
    bytes  = B * Lctx * R * elem (the latent, once) + q + out
             + partials B * M * S * (L + 1) * 4 written and read once (~1% at the sizes below)
    FLOPs  = 2 * B * M * Lctx * (R + L)
    intensity = M * 2 * 1088 / (576 * 2) ~ 1.9 M FLOP/byte in bf16: M = 16 -> 30, M = 64 ->
    120, M = 128 -> 240, all under the H100 ridge (~800 TFLOP/s / ~3 TB/s ~ 270): memory
    bound, the cache read sets the time. e.g. 16 heads, 32 x 32K: 1.21 GB -> ~400 us at 3 TB/s.
S is picked on the host from static facts only (B, G, the block table's capacity MB*PS, the
SM count), so the launch is CUDA-graph safe: B*G*S fills one wave of resident programs
(rounded down: a few programs spilling into a second wave leave it mostly idle), >= 64 tokens
per split of the longest possible context (64: one key tile), at most 64 splits. When the page size is a
multiple of BLOCK_N a tile lies in one page: one block-table load per tile, not per row
(this also took the M = 16 kernel from 255 registers with spills to 135), issued one tile
ahead and carried into the next iteration, so no tile address waits on a load of its own
iteration (Triton's pipeliner treats such an indirect load as a stage of its own).
Measured (bf16, page 64; `benchmarks/kernels/mla.py`): the mla_decode rows of
benchmarks/results/kernels/h100_all_ebb1674.json (H100) and h200_all_run2.json (H200); the
q_len 4 launch sweep and the carried page id: h100_mla_q4_1e9f2e0.json.
  M = 16 (one token, 16 heads; mma.sync, 2 programs per SM) reads the cache near the copy
  roof: memory bound, as above.
  M = 64 (q_len 4 x 16 heads; wgmma, [64, 512] fp32 acc over 2 warpgroups, 1 program per
  SM) takes ~1.4x the time of q_len 1 for the same bytes (not 1x). Bound by the dots and
  the softmax between them, not by the cache stream: the QK dot's result feeds the PV dot,
  so Triton lays it out [8, 1] over the warps (its chained-dot rule), which for 64 rows
  means both warpgroups compute the same [64, BN] scores (tensor work 2 * 576 + 512 per key
  and row instead of 1088), and nothing overlaps the softmax with tensor work (one program
  per SM, no ping-pong). Deeper pipelining does not help: with the block-table load carried
  (above) BLOCK_N 32 x 4 stages keeps 3 tiles in flight, and it was slower than 64 x 2 (its
  QK wgmma is N = 32). Carrying the page id made 64 x 2 a few % faster. 128 heads (2 groups
  of 64) at 32x32K are far from their memory floor of ~0.41 ms, for the same reasons. On
  Hopper these row counts (>= 32) go to the warp-specialised CUDA kernel
  (kernels/cuda/mla.py: QK on one warpgroup, PV split by columns over two more, TMA +
  mbarriers); its figures: benchmarks/results/kernels/README.md.

Prefill, expanded (DeepSeek-V2's "naive" form): two kernels.
 1. `_expand_kernel`: gather the chunk's whole context (cached prefix + chunk) from the pages
    and expand it per head, k_nope = c W_UK^T -> [Lsum, H*dn] and v = c W_UV -> [Lsum, H*dv]:
    a [Lsum, L] x [L, H*d] GEMM whose A rows come through a slot table (the page gather is
    fused into the A load). 2 * Lsum * L * H * (dn + dv) FLOPs.
 2. `_prefill_attn_kernel`: flash attention, grid (query tiles, H, B), heaviest tiles first;
    scores = q_nope k_nope^T + q_pe k_pe^T (k_pe, shared by all heads, gathered once into a
    contiguous [Lsum, dr] copy), causal by absolute position; keys before a tile's first
    query are unmasked, only the tiles crossing the diagonal are masked.
    FLOPs = 2 * H * (dn + dr + dv) * sum_i (prefix + i + 1) over the chunk's queries.
    e.g. Kimi TP4 (H 16), 4K chunk over a 64K prefix: 0.29 TFLOP of expansion + 2.83 TFLOP of
    attention, compute bound (~4 ms at 800 TFLOP/s) against ~0.1 GB of minimum traffic.
    Measured: the mla_prefill row of the same result files (about half the bf16 mm roof).
    k_pe read through the slot table inside the attention loop (a dependent gather) was
    slower than gathering it once (benchmarks/results/kernels/NOTES_from_docstrings.md).
The expanded K/V ([Lsum, H, dn + dv], 0.56 GB at that size) is a temporary, and its size
needs the total context on the host: prefill syncs once (seq_lens.sum() and the longest
chunk) unless the caller passes `sizes`, unlike decode.
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
_MAX_RANK = 1024     # kv_lora_rank: the [BLOCK_H, L] fp32 accumulator lives in registers
_MAX_ROPE = 128


def _shape_check(q: Query) -> str | None:
    rank, rope = q.get("kv_lora_rank"), q.get("rope_dim")
    if rank is not None and not 1 <= rank <= _MAX_RANK:
        return f"kv_lora_rank {rank} outside [1, {_MAX_RANK}]"
    if rope is not None and not 1 <= rope <= _MAX_ROPE:
        return f"rope_dim {rope} outside [1, {_MAX_ROPE}]"
    return None


REQ = requirements(frozenset({torch.bfloat16, torch.float16, torch.float32}), _shape_check)


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr):
    # fp32 inputs: exact fp32 products (tf32 would miss the reference by ~1e-3).
    if IS_FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ----------------------------------------------------------------------------------------
# Decode (absorbed), any number of query tokens per sequence folded into the rows
# ----------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qk_scale,                                  # scale * log2(e)
    stride_qb, stride_qm, stride_ob, stride_om,
    stride_cblk, stride_cslot, stride_btb,
    M, H, num_splits,                          # rows per sequence (Q * H), heads, S
    Q_LEN: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, IS_FP32: tl.constexpr,
):
    grp = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = grp * BLOCK_H + tl.arange(0, BLOCK_H)                      # [BH] (token, head)
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    l_mask = offs_l < RANK
    r_mask = offs_r < ROPE
    q_row = q_ptr + b.to(tl.int64) * stride_qb + rows[:, None] * stride_qm
    q_c = tl.load(q_row + offs_l[None, :], mask=row_mask[:, None] & l_mask[None, :], other=0.0)
    q_pe = tl.load(q_row + RANK + offs_r[None, :], mask=row_mask[:, None] & r_mask[None, :],
                   other=0.0)
    # Row m is query token m // H of Q, at position seq_len - Q + m // H: it sees keys below
    # `visible`. One token (Q == 1) sees the whole context.
    visible = seq_len - Q_LEN + 1 + rows // H                         # [BH]

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    if PAGE_SIZE % BLOCK_N == 0:
        # The page of the first tile; each iteration then loads the NEXT tile's page id
        # (carried across iterations), so a tile's address never waits on a block-table
        # load of its own iteration: with an in-iteration (indirect) load Triton's pipeliner
        # kept 2 tile buffers whatever num_stages said; carried, it keeps num_stages of them.
        blk_next = tl.load(bt_row + start // PAGE_SIZE, mask=start < end, other=0)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n                                             # [BN] key positions
        n_mask = pos < end
        if PAGE_SIZE % BLOCK_N == 0:   # n0 is a multiple of BLOCK_N: the tile is in one page
            blk = blk_next
            blk_next = tl.load(bt_row + (n0 + BLOCK_N) // PAGE_SIZE, mask=n0 + BLOCK_N < end,
                               other=0)
        else:
            blk = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0)
        row = blk.to(tl.int64) * stride_cblk + (pos % PAGE_SIZE) * stride_cslot
        # The tile of cache rows, loaded once for every row of the group and both dots.
        c = tl.load(kv_ptr + row[:, None] + offs_l[None, :],
                    mask=n_mask[:, None] & l_mask[None, :], other=0.0)  # [BN, BL]
        k_pe = tl.load(kv_ptr + row[:, None] + RANK + offs_r[None, :],
                       mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # [BN, BR]
        c = c.to(q_ptr.dtype.element_ty)                              # fp8 cache: upcast
        k_pe = k_pe.to(q_ptr.dtype.element_ty)
        s = _dot(q_c, tl.trans(c), IS_FP32) + _dot(q_pe, tl.trans(k_pe), IS_FP32)
        s = s * qk_scale                                              # [BH, BN], log2 units
        if Q_LEN > 1:
            s = tl.where(pos[None, :] < visible[:, None], s, float("-inf"))
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)         # row saw no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(c.dtype), c, IS_FP32)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if not SPLIT:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + rows[:, None] * stride_om
                 + offs_l[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & l_mask[None, :])
    else:
        # partials: lse [B, M, S] (log2 units, -inf for an empty split), o [B, M, S, L] fp32
        idx = (b * M + rows).to(tl.int64) * num_splits + split        # [BH]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + idx, lse, mask=row_mask)
        tl.store(part_o_ptr + idx[:, None] * RANK + offs_l[None, :], o,
                 mask=row_mask[:, None] & l_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_om, num_splits,
    RANK: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m = tl.program_id(0)
    b = tl.program_id(1)
    row = (b * tl.num_programs(0) + m).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_l = tl.arange(0, BLOCK_L)
    l_mask = offs_l < RANK
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=offs_s < num_splits,
                  other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty (seq_len 0): no NaN
    w = tl.exp2(lse - top)                          # empty splits weigh exp2(-inf) = 0
    denom = tl.sum(w, 0)
    # Splits past the last non-empty one (a context shorter than the graph's longest) are
    # never read: the loop runs to `used`, BLOCK_C splits of [L] rows per step.
    used = tl.max(tl.where(lse > float("-inf"), offs_s + 1, 0), 0)
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_L], tl.float32)
    for s0 in range(0, used, BLOCK_C):
        s = s0 + offs_c
        s_ok = s < used
        w_s = tl.exp2(tl.load(part_lse_ptr + row * num_splits + s, mask=s_ok,
                              other=float("-inf")) - top)
        o_s = tl.load(part_o_ptr + (row * num_splits + s)[:, None] * RANK + offs_l[None, :],
                      mask=s_ok[:, None] & l_mask[None, :], other=0.0)
        acc += tl.sum(o_s * w_s[:, None], 0)
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + m * stride_om + offs_l,
             out.to(out_ptr.dtype.element_ty), mask=l_mask)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4                                   # interpreter: a pretend 4-SM GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, groups: int, max_context: int, device: torch.device, *,
               programs_per_sm: int = 2, min_chunk: int = 64, max_splits: int = 64) -> int:
    """Splits of each context so that batch * groups * S fills one wave of resident programs
    (programs_per_sm * SMs) without spilling into a second, mostly idle one (rounding down:
    9 splits of 32 sequences put 288 programs on 2 x 132 slots, slower than 8 on an H100;
    benchmarks/results/kernels/NOTES_from_docstrings.md), keeping at least `min_chunk`
    tokens of the longest possible context per split."""
    want = programs_per_sm * _sm_count(device) // max(1, batch * groups)
    return max(1, min(want, max_splits, math.ceil(max_context / min_chunk)))


def decode_config(rows: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps, num_stages, resident programs per SM) for M = Q * H rows
    per sequence; the last from the compiled kernel's registers and shared memory on H100."""
    if INTERPRET:
        return 16, 16, 4, 1, 2
    if rows <= 16:
        return 16, 64, 4, 2, 2   # mma.sync; 135 regs x 128 threads, 92 KB smem: 2 per SM
    if rows <= 32:
        return 32, 64, 8, 2, 1
    # wgmma; [64, 512] fp32 acc over 2 warpgroups (255 regs); q 72 KB + 2 x 72 KB tiles
    # (216 KB smem). Deeper pipelines of smaller tiles (BLOCK_N 32 x 3-4 stages, 16 x 6) were
    # slower on an H100 (benchmarks/results/kernels/h100_mla_q4_1e9f2e0.json): the loop is
    # bound by its dots and softmax, not by load latency.
    return 64, 64, 8, 2, 1


def _contig_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_rows(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, scale: float, kv_lora_rank: int, *, q_len: int = 1,
                splits: int | None = None, block_h: int | None = None,
                block_n: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, programs_per_sm: int | None = None
                ) -> torch.Tensor:
    """q [B, M = q_len * H, R] (rows token-major: row m is token m // H, head m % H)
    -> [B, M, L]. Keyword arguments override the launch heuristics."""
    batch, rows, width = q.shape
    _, page_size, _ = kv_cache.shape
    out = q.new_empty(batch, rows, kv_lora_rank)
    if batch == 0 or rows == 0:
        return out
    if rows % q_len:
        raise ValueError(f"mla decode: {rows} query rows are not q_len={q_len} tokens x heads")
    q, kv_cache = _contig_last(q), _contig_last(kv_cache)
    bh, bn, nw, ns, per_sm = decode_config(rows, q.dtype)
    bh, bn = block_h or bh, block_n or bn
    nw, ns = num_warps or nw, num_stages or ns
    groups = triton.cdiv(rows, bh)
    if splits is None:
        splits = num_splits(batch, groups, block_tables.shape[1] * page_size, q.device,
                            programs_per_sm=programs_per_sm or per_sm)
    block_l = max(16, triton.next_power_of_2(kv_lora_rank))
    part_o, part_lse = split_partials(out, splits)
    _decode_split_kernel[(groups, splits, batch)](
        q, kv_cache, block_tables, seq_lens, out, part_o, part_lse,
        scale * _LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        rows, rows // q_len, splits,
        Q_LEN=q_len, RANK=kv_lora_rank, ROPE=width - kv_lora_rank, PAGE_SIZE=page_size,
        SPLIT=splits > 1, BLOCK_H=bh, BLOCK_N=bn, BLOCK_L=block_l,
        BLOCK_R=max(16, triton.next_power_of_2(width - kv_lora_rank)),
        IS_FP32=q.dtype == torch.float32, num_warps=nw, num_stages=ns,
    )
    if splits > 1:
        reduce_partials(part_o, part_lse, out)
    return out


def split_partials(out: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, M, S, L], lse [B, M, S]) fp32 buffers for the S split partials of `out`
    [B, M, L], the format `reduce_partials` merges; with one split the kernels write `out`
    and never touch these, so `out` stands in for both."""
    if splits == 1:
        return out, out
    batch, rows, rank = out.shape
    return (torch.empty(batch, rows, splits, rank, dtype=torch.float32, device=out.device),
            torch.empty(batch, rows, splits, dtype=torch.float32, device=out.device))


def reduce_partials(part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> None:
    """out [B, M, L] <- the S split partials o [B, M, S, L] fp32 and lse [B, M, S] (log2
    units, -inf for an empty split), weighted by exp2(lse). Also the CUDA decode's merge."""
    batch, rows, splits, rank = part_o.shape
    _decode_reduce_kernel[(rows, batch)](
        part_o, part_lse, out, out.stride(0), out.stride(1), splits, RANK=rank,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_L=max(16, triton.next_power_of_2(rank)),
        BLOCK_C=min(4, triton.next_power_of_2(splits)), num_warps=4,
    )


def mla_decode_folded(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                      **launch) -> torch.Tensor:
    """Absorbed decode of Q query tokens per sequence (speculative verification), causal
    among them: q [B, Q, H, R] -> [B, Q, H, L]. Token i of sequence b sits at position
    seq_lens[b] - Q + i (seq_lens counts the Q new tokens, as in `kernels/paged.py`) and sees
    positions 0 .. seq_lens[b] - Q + i. The tokens fold into the head axis: one pass over
    the cache for all Q * H rows, so Q = 4 costs about what Q = 1 does."""
    return fold_query_tokens(decode_rows, q, kv_cache, block_tables, seq_lens, scale,
                             kv_lora_rank, **launch)


def fold_query_tokens(rows_fn, q: torch.Tensor, kv_cache: torch.Tensor, *args, **launch):
    """q [B, Q, H, R] -> [B, Q, H, L] through a row kernel `rows_fn(q [B, Q*H, R], kv_cache,
    block_tables, seq_lens, scale, kv_lora_rank, q_len=Q, **launch)` (this module's
    `decode_rows` or the CUDA one): the Q tokens become Q * H token-major rows."""
    if q.dim() != 4 or q.shape[-1] != kv_cache.shape[-1]:
        raise ValueError(f"mla_decode_folded: q must be [B, Q, H, {kv_cache.shape[-1]}], got "
                         f"{list(q.shape)}")
    batch, q_len, heads, width = q.shape
    out = rows_fn(q.reshape(batch, q_len * heads, width), kv_cache, *args, q_len=q_len,
                  **launch)
    return out.view(batch, q_len, heads, out.shape[-1])


# ----------------------------------------------------------------------------------------
# Prefill (expanded)
# ----------------------------------------------------------------------------------------
@triton.jit
def _expand_kernel(
    kv_ptr, slots_ptr, w_ptr, out_ptr, num_rows, N,
    stride_wh, stride_wn, stride_wk, stride_out,
    RANK: tl.constexpr, HEAD_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    # out[m, n] = sum_k cache_row(slots[m])[k] * W(n, k), with W(n, k) at
    # w_ptr + (n // HEAD_W) * stride_wh + (n % HEAD_W) * stride_wn + k * stride_wk.
    pid_n = tl.program_id(0)                       # fastest: the A rows stay in L2
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < num_rows
    n_mask = offs_n < N
    slot = tl.load(slots_ptr + offs_m, mask=m_mask, other=0)         # [BM] int64 offsets
    w_col = (offs_n // HEAD_W) * stride_wh + (offs_n % HEAD_W) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, RANK, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < RANK
        a = tl.load(kv_ptr + slot[:, None] + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + w_col[None, :] + k[:, None] * stride_wk,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = acc + _dot(a.to(w.dtype), w, IS_FP32)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _attn_step(qn, qp, kn_base, v_base, kp_ptr, ctx0, n0, seq_len, q_pos,
               m_i, l_i, acc, qk_scale, stride_kt, stride_vt, stride_pt,
               DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr,
               BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, IS_FP32: tl.constexpr):
    # One [BLOCK_N] tile of keys for a [BLOCK_M] tile of queries of one head.
    offs_n = tl.arange(0, BLOCK_N)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = n0 + offs_n
    n_mask = pos < seq_len
    ctx = ctx0 + pos.to(tl.int64)                                      # expanded rows
    kn = tl.load(kn_base + ctx[:, None] * stride_kt + offs_dn[None, :],
                 mask=n_mask[:, None] & (offs_dn < DN)[None, :], other=0.0)
    kp = tl.load(kp_ptr + ctx[:, None] * stride_pt + offs_dr[None, :],
                 mask=n_mask[:, None] & (offs_dr < DR)[None, :], other=0.0)
    v = tl.load(v_base + ctx[:, None] * stride_vt + offs_dv[None, :],
                mask=n_mask[:, None] & (offs_dv < DV)[None, :], other=0.0)
    s = _dot(qn, tl.trans(kn), IS_FP32) + _dot(qp, tl.trans(kp), IS_FP32)
    s = s * qk_scale                                                   # [BM, BN], log2 units
    if MASKED:
        s = tl.where((pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IS_FP32)
    return m_new, l_i, acc


@triton.jit
def _prefill_attn_kernel(
    qn_ptr, qp_ptr, kn_ptr, v_ptr, kp_ptr, out_ptr,
    qsl_ptr, seq_lens_ptr, ctx_start_ptr, qk_scale,
    stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_ot, stride_oh,
    stride_kt, stride_vt, stride_pt,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DN: tl.constexpr,
    BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr, IS_FP32: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) query tiles first
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    m0 = tile * BLOCK_M
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len
    ctx0 = tl.load(ctx_start_ptr + b)              # this sequence's first expanded row

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < q_len
    dn_mask = offs_dn < DN
    dr_mask = offs_dr < DR
    dv_mask = offs_dv < DV
    tok = (q_start + offs_m).to(tl.int64)
    qn = tl.load(qn_ptr + tok[:, None] * stride_qnt + h * stride_qnh + offs_dn[None, :],
                 mask=m_mask[:, None] & dn_mask[None, :], other=0.0)   # [BM, BDN]
    qp = tl.load(qp_ptr + tok[:, None] * stride_qpt + h * stride_qph + offs_dr[None, :],
                 mask=m_mask[:, None] & dr_mask[None, :], other=0.0)   # [BM, BDR]
    qn = qn.to(kn_ptr.dtype.element_ty)
    qp = qp.to(kn_ptr.dtype.element_ty)
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    kn_base = kn_ptr + h * DN
    v_base = v_ptr + h * DV
    # 1) Keys every row of the tile sees, [0, prefix + m0) in whole tiles: no mask.
    full_end = (prefix + m0) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attn_step(
            qn, qp, kn_base, v_base, kp_ptr, ctx0, n0, seq_len, q_pos, m_i, l_i,
            acc, qk_scale, stride_kt, stride_vt, stride_pt, DN, DR, DV, BLOCK_N, BLOCK_DN,
            BLOCK_DR, BLOCK_DV, False, IS_FP32)
    # 2) The tiles crossing the diagonal: causal mask and the context end.
    diag_end = tl.minimum(prefix + m0 + BLOCK_M, seq_len)
    for n0 in range(full_end, diag_end, BLOCK_N):
        m_i, l_i, acc = _attn_step(
            qn, qp, kn_base, v_base, kp_ptr, ctx0, n0, seq_len, q_pos, m_i, l_i,
            acc, qk_scale, stride_kt, stride_vt, stride_pt, DN, DR, DV, BLOCK_N, BLOCK_DN,
            BLOCK_DR, BLOCK_DV, True, IS_FP32)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_dv[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])


def prefill_config(dtype: torch.dtype) -> dict[str, int]:
    """Tiles of the expansion GEMM (E*) and of the attention (A*), tuned on H100."""
    if INTERPRET:
        return dict(EM=16, EN=16, EK=16, EW=4, ES=1, AM=16, AN=16, AW=4, AS=1)
    return dict(EM=128, EN=256, EK=64, EW=8, ES=3, AM=128, AN=64, AW=8, AS=3)


def prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
            w_kc: torch.Tensor, w_vc: torch.Tensor, block_tables: torch.Tensor,
            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
            sizes: tuple[int, int] | None = None, **config: int) -> torch.Tensor:
    """q_nope [T, H, dn], q_pe [T, H, dr] -> [T, H, dv]; `config` overrides tile sizes.
    `sizes` = (sum of seq_lens, longest chunk) when the caller knows them: no host sync, so
    the call can be captured in a CUDA graph (the benchmark does); else they are read back."""
    tokens, heads, dn = q_nope.shape
    dr, rank, dv = q_pe.shape[-1], w_kc.shape[-1], w_vc.shape[-1]
    num_seqs = seq_lens.shape[0]
    out = q_nope.new_empty(tokens, heads, dv)
    if tokens == 0 or num_seqs == 0:
        return out
    cfg = {**prefill_config(q_nope.dtype), **config}
    q_nope, q_pe, kv_cache = _contig_last(q_nope), _contig_last(q_pe), _contig_last(kv_cache)
    w_kc, w_vc = w_kc.contiguous(), w_vc.contiguous()
    dev, page_size = q_nope.device, kv_cache.shape[1]
    is_fp32 = q_nope.dtype == torch.float32

    # Where every context row of every sequence lives: one host sync for the sizes.
    lens = seq_lens.to(torch.int64)
    ctx_start = torch.zeros(num_seqs + 1, dtype=torch.int64, device=dev)
    torch.cumsum(lens, 0, out=ctx_start[1:])
    if sizes is None:
        qlens = query_start_loc[1:] - query_start_loc[:-1]
        sizes = torch.stack([ctx_start[-1], qlens.max().to(torch.int64)]).tolist()
    total, max_q = sizes
    if total == 0:
        return out.zero_()
    seq_id = torch.repeat_interleave(torch.arange(num_seqs, device=dev), lens,
                                     output_size=total)
    pos = torch.arange(total, device=dev) - ctx_start[seq_id]
    blk = block_tables[seq_id, pos // page_size].to(torch.int64)
    slots = blk * kv_cache.stride(0) + (pos % page_size) * kv_cache.stride(1)  # [Lsum]
    # k_pe of every context row, contiguous (Lsum * dr, ~1% of the expanded K/V): the
    # attention's inner loop then has no dependent (gathered) loads to pipeline.
    k_pe = kv_cache[blk, pos % page_size, rank:].to(q_nope.dtype)            # [Lsum, dr]

    # 1) k_nope = c W_UK^T [Lsum, H*dn] and v = c W_UV [Lsum, H*dv], in q's dtype.
    k_nope = torch.empty(total, heads * dn, dtype=q_nope.dtype, device=dev)
    v = torch.empty(total, heads * dv, dtype=q_nope.dtype, device=dev)
    # (w, head width, strides (head, n, k)): w_kc [H, dn, L] is W(n=(h,d), k) = w_kc[h, d, k];
    # w_vc [H, L, dv] is W(n=(h,j), k) = w_vc[h, k, j].
    for dst, w, hw, (sh, sn, sk) in (
        (k_nope, w_kc, dn, (w_kc.stride(0), w_kc.stride(1), w_kc.stride(2))),
        (v, w_vc, dv, (w_vc.stride(0), w_vc.stride(2), w_vc.stride(1))),
    ):
        n = heads * hw
        grid = (triton.cdiv(n, cfg["EN"]), triton.cdiv(total, cfg["EM"]))
        _expand_kernel[grid](
            kv_cache, slots, w, dst, total, n, sh, sn, sk, dst.stride(0),
            RANK=rank, HEAD_W=hw, BLOCK_M=cfg["EM"], BLOCK_N=cfg["EN"], BLOCK_K=cfg["EK"],
            IS_FP32=is_fp32, num_warps=cfg["EW"], num_stages=cfg["ES"],
        )

    # 2) causal flash attention of each chunk over its expanded context.
    grid = (triton.cdiv(max_q, cfg["AM"]), heads, num_seqs)
    _prefill_attn_kernel[grid](
        q_nope, q_pe, k_nope, v, k_pe, out,
        query_start_loc, seq_lens, ctx_start, scale * _LOG2E,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        out.stride(0), out.stride(1), k_nope.stride(0), v.stride(0), k_pe.stride(0),
        DN=dn, DR=dr, DV=dv, BLOCK_M=cfg["AM"], BLOCK_N=cfg["AN"],
        BLOCK_DN=max(16, triton.next_power_of_2(dn)),
        BLOCK_DR=max(16, triton.next_power_of_2(dr)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        IS_FP32=is_fp32, num_warps=cfg["AW"], num_stages=cfg["AS"],
    )
    return out


# ----------------------------------------------------------------------------------------
# Registered entry points (signatures of the references in kernels/mla.py)
# ----------------------------------------------------------------------------------------
@register("mla_decode", "triton", priority=PRIO, requires=REQ)
def mla_decode_triton(q, kv_cache, block_tables, seq_lens, scale, kv_lora_rank):
    return decode_rows(q, kv_cache, block_tables, seq_lens, scale, kv_lora_rank)


@register("mla_prefill", "triton", priority=PRIO, requires=REQ)
def mla_prefill_triton(q_nope, q_pe, kv_cache, w_kc, w_vc, block_tables, query_start_loc,
                       seq_lens, scale):
    return prefill(q_nope, q_pe, kv_cache, w_kc, w_vc, block_tables, query_start_loc,
                   seq_lens, scale)
