"""Triton RMSNorm and LayerNorm: `rms_norm`, `fused_add_rms_norm`, `layer_norm`,
`fused_add_layer_norm` (and `all_reduce_add_layer_norm`), one pass over each row.

What it is: the "triton" backend of `tscompile::rms_norm(x, weight, eps)` and
`tscompile::fused_add_rms_norm(x, residual, weight, eps) -> (normed, x + residual)`, for
fp32 / bf16 / fp16 inputs of any row length, rows of any stride (last dim contiguous).
It follows the reference (`kernels/norm.py`) in Hugging Face's order, rounding where it
rounds:
    s    = (x + residual) rounded to x's dtype                      (fused variant only)
    rstd = 1 / sqrt(mean(s_f32^2) + eps)                            (fp32, IEEE sqrt and div)
    y    = (s_f32 * rstd rounded to x's dtype) * weight, rounded once to the promoted dtype
so in fp32 it differs from the reference only by the order of the sum of squares (~1 ulp of
rstd), and in bf16 only where that ulp moves a rounding boundary.
LayerNorm (`kernels/norm.py`: torch.nn.LayerNorm's math) keeps the row in registers and
takes the centred variance in a second sweep over them (mean, then mean((x - mean)^2): no
E[x^2] - E[x]^2 cancellation); weight and bias are applied in fp32 and y is rounded once,
as torch's kernels do. Long rows take three passes (mean, variance, normalise).
`all_reduce_add_layer_norm`'s triton backend is the reference all-reduce (NCCL) followed by
this add + LayerNorm kernel: the fusion saves the separate add and norm launches, not the
all-reduce's own pass.
What it is not: a one-kernel all-reduce + norm (the RMSNorm fusion in
`kernels/collectives.py` has no GPU backend yet either), or a backward.

Napkin math (H = hidden, T rows, e bytes per element): rms_norm reads x and writes y:
2 T H e bytes (+ H e_w for the weight, read once per program but from L2 after the first);
fused_add reads x and residual, writes y and s: 4 T H e. ~4 FLOPs per element, so under
0.5 FLOP/byte: purely bandwidth bound (H100: 3.35 TB/s datasheet, ~3 TB/s reachable by a
copy). T = 4096, H = 7168, bf16: 117 MB -> ~39 us floor for rms_norm, ~78 us for fused_add.
At T <= 64 the data is < 2 MB and launch latency is the floor (a few us in a CUDA graph).
Measured: the rms_norm_* / fused_add_rms_norm_* rows (with the run's copy roof) of
benchmarks/results/kernels/h100_all_ebb1674.json (H100) and h200_all_run2.json (H200);
the torch reference's times are in NOTES_from_docstrings.md.

Launch / tiling: a program owns BLOCK_R whole rows as one [BLOCK_R, BLOCK_C] register tile
(BLOCK_C = next power of two >= H), so each element is loaded once, the row reduction stays
in registers, and the loads are 16-byte vectors along the contiguous dim. Short rows
(QK-norm over head_dim 128, MLA latents of 512) pack several rows per program so a program
moves >= ~4K elements. Rows longer than MAX_TILE elements take a two-pass loop over
BLOCK_C chunks (the second pass re-reads the row, mostly from L2). num_warps scales with the
tile: about two 16-byte vectors per thread (1 or 4 were no faster on an H100:
benchmarks/results/kernels/NOTES_from_docstrings.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tscompile.kernels.collectives import all_reduce_reference
from tscompile.kernels.norm import check_layer_norm_params
from tscompile.kernels.registry import Query, register
from tscompile.kernels.triton import INTERPRET, requirements

PRIO = 10 if not INTERPRET else -10
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
MAX_TILE = 16384   # elements per row held in registers at once; longer rows loop
TILE_ELEMS = 4096  # elements a program should own when rows are short
VECS_PER_THREAD = 2  # 16-byte vectors per thread per tensor; sets num_warps (max 16)


def _shape_check(q: Query) -> str | None:
    hidden = q.get("hidden")
    if hidden is not None and hidden < 1:
        return f"hidden size {hidden} < 1"
    return None


REQ = requirements(DTYPES, _shape_check)


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr,        # x/r [N, H] (row strides below), w [H], y/s [N, H]
    n_rows, n_cols, x_stride, r_stride, eps,
    HAS_RESIDUAL: tl.constexpr,               # fused_add: s = x + r is stored and normalised
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,                 # 1: the whole row in one tile; >1: loop
):
    # The dtype the normalised value is rounded to before the weight multiply (HF order).
    if HAS_RESIDUAL:
        norm_ty = s_ptr.dtype.element_ty
    else:
        norm_ty = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)   # [R]
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_C)                                               # [C]
    x_row = x_ptr + rows[:, None] * x_stride
    r_row = r_ptr + rows[:, None] * r_stride
    out_off = rows[:, None] * n_cols                                           # y, s contiguous

    if NUM_CHUNKS == 1:
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(norm_ty)
            tl.store(s_ptr + out_off + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)
        ss = tl.sum(x * x, axis=1)                                             # [R]
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(ss / n_cols + eps))
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        xn = (x * rstd[:, None]).to(norm_ty).to(tl.float32)
        y = xn * w[None, :]
        tl.store(y_ptr + out_off + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: sum of squares (and s = x + r, stored as we go).
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for i in range(NUM_CHUNKS):
            c = i * BLOCK_C + cols
            mask = row_ok[:, None] & (c[None, :] < n_cols)
            x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                s = (x + r).to(norm_ty)
                tl.store(s_ptr + out_off + c[None, :], s, mask=mask)
                x = s.to(tl.float32)
            acc += x * x
        ss = tl.sum(acc, axis=1)
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(ss / n_cols + eps))
        tl.debug_barrier()  # s stored in pass 1 is visible to every thread of the program
        # Pass 2: re-read (from s when fused: the rounded sum is what gets normalised).
        for i in range(NUM_CHUNKS):
            c = i * BLOCK_C + cols
            mask = row_ok[:, None] & (c[None, :] < n_cols)
            if HAS_RESIDUAL:
                x = tl.load(s_ptr + out_off + c[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
            xn = (x * rstd[:, None]).to(norm_ty).to(tl.float32)
            tl.store(y_ptr + out_off + c[None, :], (xn * w[None, :]).to(y_ptr.dtype.element_ty),
                     mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., H] as a 2-D [N, H] view with unit column stride (a copy only if it must)."""
    if t.dim() == 0:
        raise ValueError("rms_norm: input must have at least one dimension")
    h = t.shape[-1]
    if t.stride(-1) != 1 and h > 1:
        t = t.contiguous()
    try:
        return t.view(-1, h)
    except RuntimeError:  # leading dims not collapsible (e.g. a permuted view)
        return t.reshape(-1, h)


