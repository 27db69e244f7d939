"""Triton MoE: `moe_route` (router top-k) and `moe_experts` (block-aligned grouped GEMMs).

What it is: the "triton" backend of the two ops of `kernels/moe.py` (same signatures, same
outputs), for sm_90 first and any sm_80+ GPU; under TRITON_INTERPRET=1 it also runs on the
CPU (the tests). What it is not: expert-parallel communication (the output is this rank's
partial sum, placement P), quantised weights, or the shared experts.
Variants (kernels/moe.py): per-expert biases b13 (added to the gate/up accumulators before
the activation) and b2 (added to each slot's W2 product before its routing weight), the
"swigluoai" activation (GPT-OSS: clamps, then (up + 1) * gate * sigmoid(alpha * gate), all
in fp32 registers), interleaved gate/up rows, and strided weights (GPT-OSS's [E, H, 2I] /
[E, I, H] tensors arrive as transposed views and are read in place: the K stride is an
argument, never a copy). Each is a constexpr or a stride, so with them off the kernels are
the same as before.

Legend: T tokens, H hidden, E experts held here, I expert width, k experts per token,
N = T*k (token, slot) pairs, BM/BN/BK the GEMM tile.

moe_route (one program per token; the whole row of E scores lives in registers as a
[groups, group size] tile): softmax or sigmoid (+ correction bias), the group limit (group
score = sum of its two best choice scores, the best `topk_groups` groups compete), then k
rounds of "take the max, lowest expert id among equals" (the same order as `topk`: values
descending; an exact tie goes to the lower id), weights from the uncorrected scores,
renormalised, times routed_scaling_factor. Bytes T*E*4 in, T*k*8 out: tiny, launch-bound.

moe_experts, two regimes chosen by pick_config from T alone (graph-capturable: no host
sync, every size is a bound). T >= 2, the aligned path, four launches:
  1. align (one program per held expert; each histograms all N ids, so all agree on the
     layout): pad each expert's segment to a multiple of BM and write
     `sorted_pair` [<= N + min(N, E)*(BM-1)] (pair index t*k+j, grouped by expert, in pair
     order), `block_expert` [blocks] (the expert of each BM-row block, -1 = unused) and
     `block_rows` [blocks] (valid rows in the block). Ids outside [expert_start,
     expert_start + E) are not held here: they get no row and contribute nothing.
  2. act = silu(x @ W1[e]^T) * (x @ W3[e]^T) per block: grid (blocks, I/BN); the gate and
     up tiles of the same I columns are loaded and multiplied side by side, so only
     act [rows, I] (x.dtype) is written, never the [rows, 2I] pre-activation.
  3. y[pair] = weight[pair] * act @ W2[e]^T: grid (blocks, H/BN), one row per pair [N, H],
     fp32 (x.dtype once N*H*4 > Y_FP32_MAX_BYTES, i.e. at large prefills).
  4. out[t] = sum_j y[t*k+j] over the held slots, in fp32, cast to x.dtype once.
Why per-slot rows and a sum over k instead of fp32 atomics into out: deterministic (the
same inputs give the same bits), no zero-fill and no cast launch, and at decode the extra
N*H*8 bytes are noise next to the weights (Moonlight T=64: 6 MB vs 1.1 GB).
T == 1, the decode path, two launches (the token's k slots name k distinct experts, so
nothing needs sorting, and one program can own an H tile across all slots):
  1. the same gate/up kernel with DECODE: grid (k, I/BN), program (j, n) reads expert
     ids[j] straight from topk_ids (not held: returns); act [k, I], row j.
  2. out[0, n tile] = sum over held j of weight[j] * W2[e_j] act[j]: grid H/BN, a CUDA-core
     matrix-vector loop over (held slot, K step), fp32 sum in registers, written once.
  Same determinism, no align / y / slot-sum launches, no [k, H] fp32 round trip.

Napkin math (bf16, H100: ~3.0 TB/s copy bandwidth, ~790 TFLOP/s bf16 dense, measured):
  bytes ~ distinct held experts touched * 3*I*H*2 + activations; FLOPs = 6*N*I*H.
  Moonlight (E=64, k=6, H=2048, I=1408; 17.3 MB per expert): T=1 -> 6 experts, 104 MB,
  ~35 us; T=256 -> all 64 experts, 1.1 GB (~370 us) vs 27 GFLOP (~35 us): weight-bound at
  every batch size here. Kimi K2.5 EP8 (E=48 local, k=8, H=7168, I=2048; 88 MB per expert):
  T=1 reads 1 expert on an average rank (~30 us), 8 on the worst; T=64 ~35 of 48 (3.0 GB).
  So the design goal is: every touched expert's weights read once per step. A block holds
  one expert's rows and BM is chosen >= the expected pairs per expert, so one program per
  (expert, N tile) streams that tile of the weights exactly once.

Tiling (aligned_config / decode_config; H100 sweeps in benchmarks/kernels/moe.py
--sweep / --sweep-decode / --profile): at BM <= 32 what matters is the weight bytes in
flight per SM, not the program count: w13 tiles of BN=32 x BK=256 (gate + up, 32 KB a
stage, 4 stages) beat BN=16 (twice the programs) at T=1; the aligned w2 GEMM uses
BN=64 x BK=128 x 5 stages; the decode w2-and-sum loop 16 x 512 x 5 stages, 8 warps (a
tensor-core version with one real row in an M=16 tile was latency-bound on its mma chain).
Measured on one H100 (kernel time by CUPTI; harness time in a CUDA graph over rotating
input sets): benchmarks/results/kernels/h100_moe_bc3e7fb.json and .log (per-launch times,
the decode tile sweep, the tensor-core try) and the moe rows of h100_all_ebb1674.json; the
w13 BN sweep is in NOTES_from_docstrings.md. Open: on the worst EP rank (Kimi EP8 T=1,
all 8 of the token's experts held there) the decode path's w13 launch was slower than the
aligned path's with the same tiles (not yet explained), and h100_moe_bc3e7fb and
h100_all_ebb1674 disagree on which path wins there.
The T=1 gap left to the roof is mostly the ramp of two short weight-streaming launches;
the routing kernel is launch-bound (the route_* rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tscompile.kernels.registry import Query, register
from tscompile.kernels.triton import INTERPRET, requirements

PRIO = -10 if INTERPRET else 10
_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
ROUTE_MAX_EXPERTS = 4096       # the router keeps a whole row of scores in registers
Y_FP32_MAX_BYTES = 256 << 20   # per-slot expert outputs kept in fp32 up to this size


def _experts_shape(q: Query) -> str | None:
    hidden, width = q.get("hidden"), q.get("width")
    if hidden is not None and hidden < 16 or width is not None and width < 16:
        return f"hidden={hidden}, width={width}: the tensor-core tiles need both >= 16"
    return None


ROUTE_REQ = requirements(_DTYPES)
EXPERTS_REQ = requirements(_DTYPES, _experts_shape)


# ---------------------------------------------------------------------------------------
# moe_route

@triton.jit
def _route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, stride_t, num_groups, group_size,
                  topk_groups, scale,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr,
                  S_PAD: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GROUPED: tl.constexpr, PAIR: tl.constexpr, RENORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_PAD)
    s = tl.arange(0, S_PAD)
    eid = g[:, None] * group_size + s[None, :]                       # [G, S] expert ids
    ok = (g[:, None] < num_groups) & (s[None, :] < group_size)
    x = tl.load(logits_ptr + t * stride_t + eid, mask=ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        choice = tl.sigmoid(x)
        if HAS_BIAS:
            choice += tl.load(bias_ptr + eid, mask=ok, other=0.0).to(tl.float32)
    else:
        row_max = tl.max(tl.max(x, axis=1), axis=0)
        p = tl.exp(x - row_max)
        denom = tl.sum(tl.sum(p, axis=1), axis=0)
        choice = p / denom
    choice = tl.where(ok, choice, float("-inf"))
    if GROUPED:   # group score = its best (+ second best) choice score; keep the best groups
        top1 = tl.max(choice, axis=1)                                  # [G]
        gscore = top1
        if PAIR:
            first = tl.argmax(choice, axis=1, tie_break_left=True)
            rest = tl.where(s[None, :] == first[:, None], float("-inf"), choice)
            gscore = top1 + tl.max(rest, axis=1)
        gscore = tl.where(g < num_groups, gscore, float("-inf"))
        keep = g < 0
        for _ in range(topk_groups):
            gi = tl.argmax(gscore, axis=0, tie_break_left=True)
            keep = keep | (g == gi)
            gscore = tl.where(g == gi, float("-inf"), gscore)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    # k rounds of argmax (one reduction each; the flat index order is the expert id order,
    # so tie_break_left gives the lower id).
    flat = tl.reshape(choice, [G_PAD * S_PAD])
    fidx = tl.arange(0, G_PAD * S_PAD)
    kk = tl.arange(0, K_PAD)
    ids = tl.zeros([K_PAD], tl.int32)
    for j in tl.static_range(TOP_K):
        f = tl.argmax(flat, axis=0, tie_break_left=True)
        ids = tl.where(kk == j, (f // S_PAD) * group_size + f % S_PAD, ids)
        flat = tl.where(fidx == f, float("-inf"), flat)
    # Weights: the chosen experts' uncorrected scores, recomputed from their k logits by the
    # same formula (bit-identical to the row's).
    xk = tl.load(logits_ptr + t * stride_t + ids, mask=kk < TOP_K, other=0.0).to(tl.float32)
    if SIGMOID:
        weights = tl.sigmoid(xk)
    else:
        weights = tl.exp(xk - row_max) / denom
    weights = tl.where(kk < TOP_K, weights, 0.0)
    if RENORM:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * scale
    tl.store(w_ptr + t * TOP_K + kk, weights, mask=kk < TOP_K)
    tl.store(ids_ptr + t * TOP_K + kk, ids, mask=kk < TOP_K)


@register("moe_route", "triton", priority=PRIO, requires=ROUTE_REQ)
def moe_route_triton(router_logits, correction_bias, top_k, scoring, renormalize,
                     num_groups, topk_groups, routed_scaling_factor):
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    num_tokens, num_experts = logits.shape
    if num_experts > ROUTE_MAX_EXPERTS:
        raise ValueError(f"moe_route (triton): {num_experts} experts exceed the "
                         f"{ROUTE_MAX_EXPERTS} one row of registers holds; use the reference")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    sigmoid = scoring == "sigmoid"
    grouped = num_groups > 1
    groups = num_groups if grouped else 1
    size = num_experts // groups
    bias = correction_bias if (sigmoid and correction_bias is not None) else None
    pad = triton.next_power_of_2(num_experts)
    _route_kernel[(num_tokens,)](
        logits, bias if bias is not None else logits, weights, ids, logits.stride(0),
        groups, size, topk_groups if grouped else 1, float(routed_scaling_factor),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
        G_PAD=triton.next_power_of_2(groups), S_PAD=triton.next_power_of_2(size),
        SIGMOID=sigmoid, HAS_BIAS=bias is not None, GROUPED=grouped, PAIR=size >= 2,
        RENORM=bool(renormalize), num_warps=max(1, min(8, pad // 512)))
    return weights, ids


# ---------------------------------------------------------------------------------------
# moe_experts: launch configuration

@dataclass(frozen=True, slots=True)
class MoeConfig:
    """Tiles of the two grouped GEMMs. block_m is shared (the align step pads to it).

    decode=True selects the one-token path (no align, no slot-sum launch): block_n1/k1 tile
    the gate/up GEMM of one (slot, I tile) program (block_m is then only the dot's row
    count; row 0 is the token), block_n2 x block_k2 the W2 tile of one step of a w2-and-sum
    program (stages2: its software pipeline depth)."""

    block_m: int = 16
    block_n1: int = 32     # columns of I per program in the w13 GEMM (gate and up each)
    block_k1: int = 128
    warps1: int = 4
    stages1: int = 4
    block_n2: int = 32     # columns of H per program in the w2 GEMM
    block_k2: int = 128
    warps2: int = 4
    stages2: int = 4
    decode: bool = False


def pick_config(num_tokens: int, top_k: int, num_experts: int, hidden: int,
                width: int) -> MoeConfig:
    """The regime rule: one token (decode, T == 1) -> decode_config, else aligned_config.

    One token's k pairs name k different experts (topk over distinct ids), so one program
    per (slot, tile) reads each touched expert's weights once without sorting anything, and
    one program per H tile can loop over the k slots and sum them itself. From two tokens
    on, pairs share experts and a per-token program would read a shared expert twice: the
    aligned path groups the pairs by expert first."""
    if num_tokens == 1:
        return decode_config(hidden, width)
    return aligned_config(num_tokens * top_k, num_experts, hidden, width)


def decode_config(hidden: int, width: int) -> MoeConfig:
    """One token: 2 launches. w13: grid (k, I/block_n1), the aligned path's decode tiles
    (BN=32 x BK=256 gate + up, 4 stages). w2 + slot sum: grid H/block_n2, a CUDA-core
    matrix-vector loop; block_n2=16 gives Moonlight (H=2048) 128 programs for the 132 SMs,
    each streaming 16 rows x 512 columns of a held expert's W2 per step, 4 steps ahead
    (~64 KB of weight loads in flight per SM: one program per SM must hide the latency
    alone)."""
    if INTERPRET:
        return MoeConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16,
                         decode=True)
    return MoeConfig(16, block_n1=32, block_k1=256 if hidden % 256 == 0 else 128, warps1=4,
                     stages1=4, block_n2=16, block_k2=min(512, triton.next_power_of_2(width)),
                     warps2=8, stages2=5, decode=True)


def aligned_config(num_pairs: int, num_experts: int, hidden: int, width: int) -> MoeConfig:
    """Tiles from the shapes alone (no host sync on the routing).

    block_m = the expected pairs per expert (rounded up to a power of 2, 16..128), so an
    expert's weights are streamed by one row block (two where the spread overflows it).
    Weight-bound rows (block_m <= 32): long K tiles and deep pipelines keep ~100-200 KB of
    weight loads in flight per SM, which is what the few programs of a decode step need
    (H100, benchmarks/kernels/moe.py --sweep/--profile: halving the w13 BN to 16 was slower
    despite twice the programs; the figures are in
    benchmarks/results/kernels/NOTES_from_docstrings.md). Larger block_m: tensor-core tiles."""
    per_expert = -(-num_pairs // max(num_experts, 1))
    block_m = min(128, max(16, triton.next_power_of_2(per_expert)))
    if INTERPRET:     # tiny shapes on the CPU: still exercise several N tiles and K steps
        return MoeConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16)
    if block_m <= 32:
        return MoeConfig(block_m, block_n1=32, block_k1=256 if hidden % 256 == 0 else 128,
                         warps1=4, stages1=4, block_n2=64, block_k2=128, warps2=4, stages2=5)
    warps = 8 if block_m >= 128 else 4
    return MoeConfig(block_m, block_n1=64, block_k1=64, warps1=warps, stages1=4,
                     block_n2=128, block_k2=64, warps2=warps, stages2=3)


# ---------------------------------------------------------------------------------------
# moe_experts: step 1, align (pairs grouped by expert, each expert padded to block_m rows)

@triton.jit
def _align_kernel(ids_ptr, sorted_pair_ptr, block_expert_ptr, block_rows_ptr, num_pairs,
                  expert_start, num_experts, max_blocks,
                  BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """One program per held expert `me`: histogram every pair's expert (all programs agree on
    the layout), then place my pairs, in pair order, at my segment's start, and write my
    blocks' entries of the block table. Program p also marks every E-th unused block -1."""
    me = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([E_PAD], tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + lanes
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32) - expert_start
        held = (offs < num_pairs) & (e >= 0) & (e < num_experts)
        counts += tl.histogram(tl.where(held, e, 0), E_PAD, mask=held)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M                     # [E] row blocks per expert
    block_end = tl.cumsum(blocks, axis=0)
    experts = tl.arange(0, E_PAD)
    my_count = tl.sum(tl.where(experts == me, counts, 0), axis=0)
    my_first = tl.sum(tl.where(experts == me, block_end - blocks, 0), axis=0)
    used = tl.sum(blocks, axis=0)
    seen = my_count * 0
    for start in range(0, num_pairs, CHUNK):
        offs = start + lanes
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32) - expert_start
        mine = ((offs < num_pairs) & (e == me)).to(tl.int32)
        rank = seen + tl.cumsum(mine, axis=0) - 1
        tl.store(sorted_pair_ptr + my_first * BLOCK_M + rank, offs, mask=mine != 0)
        seen += tl.sum(mine, axis=0)
    for b0 in range(0, my_count, BLOCK_M * CHUNK):                  # my blocks
        b = b0 // BLOCK_M + lanes
        mask = b * BLOCK_M < my_count
        tl.store(block_expert_ptr + my_first + b, me + 0 * b, mask=mask)
        tl.store(block_rows_ptr + my_first + b, tl.minimum(my_count - b * BLOCK_M, BLOCK_M),
                 mask=mask)
    for b0 in range(used + me * CHUNK, max_blocks, num_experts * CHUNK):   # unused blocks
        b = b0 + lanes
        tl.store(block_expert_ptr + b, -1 + 0 * b, mask=b < max_blocks)


