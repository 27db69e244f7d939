"""Triton RoPE: `tscompile::rope(x [T, H, D], positions [T], cos_sin_cache [P, r], interleaved)`.

What it is: the "triton" backend of the rope op (`kernels/rope.py`): rotates the first r dims
of every head by the angle of its token's position and copies the other D - r dims (partial
rotary), in both pairings:
    interleaved=False  GPT-NeoX / Llama "rotate half": pairs (i, i + r/2)
    interleaved=True   GPT-J / DeepSeek / Kimi:        pairs (2i, 2i + 1)
The table row is [cos | sin] (r/2 each, any float dtype; read as fp32). The math is the
reference's, in fp32 with no fused multiply-add (x1 cos - x2 sin rounds each product, like
the reference's separate torch ops), then one rounding to x's dtype, so that the bf16 and
fp32 results can match the reference bit for bit (seen on an H100:
benchmarks/results/kernels/NOTES_from_docstrings.md).
x may be a strided view (MLA's q_pe is [T, Nh, dn + dr][..., dn:]): only the last dim must
be contiguous. The output is a new contiguous [T, H, D] tensor (the op is not in place).
Also the "triton" backend of `rms_norm_rope` (kernels/rope.py): the same tile, normalised
per head first (sum of squares over all D dims in fp32, the norm's two roundings), so a
QK-norm model's norm and RoPE are one launch.
What it is not: the table builder (`rope_cos_sin_cache`, in the op file), or a fused
q/k + KV-cache write.

Napkin math (e bytes per element): reads x and writes the output, 2 T H D e bytes, plus one
table row per token (T r 4 bytes) and the positions; 3 FLOPs per rotated element. Bandwidth
bound. MLA prefill T = 4096, 128 heads x 64, bf16: 134 MB -> ~45 us at ~3 TB/s; decode
(T <= 64) is launch bound (a few us in a CUDA graph). Measured: the rope_* rows of
benchmarks/results/kernels/h100_all_ebb1674.json (H100) and h200_all_run2.json (H200);
the torch reference's time is in NOTES_from_docstrings.md.

Launch / tiling: grid (T, cdiv(H, BLOCK_H)); a program loads its token's position and
cos/sin once and rotates a [BLOCK_H, r] tile of heads (~1K elements). NeoX loads the two
halves as two contiguous [BLOCK_H, r/2] tiles; GPT-J loads one contiguous [BLOCK_H, r] tile
and splits the pairs in registers (reshape to [.., r/2, 2] + split), so both stay 16-byte
vectorised instead of stride-2 gathers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tscompile.kernels.registry import Query, register
from tscompile.kernels.triton import INTERPRET, requirements

PRIO = 10 if not INTERPRET else -10
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
# Elements of x a program rotates (larger tiles, up to 8192, were no faster on an H100:
# benchmarks/results/kernels/NOTES_from_docstrings.md).
TILE_ELEMS = 1024
NUM_WARPS = 4


def _shape_check(q: Query) -> str | None:
    rot_dim = q.get("rot_dim")
    if rot_dim is not None and rot_dim % 2:
        return f"rotary dim {rot_dim} is odd (pairs need an even dim)"
    return None


REQ = requirements(DTYPES, _shape_check)


@triton.jit
def _rope_kernel(
    x_ptr, pos_ptr, cache_ptr, out_ptr,
    n_heads, x_stride_t, x_stride_h, cache_stride,
    HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R2: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    HALF: tl.constexpr = ROT_DIM // 2
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                 # [BH]
    head_ok = heads < n_heads
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_R2)                                                 # pair index
    j_ok = j < HALF
    row = cache_ptr + pos * cache_stride
    cos = tl.load(row + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]      # [1, R2]
    sin = tl.load(row + HALF + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]

    x_head = x_ptr + t * x_stride_t + heads[:, None].to(tl.int64) * x_stride_h  # [BH, 1]
    o_head = out_ptr + (t * n_heads + heads[:, None]) * HEAD_DIM
    if INTERLEAVED:
        c = tl.arange(0, 2 * BLOCK_R2)                                         # [2 R2]
        mask = head_ok[:, None] & (c[None, :] < ROT_DIM)
        xr = tl.load(x_head + c[None, :], mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(xr, [BLOCK_H, BLOCK_R2, 2]))              # even, odd
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        o = tl.reshape(tl.join(o1, o2), [BLOCK_H, 2 * BLOCK_R2])
        tl.store(o_head + c[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        mask = head_ok[:, None] & j_ok[None, :]
        x1 = tl.load(x_head + j[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_head + HALF + j[None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        tl.store(o_head + j[None, :], o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_head + HALF + j[None, :], o2.to(out_ptr.dtype.element_ty), mask=mask)
    if BLOCK_REST > 0:  # partial rotary: the dims past ROT_DIM pass through unchanged
        c = ROT_DIM + tl.arange(0, BLOCK_REST)
        mask = head_ok[:, None] & (c[None, :] < HEAD_DIM)
        rest = tl.load(x_head + c[None, :], mask=mask)
        tl.store(o_head + c[None, :], rest, mask=mask)


def _launch(x: torch.Tensor, cos_sin_cache: torch.Tensor, op: str):
    """(x, table with unit last stride, grid, tile constexprs) for a [T, H, D] launch."""
    t, h, d = x.shape
    r = cos_sin_cache.shape[-1]
    if r % 2 or r > d:
        raise ValueError(f"{op}: rotary dim {r} must be even and <= head dim {d}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    block_r2 = triton.next_power_of_2(max(r // 2, 1))
    block_h = max(1, min(triton.next_power_of_2(h), TILE_ELEMS // (2 * block_r2)))
    geo = dict(HEAD_DIM=d, ROT_DIM=r, BLOCK_H=block_h, BLOCK_R2=block_r2,
               BLOCK_REST=triton.next_power_of_2(d - r) if d > r else 0)
    return x, cos_sin_cache, (t, triton.cdiv(h, block_h)), geo


@register("rope", "triton", priority=PRIO, requires=REQ)
def rope_triton(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                interleaved: bool) -> torch.Tensor:
    x, cos_sin_cache, grid, geo = _launch(x, cos_sin_cache, "rope")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _rope_kernel[grid](
        x, positions, cos_sin_cache, out,
        x.shape[1], x.stride(0), x.stride(1), cos_sin_cache.stride(0),
        INTERLEAVED=bool(interleaved), **geo,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out


# ----------------------------------------------------------------------------------------
# rms_norm_rope: per-head RMSNorm, then RoPE, one pass over the heads (QK-norm models)
# ----------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_rope_kernel(
    x_ptr, w_ptr, pos_ptr, cache_ptr, out_ptr,
    n_heads, x_stride_t, x_stride_h, cache_stride, eps,
    HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R2: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    # The norm rounds where kernels/norm.py's reference does (x * rstd to x's dtype, times
    # the weight, to the output dtype); RoPE then reads that rounded value, as `rope` would.
    HALF: tl.constexpr = ROT_DIM // 2
    norm_ty = x_ptr.dtype.element_ty
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                 # [BH]
    head_ok = heads < n_heads
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_R2)
    j_ok = j < HALF
    row = cache_ptr + pos * cache_stride
    cos = tl.load(row + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]      # [1, R2]
    sin = tl.load(row + HALF + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    x_head = x_ptr + t * x_stride_t + heads[:, None].to(tl.int64) * x_stride_h  # [BH, 1]
    o_head = out_ptr + (t * n_heads + heads[:, None]) * HEAD_DIM
    # The rotated dims as two [BH, R2] halves: (i, i + r/2) pairs, or even / odd positions.
    if INTERLEAVED:
        i1, i2 = 2 * j, 2 * j + 1
    else:
        i1, i2 = j, HALF + j
    mask = head_ok[:, None] & j_ok[None, :]
    x1 = tl.load(x_head + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_head + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    ss = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)                               # [BH]
    if BLOCK_REST > 0:
        c = ROT_DIM + tl.arange(0, BLOCK_REST)
        rmask = head_ok[:, None] & (c[None, :] < HEAD_DIM)
        xr = tl.load(x_head + c[None, :], mask=rmask, other=0.0).to(tl.float32)
        ss += tl.sum(xr * xr, 1)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(ss / HEAD_DIM + eps))[:, None]
    w1 = tl.load(w_ptr + i1, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + i2, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    out_ty = out_ptr.dtype.element_ty
    y1 = ((x1 * rstd).to(norm_ty).to(tl.float32) * w1).to(out_ty).to(tl.float32)
    y2 = ((x2 * rstd).to(norm_ty).to(tl.float32) * w2).to(out_ty).to(tl.float32)
    o1 = y1 * cos - y2 * sin
    o2 = y2 * cos + y1 * sin
    tl.store(o_head + i1[None, :], o1.to(out_ty), mask=mask)
    tl.store(o_head + i2[None, :], o2.to(out_ty), mask=mask)
    if BLOCK_REST > 0:  # partial rotary: the normalised dims past ROT_DIM are not rotated
        wr = tl.load(w_ptr + c, mask=c < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
        yr = (xr * rstd).to(norm_ty).to(tl.float32) * wr
        tl.store(o_head + c[None, :], yr.to(out_ty), mask=rmask)


@register("rms_norm_rope", "triton", priority=PRIO, requires=REQ)
def rms_norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                         positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                         interleaved: bool) -> torch.Tensor:
    x, cos_sin_cache, grid, geo = _launch(x, cos_sin_cache, "rms_norm_rope")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    if out.numel() == 0:
        return out
    _rms_norm_rope_kernel[grid](
        x, weight.contiguous(), positions, cos_sin_cache, out,
        x.shape[1], x.stride(0), x.stride(1), cos_sin_cache.stride(0), eps,
        INTERLEAVED=bool(interleaved), **geo,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out
