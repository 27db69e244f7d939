"""Triton `write_slots2` (kernels/paged.py): this step's K and V (GQA) or latent and rope
columns (MLA) scattered into their cache slots in one launch.

What it is: grid (T, cdiv(max(Na, Nb), BLOCK)); program (t, c) copies elements
[c*BLOCK, (c+1)*BLOCK) of token t's two rows to slot slot_mapping[t] of the two
destinations (each [NB, PS, ...] with a per-slot row of Na / Nb elements, contiguous or a
column slice of a wider row). An FP8 destination stores the values saturated to its finite
range, as the reference does (scale 1). What it is not: a write fused into RoPE or the
projection epilogue.
Napkin math: T (Na + Nb) e bytes read and written: at decode, a few KB, so its cost is the
launch; it replaces two index_copy launches (and MLA's concatenation) per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tscompile.kernels.registry import register
from tscompile.kernels.triton import INTERPRET, requirements

PRIO = 10 if not INTERPRET else -10
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn})
BLOCK = 1024


@triton.jit
def _write_slots2_kernel(a_ptr, b_ptr, da_ptr, db_ptr, slots_ptr,
                         a_stride, b_stride, da_stride, db_stride, n_a, n_b, top,
                         SATURATE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    ma, mb = c < n_a, c < n_b
    va = tl.load(a_ptr + t * a_stride + c, mask=ma)
    vb = tl.load(b_ptr + t * b_stride + c, mask=mb)
    if SATURATE:
        va = tl.minimum(tl.maximum(va.to(tl.float32), -top), top)
        vb = tl.minimum(tl.maximum(vb.to(tl.float32), -top), top)
    tl.store(da_ptr + slot * da_stride + c, va.to(da_ptr.dtype.element_ty), mask=ma)
    tl.store(db_ptr + slot * db_stride + c, vb.to(db_ptr.dtype.element_ty), mask=mb)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [T, ...] -> (x, row stride) when each token's elements are one contiguous run."""
    inner = x[0] if x.shape[0] else x
    if not inner.is_contiguous():
        x = x.contiguous()
    return x, x.stride(0)


def _slot_rows(dst: torch.Tensor, n: int, what: str) -> int:
    """The element stride between slots of dst [NB, PS, ...] whose per-slot row is n
    contiguous elements."""
    row = dst[0, 0]
    if row.numel() != n or not row.is_contiguous() or dst.stride(0) != dst.shape[1] * dst.stride(1):
        raise ValueError(f"write_slots2 (triton): {what} [{', '.join(map(str, dst.shape))}] "
                         f"strides {dst.stride()} is not [NB, PS] slots of {n} contiguous "
                         f"elements")
    return dst.stride(1)


@register("write_slots2", "triton", priority=PRIO, requires=requirements(DTYPES))
def write_slots2_triton(dst_a: torch.Tensor, dst_b: torch.Tensor, slot_mapping: torch.Tensor,
                        a: torch.Tensor, b: torch.Tensor) -> None:
    t = slot_mapping.shape[0]
    if a.shape[0] != t or b.shape[0] != t:
        raise ValueError(f"write_slots2: {t} slots for {a.shape[0]} / {b.shape[0]} rows")
    if t == 0:
        return
    n_a, n_b = a[0].numel(), b[0].numel()
    a, a_stride = _rows(a)
    b, b_stride = _rows(b)
    da_stride, db_stride = _slot_rows(dst_a, n_a, "dst_a"), _slot_rows(dst_b, n_b, "dst_b")
    if dst_a.dtype != dst_b.dtype:
        raise ValueError(f"write_slots2: destinations differ in dtype ({dst_a.dtype}, "
                         f"{dst_b.dtype})")
    fp8 = dst_a.dtype == torch.float8_e4m3fn
    top = torch.finfo(dst_a.dtype).max if fp8 else 0.0
    grid = (t, triton.cdiv(max(n_a, n_b), BLOCK))
    _write_slots2_kernel[grid](a, b, dst_a, dst_b, slot_mapping, a_stride, b_stride,
                               da_stride, db_stride, n_a, n_b, float(top),
                               SATURATE=fp8, BLOCK=BLOCK, num_warps=4)