# ---------------------------------------------------------------------------------------
# moe_experts: steps 2-4

@triton.jit
def _w13_silu_kernel(x_ptr, w13_ptr, b13_ptr, act_ptr, sorted_pair_ptr, block_expert_ptr,
                     block_rows_ptr, hidden, width, top_k, expert_start, num_experts,
                     stride_xt, stride_we, stride_wn, stride_wk, stride_be, alpha, limit,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, IEEE: tl.constexpr,
                     DECODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SWIGLUOAI: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Aligned: program (row block, I tile) of the sorted pairs. DECODE (one token):
    program (slot j, I tile); block_expert_ptr is then topk_ids [k], row 0 of the tile is
    the token, and its act row is j (sorted_pair_ptr/block_rows_ptr unused).
    Gate column n of w13[e] is row n (stacked [gate ; up], up at n + width) or row 2n
    (INTERLEAVED, up at 2n + 1); any row/column strides (a transposed view included).
    HAS_BIAS adds b13[e] (same layout); SWIGLUOAI is GPT-OSS's clamped activation."""
    blk = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    if DECODE:
        expert = tl.load(block_expert_ptr + blk).to(tl.int32) - expert_start
        if (expert < 0) | (expert >= num_experts):
            return
        row_ok = offs_m < 1
        token = (offs_m * 0).to(tl.int64)
        rows64 = (blk + offs_m).to(tl.int64)                 # only row 0 is stored
    else:
        expert = tl.load(block_expert_ptr + blk)
        if expert < 0:
            return
        rows = tl.load(block_rows_ptr + blk)
        row_ok = offs_m < rows
        pair = tl.load(sorted_pair_ptr + blk * BLOCK_M + offs_m, mask=row_ok, other=0)
        token = (pair // top_k).to(tl.int64)
        rows64 = (blk * BLOCK_M + offs_m).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < width
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]                  # [M, K]
    if INTERLEAVED:
        gate_rows = 2 * offs_n.to(tl.int64)
        up_step = 1
    else:
        gate_rows = offs_n.to(tl.int64)
        up_step = width
    gate_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we
                 + gate_rows[:, None] * stride_wn + offs_k[None, :] * stride_wk)   # [N, K]
    up_ptrs = gate_ptrs + up_step * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k0
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if EVEN_K and EVEN_N:
            wg = tl.load(gate_ptrs)
            wu = tl.load(up_ptrs)
        else:
            wg = tl.load(gate_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            wu = tl.load(up_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:   # fp32 inputs, or any input under the interpreter (its bf16 dot is wrong)
            a = a.to(tl.float32)
            acc_gate = tl.dot(a, tl.trans(wg.to(tl.float32)), acc_gate, input_precision="ieee")
            acc_up = tl.dot(a, tl.trans(wu.to(tl.float32)), acc_up, input_precision="ieee")
        else:
            acc_gate = tl.dot(a, tl.trans(wg), acc_gate)
            acc_up = tl.dot(a, tl.trans(wu), acc_up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_ptrs = b13_ptr + expert.to(tl.int64) * stride_be + gate_rows
        acc_gate += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(b_ptrs + up_step, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLUOAI:   # gate <= limit, |up| <= limit, (up + 1) * gate * sigmoid(alpha * gate)
        acc_gate = tl.minimum(acc_gate, limit)
        acc_up = tl.minimum(tl.maximum(acc_up, -limit), limit)
        act = (acc_up + 1.0) * (acc_gate * tl.sigmoid(acc_gate * alpha))
    else:
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up             # silu(gate) * up, fp32
    tl.store(act_ptr + rows64[:, None] * width + offs_n[None, :],
             act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _w2_kernel(act_ptr, w2_ptr, b2_ptr, y_ptr, topk_w_ptr, sorted_pair_ptr, block_expert_ptr,
               block_rows_ptr, hidden, width, stride_we, stride_wn, stride_wk, stride_be,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, IEEE: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    blk = tl.program_id(0)
    expert = tl.load(block_expert_ptr + blk)
    if expert < 0:
        return
    rows = tl.load(block_rows_ptr + blk)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    pair = tl.load(sorted_pair_ptr + blk * BLOCK_M + offs_m, mask=row_ok, other=0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    rows64 = (blk * BLOCK_M + offs_m).to(tl.int64)
    a_ptrs = act_ptr + rows64[:, None] * width + offs_k[None, :]                   # [M, K]
    w_ptrs = (w2_ptr + expert.to(tl.int64) * stride_we
              + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk)  # [N, K]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k_ok = offs_k < width - k0
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:    # the expert's down bias, weighted with the rest of its output
        acc += tl.load(b2_ptr + expert.to(tl.int64) * stride_be + offs_n, mask=n_ok,
                       other=0.0).to(tl.float32)[None, :]
    acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + pair.to(tl.int64)[:, None] * hidden + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _w2_sum_decode_kernel(act_ptr, w2_ptr, b2_ptr, out_ptr, topk_w_ptr, ids_ptr, hidden,
                          width, top_k, expert_start, num_experts, stride_we, stride_wn,
                          stride_wk, stride_be,
                          K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, STAGES: tl.constexpr,
                          HAS_BIAS: tl.constexpr):
    """One token: out[0, n tile] = sum over the held slots j of weight[j] * W2[e_j] act[j]
    on the n tile, a matrix-vector product on the CUDA cores: acc[BN, BK] += W * (wt * a),
    summed over K once at the end, fp32 throughout (no M=16 tensor-core tile of which one
    row is real: its ldmatrix/mma chain per K step made this launch latency-bound on an
    H100, benchmarks/results/kernels/h100_moe_bc3e7fb.log). One flat loop over (held slot,
    K step), software-pipelined with tl.range(num_stages) (a loop with no dot is pipelined
    only when asked), so the weight stream never drains between slots; step `it` takes the
    held slot of rank it // k_steps."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    slots = tl.arange(0, K_PAD)
    e = tl.load(ids_ptr + slots, mask=slots < top_k, other=-1).to(tl.int32) - expert_start
    held = (slots < top_k) & (e >= 0) & (e < num_experts)
    rank = tl.cumsum(held.to(tl.int32), axis=0) - 1
    num_held = tl.sum(held.to(tl.int32), axis=0)
    k_steps = tl.cdiv(width, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk  # [N, K]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for it in tl.range(0, num_held * k_steps, num_stages=STAGES):
        s = it // k_steps
        k0 = (it - s * k_steps) * BLOCK_K
        slot = tl.sum(tl.where(held & (rank == s), slots, 0), axis=0)
        expert = tl.load(ids_ptr + slot).to(tl.int32) - expert_start
        wt = tl.load(topk_w_ptr + slot).to(tl.float32)
        a_ptrs = act_ptr + slot * width + k0 + offs_k
        w_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + k0 * stride_wk + w_rows
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k < width - k0, other=0.0)
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k < width - k0)[None, :], other=0.0)
        acc += w.to(tl.float32) * (a.to(tl.float32) * wt)[None, :]
    total = tl.sum(acc, axis=1)
    if HAS_BIAS:    # sum over held slots j of weight[j] * b2[e_j] on the n tile
        local = tl.where(held, e, 0).to(tl.int64)
        wts = tl.load(topk_w_ptr + slots, mask=held, other=0.0).to(tl.float32)
        bias = tl.load(b2_ptr + local[:, None] * stride_be + offs_n[None, :],
                       mask=held[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        total += tl.sum(bias * wts[:, None], axis=0)
    tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sum_slots_kernel(y_ptr, ids_ptr, out_ptr, hidden, top_k, expert_start, num_experts,
                      K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    slot = tl.arange(0, K_PAD)
    e = tl.load(ids_ptr + t * top_k + slot, mask=slot < top_k, other=-1).to(tl.int32)
    held = (slot < top_k) & (e - expert_start >= 0) & (e - expert_start < num_experts)
    y = tl.load(y_ptr + (t * top_k + slot)[:, None] * hidden + offs_h[None, :],
                mask=held[:, None] & (offs_h[None, :] < hidden), other=0.0)
    tl.store(out_ptr + t * hidden + offs_h,
             tl.sum(y.to(tl.float32), axis=0).to(out_ptr.dtype.element_ty),
             mask=offs_h < hidden)


def experts_with_config(x, w13, w2, topk_weights, topk_ids, expert_start, cfg: MoeConfig,
                        b13=None, b2=None, activation="silu", alpha=1.702, limit=7.0,
                        interleaved=False):
    """moe_experts with explicit tiles (the registered op picks them with pick_config).
    The weights are read through their strides (no copy of a transposed view); x and the
    biases need a unit last stride (copied otherwise: they are small)."""
    num_tokens, hidden = x.shape
    num_experts, width = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    if cfg.decode and num_tokens != 1:
        raise ValueError(f"moe_experts (triton): the decode path takes one token, got "
                         f"{num_tokens}; use aligned_config (pick_config chooses)")
    out = torch.empty_like(x)
    if num_tokens == 0 or top_k == 0:
        return out.zero_()
    x = x if x.stride(-1) == 1 else x.contiguous()
    b13 = b13 if b13 is None or b13.stride(-1) == 1 else b13.contiguous()
    b2 = b2 if b2 is None or b2.stride(-1) == 1 else b2.contiguous()
    var = _Variant(b13, b2, activation, float(alpha), float(limit), bool(interleaved))
    flat_ids = topk_ids.reshape(-1)
    flat_w = topk_weights.reshape(-1)
    # fp32 in: exact fp32 products (not tf32). The interpreter's bf16/fp16 dot is wrong
    # (Triton 3.6), so there every dot runs on fp32 copies of the tiles.
    ieee = x.dtype == torch.float32 or INTERPRET
    if cfg.decode:
        return _experts_decode(x, w13, w2, flat_w, flat_ids, expert_start, cfg, ieee, out,
                               var)
    n, bm, dev = flat_ids.numel(), cfg.block_m, x.device
    max_rows = n + min(n, num_experts) * (bm - 1)                   # every held expert padded
    max_blocks = triton.cdiv(max_rows, bm)
    sorted_pair = torch.empty(max_blocks * bm, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    block_rows = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    _align_kernel[(num_experts,)](
        flat_ids, sorted_pair, block_expert, block_rows, n, expert_start, num_experts,
        max_blocks, BLOCK_M=bm, E_PAD=triton.next_power_of_2(num_experts),
        CHUNK=min(2048, max(16, triton.next_power_of_2(n))), num_warps=4)
    act = torch.empty(max_blocks * bm, width, dtype=x.dtype, device=dev)
    _w13_silu_kernel[(max_blocks, triton.cdiv(width, cfg.block_n1))](
        x, w13, var.b13_arg(x), act, sorted_pair, block_expert, block_rows, hidden, width,
        top_k, expert_start, num_experts, x.stride(0), *w13.stride(), var.b13_stride(),
        var.alpha, var.limit,
        BLOCK_M=bm, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1,
        EVEN_K=hidden % cfg.block_k1 == 0, EVEN_N=width % cfg.block_n1 == 0, IEEE=ieee,
        DECODE=False, num_warps=cfg.warps1, num_stages=cfg.stages1, **var.w13_flags())
    # Per-slot rows in fp32, unless that grows past Y_FP32_MAX_BYTES (prefill: Kimi T=8192
    # would need 1.9 GB); then in x.dtype, rounded once per slot as the reference does.
    y_dtype = torch.float32 if n * hidden * 4 <= Y_FP32_MAX_BYTES else x.dtype
    y = torch.empty(n, hidden, dtype=y_dtype, device=dev)
    _w2_kernel[(max_blocks, triton.cdiv(hidden, cfg.block_n2))](
        act, w2, var.b2_arg(x), y, flat_w, sorted_pair, block_expert, block_rows, hidden,
        width, *w2.stride(), var.b2_stride(),
        BLOCK_M=bm, BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k2,
        EVEN_K=width % cfg.block_k2 == 0, EVEN_N=hidden % cfg.block_n2 == 0, IEEE=ieee,
        HAS_BIAS=var.b2 is not None, num_warps=cfg.warps2, num_stages=cfg.stages2)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, flat_ids, out, hidden, top_k, expert_start, num_experts,
        K_PAD=triton.next_power_of_2(top_k), BLOCK_H=block_h, num_warps=4)
    return out


@dataclass(frozen=True, slots=True)
class _Variant:
    """The optional parts of moe_experts (kernels/moe.py): per-expert biases, the
    activation, the gate/up layout. Off, the kernels compile exactly as without them."""
    b13: torch.Tensor | None
    b2: torch.Tensor | None
    activation: str
    alpha: float
    limit: float
    interleaved: bool

    def b13_arg(self, x):          # any pointer stands in for an absent bias (never read)
        return x if self.b13 is None else self.b13

    def b2_arg(self, x):
        return x if self.b2 is None else self.b2

    def b13_stride(self) -> int:
        return 0 if self.b13 is None else self.b13.stride(0)

    def b2_stride(self) -> int:
        return 0 if self.b2 is None else self.b2.stride(0)

    def w13_flags(self) -> dict[str, bool]:
        return dict(HAS_BIAS=self.b13 is not None, SWIGLUOAI=self.activation == "swigluoai",
                    INTERLEAVED=self.interleaved)


def _experts_decode(x, w13, w2, flat_w, flat_ids, expert_start, cfg, ieee, out, var):
    """One token, two launches: act[j] = silu(gate) * up for each held slot j (grid k x I
    tiles, straight from topk_ids), then out = sum_j weight[j] * act[j] @ W2[e_j]^T (grid H
    tiles, the slot sum in fp32 registers, written once in x.dtype)."""
    hidden = x.shape[1]
    num_experts, width = w13.shape[0], w13.shape[1] // 2
    top_k = flat_ids.numel()
    act = torch.empty(top_k, width, dtype=x.dtype, device=x.device)
    _w13_silu_kernel[(top_k, triton.cdiv(width, cfg.block_n1))](
        x, w13, var.b13_arg(x), act, flat_ids, flat_ids, flat_ids, hidden, width, top_k,
        expert_start, num_experts, x.stride(0), *w13.stride(), var.b13_stride(),
        var.alpha, var.limit,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1,
        EVEN_K=hidden % cfg.block_k1 == 0, EVEN_N=width % cfg.block_n1 == 0, IEEE=ieee,
        DECODE=True, num_warps=cfg.warps1, num_stages=cfg.stages1, **var.w13_flags())
    _w2_sum_decode_kernel[(triton.cdiv(hidden, cfg.block_n2),)](
        act, w2, var.b2_arg(x), out, flat_w, flat_ids, hidden, width, top_k, expert_start,
        num_experts, *w2.stride(), var.b2_stride(),
        K_PAD=triton.next_power_of_2(top_k), BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k2,
        EVEN_K=width % cfg.block_k2 == 0, EVEN_N=hidden % cfg.block_n2 == 0,
        STAGES=cfg.stages2, HAS_BIAS=var.b2 is not None, num_warps=cfg.warps2,
        num_stages=cfg.stages2)
    return out


@register("moe_experts", "triton", priority=PRIO, requires=EXPERTS_REQ)
def moe_experts_triton(x, w13, w2, topk_weights, topk_ids, expert_start=0, b13=None, b2=None,
                       activation="silu", alpha=1.702, limit=7.0, interleaved=False):
    cfg = pick_config(x.shape[0], topk_ids.shape[1], w13.shape[0], x.shape[1],
                      w13.shape[1] // 2)
    # Only the variants that are on are passed: the plain call stays the plain call.
    variants = {k: b for k, b in (("b13", b13), ("b2", b2)) if b is not None}
    if activation != "silu":
        variants.update(activation=activation, alpha=alpha, limit=limit)
    if interleaved:
        variants["interleaved"] = True
    return experts_with_config(x, w13, w2, topk_weights, topk_ids, expert_start, cfg,
                               **variants)
