"""Triton block-scaled FP8 linear: `tscompile::fp8_block_linear(x, weight, weight_scale_inv,
bias, block) -> x @ W^T + bias` with W[i, j] = weight[i, j] * weight_scale_inv[i // 128, j // 128].

What it is: the "triton" backend of `fp8_block_linear` (kernels/fp8.py), 128 x 128 weight
blocks only (DeepSeek-V3 / Kimi K2 / Qwen3-FP8 checkpoints), x in bf16 / fp16 / fp32, output
in x's dtype. Two regimes, chosen by the token count M = x.numel() / K alone (no host sync):

* M <= DECODE_MAX_M (16), weight-only ("W8A16"): activations stay in x's dtype; each program
  streams a [BLOCK_N, 128 * KSUB] tile of fp8 weight per step, widens it to x's dtype in
  registers (exact: every e4m3 value is a bf16 / fp16 value), multiplies by the x rows padded
  to a 16-row tile (tl.dot, fp32 accumulate) and scales each 128-wide K block's product by
  its weight block scale. M == 1 runs on the CUDA cores instead (`_w8a16_gemv1_kernel`:
  acc[BLOCK_N, 128] += widen(w) * (x * scale) in fp32, one sum over K at the end). The grid is (cdiv(N, BLOCK_N), SPLIT_K): SPLIT_K > 1 when N alone
  gives too few programs to fill the SMs; the splits then write fp32 partials that a second
  launch sums in a fixed order (deterministic, no atomics) and finishes (bias, cast).
* M > DECODE_MAX_M, W8A8 (the DeepSeek-V3 / DeepGEMM recipe): x is quantized per token per
  128-wide K group to e4m3 (scale = amax / 448, stored K-group-major so a tile's scales are
  one contiguous load), then an FP8 x FP8 tl.dot per 128-wide K step, its fp32 result
  multiplied by (activation group scale x weight block scale) and added to the fp32
  accumulator (a fresh dot per K block: the per-block promotion that keeps Hopper's FP8 MMA
  accumulation error bounded); bias in the epilogue, one rounding to x's dtype.
  `FUSE_QUANT` instead quantizes the [BLOCK_M, 128] x tile inside the GEMM's K loop (same
  numbers, no separate launch, but every N tile re-reads x in its own dtype); the
  benchmark (benchmarks/kernels/fp8_gemm.py) times both and `prefill_config` takes the
  separate launch by default.

Numerics: the decode path is exact up to fp32 accumulation order (no activation
rounding), so it matches the reference to ~1e-6 relative in fp32. The prefill path adds
the activation rounding to e4m3 (3 mantissa bits: <= 2^-4 relative per element,
~2^-4/sqrt(3) rms); `quantize_act_reference` is its torch oracle (bit-exact with the
kernel's quantization) for tests that separate the GEMM from the rounding.

Hardware: FP8 conversions and FP8 MMA need sm_89+ (Ada / Hopper), hence min_arch (8, 9).
Interpreter (TRITON_INTERPRET=1, the CPU tests): Triton 3.x's interpreter does an exact
FP8 tl.dot, but its fp32 -> float8e4nv cast is wrong when rounding carries into the next
binade (127.2 -> 64 instead of 128) and above 448; so under the interpreter only, values
are first rounded to the e4m3 grid in fp32 (`_round_e4m3`, round-to-nearest-even, as the
hardware's cvt.rn.satfinite does) and the cast then only relabels exact values. Its
bf16 / fp16 dot is also unreliable, so the decode path's dot runs in fp32 there (IEEE).

Napkin math (H200: ~4.8 TB/s HBM, ~1979 TFLOP/s dense FP8 spec, ~989 bf16):
  decode: bytes = N*K (fp8 weight) + N*K/16384*4 (scales) + M*K*e + M*N*e; at 4096 x 4096,
  M=1: 16.8 MB -> ~3.5 us at the roof (bf16 weights: 33.6 MB, ~7 us). FLOPs are nothing.
  prefill: 2*M*N*K FLOPs; M=4096, N=K=4096: 137 GFLOP -> ~70 us at 1979 TFLOP/s, the
  quantize launch moves 3*M*K bytes (50 MB, ~10 us), which is why fusing it is an option.

Tiling (prefill_config / decode_config): BLOCK_K = 128 is the scale block (one scale per K
step). Prefill: 64 x 128 tiles, 4 warps (one warpgroup), 4 stages, GROUP_M = 8 swizzle for
L2 reuse. Decode: M == 1 on the CUDA-core kernel with 64 weight rows x 2 K blocks per step,
8 warps; 1 < M <= 16 on the 16-row tl.dot kernel (64 rows, 4 warps); SPLIT_K doubles while
programs < 1.5 x SMs.
Measured (one H200, 2026-12-03, benchmarks/kernels/fp8_gemm.py, harness CUDA-graph timing;
roofs in the same run: copy 4029 GB/s, bf16 mm 783 TFLOP/s, FP8 _scaled_mm 1380 tensorwise /
1292 rowwise TFLOP/s). With the first defaults (128 x 128 x 8 warps; decode 32 rows, 4 warps):
prefill 527-656 TFLOP/s at Qwen3-8B o / gate_up (0.38-0.48 of the FP8 roof; bf16 F.linear
690-788); DeepSeek kv_a (N = 576) 81-295; fusing the quantization into the GEMM was 2.5x
slower (x re-read and re-quantized per N tile, A through registers), so it stays off;
the quantize launch alone reaches 0.8-0.9 of the copy roof at M >= 2048. The sweep then
picked the present defaults: gate_up M = 2048 at 64 x 128 x 4 warps 727 TFLOP/s (0.53 of
the roof; 128 x 128 x 8 warps 641, 128 x 256 and 256 x 128 about 330); decode M = 1 at
64 rows x 8 warps on the CUDA cores 3422 GB/s on gate_up (0.85 of copy; bf16 F.linear
3825 GB/s on twice the bytes) and 1659 GB/s on o_proj 4096 x 4096 (16.8 MB: split-K 4
plus its sum launch, ~10 us, launch- and ramp-bound); the 16-row tl.dot kernel was 0.7x
to 0.3x of the CUDA-core one at M = 1. Open: prefill is below the issue's 60% of the FP8
roof (the per-128-K promotion makes every wgmma wait before its scale multiply); the
whole table with these defaults has not been re-run.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from tscompile.kernels.registry import Query, Requirements, register
from tscompile.kernels.triton import INTERPRET

PRIO = -10 if INTERPRET else 10
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BLOCK = 128          # the only weight block (bn = bk) this backend runs
DECODE_MAX_M = 16          # M at or below: weight-only path; above: W8A8 path
AMAX_EPS = 1e-10           # floor of a group's amax (an all-zero group gets scale eps/448)


def _shape_check(q: Query) -> str | None:
    """Refuses what the op tells it about (today kernels/fp8.py passes no shape facts, so
    the block and shapes are checked again, with an error, in the implementation)."""
    bn, bk = q.get("block_n"), q.get("block_k")
    if (bn is not None and bn != SCALE_BLOCK) or (bk is not None and bk != SCALE_BLOCK):
        return f"block [{bn}, {bk}] is not [128, 128]"
    return None


REQ = Requirements(devices=frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"}),
                   dtypes=DTYPES, min_arch=None if INTERPRET else (8, 9),
                   shape_check=_shape_check)


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------

@triton.jit
def _round_e4m3(v):
    """fp32 v (already within [-448, 448]) rounded to the nearest e4m3 value, ties to even.
    Normal range (|v| >= 2^-6): keep 3 mantissa bits of the fp32 bit pattern; a carry moves
    into the exponent as it should. Subnormals (|v| < 2^-6, spacing 2^-9): (|v| + c) - c
    with c = 1.5 * 2^14, whose fp32 ulp is 2^-9, rounds |v| to a multiple of 2^-9."""
    bits = v.to(tl.int32, bitcast=True)
    odd = (bits >> 20) & 1
    bits = (bits + 0x7FFFF + odd) & -1048576     # ~0xFFFFF: clear the 20 low bits
    normal = bits.to(tl.float32, bitcast=True)
    mag = (tl.abs(v) + 24576.0) - 24576.0
    sub = tl.where(v < 0, -mag, mag)               # keeps -0 for tiny negatives, as cvt does
    return tl.where(tl.abs(v) >= 0.015625, normal, sub)


@triton.jit
def _quant_tile(x, INTERP: tl.constexpr):
    """x [R, 128] fp32 -> (q [R, 128] e4m3, scale [R] fp32): each row's amax maps to 448."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    inv = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)
    v = tl.clamp(x * inv[:, None], -448.0, 448.0)
    if INTERP:
        v = _round_e4m3(v)
    return v.to(tl.float8e4nv), scale


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sg,
                      ROWS: tl.constexpr, GROUP: tl.constexpr, INTERP: tl.constexpr):
    """Grid (cdiv(M, ROWS), cdiv(K, GROUP)): q[m, k] e4m3 and s[k // GROUP, m] fp32 for one
    [ROWS, GROUP] tile (a short last group is padded with zeros, which change no amax)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    q, scale = _quant_tile(x, INTERP)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + g * stride_sg + rows, scale, mask=rmask)


@triton.jit
def _w8a8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
                      stride_am, stride_asg, stride_bn, stride_bsn, stride_bsk, stride_cm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                      FUSE_QUANT: tl.constexpr, INTERP: tl.constexpr):
    """C [M, N] = (A * a_scale) @ (B * b_scale)^T (+ bias), one [BLOCK_M, BLOCK_N] tile per
    program, BLOCK_K = 128 = the scale group. A [M, K] e4m3 with a_scale [K/128, M] (or, with
    FUSE_QUANT, A is x itself, quantized here tile by tile), B [N, K] e4m3, b_scale
    [N/128, K/128]. Rows / columns past M / N are read modulo M / N (always in bounds) and
    never stored; the K tail is masked to zero."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n                # GROUP_M row tiles sweep the N tiles together
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    am = (offs_m % M).to(tl.int64)
    bn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + am[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + bn[None, :] * stride_bn + offs_k[:, None]          # [BLOCK_K, BLOCK_N]
    as_ptrs = as_ptr + am
    if BLOCK_N <= 128:          # the tile lies in one 128-row weight block: a scalar scale
        bs_ptrs = bs_ptr + (pid_n * BLOCK_N // 128) * stride_bsn
    else:
        bs_ptrs = bs_ptr + (bn // 128) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_steps = tl.cdiv(K, BLOCK_K)
    for kb in range(0, k_steps):
        kmask = offs_k < K - kb * BLOCK_K
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        b_s = tl.load(bs_ptrs + kb * stride_bsk)
        if FUSE_QUANT:
            x = tl.load(a_ptrs, mask=kmask[None, :], other=0.0).to(tl.float32)
            a, a_s = _quant_tile(x, INTERP)
        else:
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kb * stride_asg)
        part = tl.dot(a, b)
        if BLOCK_N <= 128:
            acc += part * (a_s * b_s)[:, None]
        else:
            acc += part * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(bias_ptr + bn).to(c_ptr.dtype.element_ty).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _w8a16_gemv_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                       stride_wn, stride_wsn, stride_wsk, stride_om, steps_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KSUB: tl.constexpr,
                       SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                       STAGES: tl.constexpr):
    """out[:M, n tile] (SPLIT_K == 1: x's dtype, + bias; else fp32 partials at
    out_ptr + pid_k * M * N) for M <= BLOCK_M rows of x, over this split's K steps of
    128 * KSUB. Each 128-wide K block: part = x[:, kb] @ widen(w[n tile, kb])^T in fp32,
    acc += part * w_scale[n // 128, kb]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    wn = (offs_n % N).to(tl.int64)
    mmask = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + wn[None, :] * stride_wn + offs_k[:, None]           # [128, BLOCK_N]
    if BLOCK_N <= 128:
        ws_ptrs = ws_ptr + (pid_n * BLOCK_N // 128) * stride_wsn
    else:
        ws_ptrs = ws_ptr + (wn // 128) * stride_wsn
    k_blocks = tl.cdiv(K, 128)
    step0 = pid_k * steps_per_split
    step1 = tl.minimum(step0 + steps_per_split, tl.cdiv(k_blocks, KSUB))

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.range(step0, step1, num_stages=STAGES):
        for j in tl.static_range(KSUB):
            kb = step * KSUB + j
            k0 = kb * 128
            kmask = offs_k < K - k0      # also all-false past the last block (kb >= k_blocks)
            w = tl.load(w_ptrs + k0, mask=kmask[:, None], other=0.0)
            xv = tl.load(x_ptrs + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
            s = tl.load(ws_ptrs + tl.minimum(kb, k_blocks - 1) * stride_wsk)
            if IEEE:
                part = tl.dot(xv.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(xv, w.to(x_ptr.dtype.element_ty))
            if BLOCK_N <= 128:
                acc += part * s
            else:
                acc += part * s[None, :]

    omask = mmask[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + wn).to(out_ptr.dtype.element_ty).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        part_ptr = out_ptr + pid_k.to(tl.int64) * M * N
        tl.store(part_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=omask)


@triton.jit
def _w8a16_gemv1_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, N, K, stride_wn, stride_wsn,
                        stride_wsk, steps_per_split, BLOCK_N: tl.constexpr,
                        KSUB: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        STAGES: tl.constexpr):
    """One row of x (M == 1), on the CUDA cores: acc[BLOCK_N, 128] += widen(w) * (x * s) per
    128-wide K block, summed over K once at the end (no tensor-core tile padded from one
    row, no per-step cross-thread reduction). Same split / partial layout as the dot
    kernel (M = 1)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    wn = (offs_n % N).to(tl.int64)
    w_ptrs = w_ptr + wn[:, None] * stride_wn + offs_k[None, :]           # [BLOCK_N, 128]
    if BLOCK_N <= 128:
        ws_ptrs = ws_ptr + (pid_n * BLOCK_N // 128) * stride_wsn
    else:
        ws_ptrs = ws_ptr + (wn // 128) * stride_wsn
    k_blocks = tl.cdiv(K, 128)
    step0 = pid_k * steps_per_split
    step1 = tl.minimum(step0 + steps_per_split, tl.cdiv(k_blocks, KSUB))

    acc = tl.zeros((BLOCK_N, 128), dtype=tl.float32)
    for step in tl.range(step0, step1, num_stages=STAGES):
        for j in tl.static_range(KSUB):
            kb = step * KSUB + j
            k0 = kb * 128
            kmask = offs_k < K - k0
            w = tl.load(w_ptrs + k0, mask=kmask[None, :], other=0.0)
            xv = tl.load(x_ptr + k0 + offs_k, mask=kmask, other=0.0).to(tl.float32)
            s = tl.load(ws_ptrs + tl.minimum(kb, k_blocks - 1) * stride_wsk)
            if BLOCK_N <= 128:
                acc += w.to(tl.float32) * (xv * s)[None, :]
            else:
                acc += w.to(tl.float32) * xv[None, :] * s[:, None]
    total = tl.sum(acc, axis=1)
    nmask = offs_n < N
    if SPLIT_K == 1:
        if HAS_BIAS:
            total += tl.load(bias_ptr + wn).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * N + offs_n, total, mask=nmask)


@triton.jit
def _split_sum_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om,
                      SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = sum_s part[s, m, n] (in split order) + bias[n], cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(
            out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 64
    block_n: int = 128
    group_m: int = 8
    warps: int = 4
    stages: int = 4
    fuse_quant: bool = False
    quant_rows: int = 32        # rows per program of the separate quantize launch


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64
    ksub: int = 2               # 128-wide K blocks per pipelined step
    split_k: int = 1
    warps: int = 8
    stages: int = 4
    cuda_cores: bool = True     # M == 1: the CUDA-core kernel (else the 16-row tl.dot one)


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4                 # the interpreter: a pretend 4-SM device (tests split K)
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def prefill_config(m: int, n: int, k: int) -> PrefillConfig:
    if INTERPRET:                # tiny CPU shapes: several M and N tiles, a swizzle group of 2
        return PrefillConfig(block_m=32, block_n=32, group_m=2, warps=4, stages=1,
                             quant_rows=16)
    return PrefillConfig()      # 64 x 128, 4 warps, 4 stages: best of the H200 sweep


def decode_config(m: int, n: int, k: int, sms: int) -> DecodeConfig:
    if INTERPRET:
        cfg = DecodeConfig(block_n=16, ksub=1, warps=4, stages=1)
    elif m == 1:
        cfg = DecodeConfig()    # CUDA cores, 64 rows x 256 K per step, 8 warps
    else:
        cfg = DecodeConfig(warps=4)     # the 16-row tl.dot kernel
    tiles = triton.cdiv(n, cfg.block_n)
    steps = triton.cdiv(triton.cdiv(k, 128), cfg.ksub)
    split = 1
    while 2 * tiles * split < 3 * sms and split * 2 <= steps and split < 16:
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


# ------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------

def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None, block: Sequence[int]) -> None:
    if len(block) != 2 or tuple(int(b) for b in block) != (SCALE_BLOCK, SCALE_BLOCK):
        raise ValueError(f"fp8_block_linear (triton): weight block {list(block)} is not "
                         f"supported, only [128, 128] (use TSCOMPILE_KERNELS="
                         f"fp8_block_linear=reference for other blocks)")
    if weight.dtype != FP8 or weight.ndim != 2:
        raise ValueError(f"fp8_block_linear (triton): weight must be 2-D float8_e4m3fn, got "
                         f"{weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    want = (triton.cdiv(n, SCALE_BLOCK), triton.cdiv(k, SCALE_BLOCK))
    if scale.ndim != 2 or tuple(scale.shape) != want:
        raise ValueError(f"fp8_block_linear (triton): weight_scale_inv has shape "
                         f"{list(scale.shape)} but weight {[n, k]} in 128 x 128 blocks "
                         f"needs {list(want)}")
    if x.shape[-1] != k:
        raise ValueError(f"fp8_block_linear (triton): x has last dim {x.shape[-1]} but "
                         f"weight is {[n, k]}")
    if x.dtype not in DTYPES:
        raise ValueError(f"fp8_block_linear (triton): x dtype {x.dtype} not in "
                         f"{sorted(str(d) for d in DTYPES)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8_block_linear (triton): bias has shape {list(bias.shape)}, "
                         f"want [{n}]")


def quantize_act(x2: torch.Tensor, rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] (last dim contiguous) -> (q [M, K] e4m3, scale [cdiv(K, 128), M] fp32,
    K-group-major): the prefill path's per-token 1 x 128 activation quantization."""
    m, k = x2.shape
    groups = triton.cdiv(k, 128)
    q = torch.empty((m, k), dtype=FP8, device=x2.device)
    s = torch.empty((groups, m), dtype=torch.float32, device=x2.device)
    _act_quant_kernel[(triton.cdiv(m, rows), groups)](
        x2, q, s, m, k, x2.stride(0), q.stride(0), s.stride(0), ROWS=rows, GROUP=128,
        INTERP=INTERPRET, num_warps=4)
    return q, s


def quantize_act_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch oracle of `quantize_act` (same fp32 operations, so the same bits):
    x [M, K] -> (q [M, K] e4m3, scale [cdiv(K, 128), M])."""
    m, k = x.shape
    groups = -(-k // 128)
    xf = torch.zeros(m, groups * 128, dtype=torch.float32, device=x.device)
    xf[:, :k] = x.float()
    xg = xf.view(m, groups, 128)
    amax = xg.abs().amax(-1).clamp_min(AMAX_EPS)                    # [M, G]
    top = torch.full_like(amax, FP8_MAX)   # tensor / tensor: a true division (torch's
    scale = amax / top                       # scalar / tensor multiplies by a reciprocal,
    inv = top / amax                         # which rounds differently from div_rn)
    q = (xg * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, groups * 128)[:, :k]
    return q.contiguous(), scale.t().contiguous()


def w8a8_linear(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, cfg: PrefillConfig,
                act: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The prefill path on x2 [M, K]; `act` = (q, scale) skips the quantize launch (tests)."""
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if cfg.fuse_quant and act is None:
        a, a_s, stride_am, stride_asg = x2, x2, x2.stride(0), 0    # a_s: never read
    else:
        a, a_s = act if act is not None else quantize_act(x2, cfg.quant_rows)
        stride_am, stride_asg = a.stride(0), a_s.stride(0)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _w8a8_gemm_kernel[grid](
        a, a_s, weight, scale, bias if bias is not None else out, out, m, n, k,
        stride_am, stride_asg, weight.stride(0), scale.stride(0), scale.stride(1),
        out.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=128,
        GROUP_M=cfg.group_m, HAS_BIAS=bias is not None,
        FUSE_QUANT=cfg.fuse_quant and act is None, INTERP=INTERPRET,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def w8a16_linear(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, cfg: DecodeConfig) -> torch.Tensor:
    """The decode path on x2 [M <= 16, K]."""
    m, k = x2.shape
    n = weight.shape[0]
    if m > DECODE_MAX_M:
        raise ValueError(f"fp8 w8a16 path takes at most {DECODE_MAX_M} rows, got {m}")
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    steps = triton.cdiv(triton.cdiv(k, 128), cfg.ksub)
    per_split = triton.cdiv(steps, cfg.split_k)
    split = triton.cdiv(steps, per_split)      # no empty split
    dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32,
                                             device=x2.device)
    bias_arg = bias if bias is not None else out
    grid = (triton.cdiv(n, cfg.block_n), split)
    if m == 1 and cfg.cuda_cores:
        _w8a16_gemv1_kernel[grid](
            x2, weight, scale, bias_arg, dst, n, k, weight.stride(0), scale.stride(0),
            scale.stride(1), per_split, BLOCK_N=cfg.block_n, KSUB=cfg.ksub, SPLIT_K=split,
            HAS_BIAS=bias is not None, STAGES=cfg.stages, num_warps=cfg.warps)
    else:
        _w8a16_gemv_kernel[grid](
            x2, weight, scale, bias_arg, dst, m, n, k, x2.stride(0), weight.stride(0),
            scale.stride(0), scale.stride(1), out.stride(0), per_split,
            BLOCK_M=16, BLOCK_N=cfg.block_n, KSUB=cfg.ksub, SPLIT_K=split,
            HAS_BIAS=bias is not None, IEEE=INTERPRET or x2.dtype == torch.float32,
            STAGES=cfg.stages, num_warps=cfg.warps)
    if split > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](
            dst, bias_arg, out, m, n, out.stride(0), SPLIT_K=split,
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, k)
    except RuntimeError:         # leading dims not collapsible
        return x.reshape(-1, k)


@register("fp8_block_linear", "triton", priority=PRIO, requires=REQ)
def fp8_block_linear_triton(x: torch.Tensor, weight: torch.Tensor,
                            weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                            block: Sequence[int], *, prefill: PrefillConfig | None = None,
                            decode: DecodeConfig | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(weight)^T + bias -> [..., N] in x's dtype. `prefill` / `decode`
    override the picked tiles (benchmarks, tests)."""
    _check(x, weight, weight_scale_inv, bias, block)
    n, k = weight.shape
    x2 = _rows(x)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_empty((*x.shape[:-1], n))
    if k == 0:
        out = torch.zeros((m, n), dtype=x.dtype, device=x.device)
        return (out + bias.to(x.dtype) if bias is not None else out).view(*x.shape[:-1], n)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    scale = weight_scale_inv if weight_scale_inv.dtype == torch.float32 \
        else weight_scale_inv.float()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if m <= DECODE_MAX_M:
        out = w8a16_linear(x2, weight, scale, bias,
                           decode or decode_config(m, n, k, sm_count(x.device)))
    else:
        out = w8a8_linear(x2, weight, scale, bias, prefill or prefill_config(m, n, k))
    return out.view(*x.shape[:-1], n)
