"""Triton SwiGLU: `tscompile::silu_and_mul(x [..., 2I]) -> silu(x[..., :I]) * x[..., I:]`.

What it is: the "triton" backend of `silu_and_mul` (`kernels/activation.py`) for fp32 / bf16 /
fp16 rows of any stride (last dim contiguous). It rounds where the reference
`F.silu(gate) * up` rounds: silu(g) = g / (1 + exp(-g)) in fp32, rounded to x's dtype, then
times up in fp32 and rounded once more; exp is libdevice's on the GPU (the interpreter uses
tl.exp) and the division is IEEE (div_rn), so that the bf16 results can match the
reference bit for bit (seen on an H100: benchmarks/results/kernels/NOTES_from_docstrings.md).
What it is not: the MoE grouped variant (`kernels/moe.py` applies its own activation) or a
fusion into the gate/up GEMM epilogue.

Napkin math (T rows, e bytes per element): reads 2 T I e, writes T I e: 3 T I e bytes,
~8 FLOPs per output element (exp, add, div, two muls): bandwidth bound. T = 4096,
I = 14336, bf16: 352 MB -> ~117 us at ~3 TB/s; T = 1: 86 KB, launch bound (~2 us).
Measured: the silu_and_mul_* rows of benchmarks/results/kernels/h100_all_ebb1674.json (H100)
and h200_all_run2.json (H200).

Launch / tiling: grid (rows, cdiv(I, BLOCK)); each program reads BLOCK contiguous gate
elements and the BLOCK up elements I further on and writes BLOCK outputs, one 16-byte
vector per thread per tensor (BLOCK = 512 bf16 with 2 warps). Larger blocks were slower
where a row's last block is mostly empty (I = 4608 at BLOCK = 2048: three quarters) and at
small T (fewer programs in flight); the H100 sweep is in NOTES_from_docstrings.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tscompile.kernels.registry import Query, register
from tscompile.kernels.triton import INTERPRET, requirements

if not INTERPRET:
    from triton.language.extra import libdevice
else:  # the interpreter has no libdevice; the kernel's PRECISE branch is then never taken
    libdevice = None

PRIO = 10 if not INTERPRET else -10
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
NUM_WARPS = 2        # per program
VECS_PER_THREAD = 1  # 16-byte vectors per thread per tensor: BLOCK = 512 bf16 at 2 warps


def _shape_check(q: Query) -> str | None:
    width = q.get("width")  # the last dim, 2I
    if width is not None and width % 2:
        return f"last dim {width} is odd ([gate | up] needs an even dim)"
    return None


REQ = requirements(DTYPES, _shape_check)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr,                 # x [N, 2I] (row stride x_stride), out [N, I] contiguous
    inter, x_stride,
    BLOCK: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate_ptr = x_ptr + row * x_stride + cols
    g = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptr + inter, mask=mask, other=0.0).to(tl.float32)
    if PRECISE:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    act = tl.math.div_rn(g, 1.0 + e).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


@register("silu_and_mul", "triton", priority=PRIO, requires=REQ)
def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"silu_and_mul needs an even last dim ([gate | up]), got {two_i}")
    inter = two_i // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        x2 = x.view(-1, two_i)
    except RuntimeError:  # leading dims not collapsible
        x2 = x.reshape(-1, two_i)
    per_warp = 32 * VECS_PER_THREAD * (16 // x.element_size())   # elements per warp
    block = min(triton.next_power_of_2(inter), per_warp * NUM_WARPS)
    num_warps = max(1, min(NUM_WARPS, block // per_warp))
    grid = (x2.shape[0], triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x2, out, inter, x2.stride(0), BLOCK=block,
                               PRECISE=not INTERPRET, num_warps=num_warps)
    return out
