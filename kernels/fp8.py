"""Block-scaled FP8 weights (DeepSeek-V3 / Qwen3-FP8 checkpoints): quantize, dequantize, and
the linear that reads them.

Format (Hugging Face `quantization_config: {quant_method: "fp8", weight_block_size: [bn, bk]}`):
a Linear's `weight` [N, K] is float8_e4m3fn and `weight_scale_inv` [ceil(N/bn), ceil(K/bk)]
float32 multiplies each bn x bk block back: W[i, j] = q[i, j] * s[i // bn, j // bk]. The last
block of a dim may be short (ceil). e4m3's largest finite value is 448, so the quantizer maps
each block's amax to 448 (scale_inv = amax / 448).

Op: `tscompile::fp8_block_linear(x, weight, weight_scale_inv, bias, block) -> x @ W^T + bias`
with x [..., K] -> [..., N] in x's dtype.
Backends: `reference` (dequantize W to x's dtype, then `F.linear`): the oracle and the CPU
path; `triton` (kernels/triton/fp8.py, 128 x 128 blocks): W8A8 with per-token 1 x 128
activation quantization when M > 16, a weight-only GEMV at decode.
Napkin math: a decode GEMV reads N*K bytes of weight plus N*K/(bn*bk)*4 bytes of scales
(0.02% at 128x128), half of bf16's 2*N*K.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .registry import dispatch, kernel_op, register

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0          # torch.finfo(torch.float8_e4m3fn).max
DEFAULT_BLOCK = (128, 128)


def _expand(scale_inv: torch.Tensor, shape: tuple[int, int], block: Sequence[int]
            ) -> torch.Tensor:
    """[ceil(N/bn), ceil(K/bk)] block scales -> [N, K], each repeated over its block."""
    bn, bk = block
    n, k = shape
    return scale_inv.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def _check(weight: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int]) -> None:
    if weight.ndim != 2 or len(block) != 2:
        raise ValueError(f"fp8 block weight must be 2-D with a 2-D block, got weight "
                         f"{list(weight.shape)} and block {list(block)}")
    want = tuple(-(-s // b) for s, b in zip(weight.shape, block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {list(scale_inv.shape)} but weight "
                         f"{list(weight.shape)} in blocks of {list(block)} needs {list(want)}")


def quantize_fp8_block(w: torch.Tensor, block: Sequence[int] = (128, 128)
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] float8_e4m3fn, scale_inv [ceil(N/bn), ceil(K/bk)] float32),
    each block's amax mapped to 448 (an all-zero block gets scale 1)."""
    bn, bk = block
    n, k = w.shape
    rows, cols = -(-n // bn), -(-k // bk)
    padded = w.new_zeros((rows * bn, cols * bk), dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(rows, bn, cols, bk)                      # (rows, bn, cols, bk)
    amax = blocks.abs().amax(dim=(1, 3))                           # (rows, cols)
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return q.view(rows * bn, cols * bk)[:n, :k].to(FP8).contiguous(), scale_inv.contiguous()


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor,
                         block: Sequence[int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight an FP8 block checkpoint stands for: q * scale, in fp32, then `dtype`."""
    _check(q, scale_inv, block)
    return (q.float() * _expand(scale_inv.float(), tuple(q.shape), block)).to(dtype)


@register("fp8_block_linear", "reference")
def fp8_block_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                               weight_scale_inv: torch.Tensor, bias: torch.Tensor | None,
                               block: Sequence[int]) -> torch.Tensor:
    w = dequantize_fp8_block(weight, weight_scale_inv, block, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@kernel_op("fp8_block_linear")
def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     bias: torch.Tensor | None = None, block: list[int] | None = None
                     ) -> torch.Tensor:
    """x [..., K], weight [N, K] fp8, weight_scale_inv [ceil(N/bn), ceil(K/bk)] fp32,
    bias [N] or None, block [bn, bk] (None: [128, 128]) -> [..., N] in x's dtype."""
    block = DEFAULT_BLOCK if block is None else block
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_block_linear: x has last dim {x.shape[-1]} but weight is "
                         f"{list(weight.shape)}")
    return dispatch("fp8_block_linear", x, weight, weight_scale_inv, bias, block).contiguous()


@fp8_block_linear.register_fake
def _(x, weight, weight_scale_inv, bias=None, block=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