def _tiling(n: int, h: int, elem: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, NUM_CHUNKS, num_warps) for n rows of h elements of `elem` bytes."""
    block_c = min(triton.next_power_of_2(h), MAX_TILE)
    chunks = triton.cdiv(h, block_c)
    block_r = 1 if chunks > 1 else max(1, min(TILE_ELEMS // block_c, triton.next_power_of_2(n)))
    tile = block_r * block_c
    per_warp = 32 * VECS_PER_THREAD * (16 // elem)  # 8 bf16 / 4 fp32 a vector
    num_warps = max(1, min(16, tile // per_warp))
    num_warps = 1 << (num_warps.bit_length() - 1)          # power of two
    return block_r, block_c, chunks, num_warps


def _launch(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor,
            y: torch.Tensor, s: torch.Tensor | None, eps: float) -> None:
    n, h = x2.shape
    if n == 0 or h == 0:
        return
    block_r, block_c, chunks, num_warps = _tiling(n, h, x2.element_size())
    grid = (triton.cdiv(n, block_r),)
    _rms_norm_kernel[grid](
        x2, r2 if r2 is not None else x2, weight, y, s if s is not None else y,
        n, h, x2.stride(0), r2.stride(0) if r2 is not None else 0, eps,
        HAS_RESIDUAL=r2 is not None, BLOCK_R=block_r, BLOCK_C=block_c, NUM_CHUNKS=chunks,
        num_warps=num_warps,
    )


def _check_weight(x: torch.Tensor, weight: torch.Tensor, op: str) -> torch.Tensor:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must be [{x.shape[-1]}] (x's last dim), got "
                         f"{list(weight.shape)}")
    return weight.contiguous()


@register("rms_norm", "triton", priority=PRIO, requires=REQ)
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    weight = _check_weight(x, weight, "rms_norm")
    x2 = _rows(x)
    # Output dtype as in the reference `weight * y.to(x.dtype)`: type promotion.
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(x2, None, weight, y.view(-1, x.shape[-1]), None, eps)
    return y


@register("fused_add_rms_norm", "triton", priority=PRIO, requires=REQ)
def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm: residual shape {list(residual.shape)} != x shape "
                         f"{list(x.shape)}; broadcasting is not supported by the triton backend")
    weight = _check_weight(x, weight, "fused_add_rms_norm")
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    s = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    h = x.shape[-1]
    _launch(_rows(x), _rows(residual), weight, y.view(-1, h), s.view(-1, h), eps)
    return y, s


# ----------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr,   # x/r [N, H] (row strides below), w/b [H]
    n_rows, n_cols, x_stride, r_stride, eps,
    HAS_RESIDUAL: tl.constexpr,                 # fused_add: s = x + r is stored and normalised
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,                   # 1: the whole row in one tile; >1: loop
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)   # [R]
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_C)                                               # [C]
    x_row = x_ptr + rows[:, None] * x_stride
    r_row = r_ptr + rows[:, None] * r_stride
    out_off = rows[:, None] * n_cols                                           # y, s contiguous

    if NUM_CHUNKS == 1:
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + out_off + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols                                      # [R]
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / n_cols
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + out_off + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: the mean (and s = x + r, stored as we go).
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for i in range(NUM_CHUNKS):
            c = i * BLOCK_C + cols
            mask = row_ok[:, None] & (c[None, :] < n_cols)
            x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                s = (x + r).to(s_ptr.dtype.element_ty)
                tl.store(s_ptr + out_off + c[None, :], s, mask=mask)
                x = s.to(tl.float32)
            acc += x
        mean = tl.sum(acc, axis=1) / n_cols
        tl.debug_barrier()  # s stored in pass 1 is visible to every thread of the program
        # Pass 2: the centred variance (re-reading s when fused: the rounded sum is normalised).
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for i in range(NUM_CHUNKS):
            c = i * BLOCK_C + cols
            mask = row_ok[:, None] & (c[None, :] < n_cols)
            if HAS_RESIDUAL:
                x = tl.load(s_ptr + out_off + c[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += xc * xc
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.sum(acc, axis=1) / n_cols + eps))
        # Pass 3: normalise, scale, shift.
        for i in range(NUM_CHUNKS):
            c = i * BLOCK_C + cols
            mask = row_ok[:, None] & (c[None, :] < n_cols)
            if HAS_RESIDUAL:
                x = tl.load(s_ptr + out_off + c[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                y += tl.load(b_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out_off + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_layer_norm(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor | None, y: torch.Tensor, s: torch.Tensor | None,
                       eps: float) -> None:
    n, h = x2.shape
    if n == 0 or h == 0:
        return
    block_r, block_c, chunks, num_warps = _tiling(n, h, x2.element_size())
    _layer_norm_kernel[(triton.cdiv(n, block_r),)](
        x2, r2 if r2 is not None else x2, weight, bias if bias is not None else weight,
        y, s if s is not None else y,
        n, h, x2.stride(0), r2.stride(0) if r2 is not None else 0, eps,
        HAS_RESIDUAL=r2 is not None, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, NUM_CHUNKS=chunks, num_warps=num_warps,
    )


def _ln_params(op: str, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_layer_norm_params(op, x, weight, bias)
    return weight.contiguous(), None if bias is None else bias.contiguous()


@register("layer_norm", "triton", priority=PRIO, requires=REQ)
def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    weight, bias = _ln_params("layer_norm", x, weight, bias)
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)   # the reference's dtype
    _launch_layer_norm(x2, None, weight, bias, y.view(-1, x.shape[-1]), None, eps)
    return y


@register("fused_add_layer_norm", "triton", priority=PRIO, requires=REQ)
def fused_add_layer_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_layer_norm: residual shape {list(residual.shape)} != x "
                         f"shape {list(x.shape)}; broadcasting is not supported by the triton "
                         f"backend")
    weight, bias = _ln_params("fused_add_layer_norm", x, weight, bias)
    s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    y = torch.empty_like(s)
    h = x.shape[-1]
    _launch_layer_norm(_rows(x), _rows(residual), weight, bias, y.view(-1, h), s.view(-1, h),
                       eps)
    return y, s


@register("all_reduce_add_layer_norm", "triton", priority=PRIO, requires=REQ)
def all_reduce_add_layer_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_add_layer_norm_triton(all_reduce_reference(x), residual, weight, bias, eps)
