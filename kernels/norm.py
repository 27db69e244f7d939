"""RMSNorm, plain and with a fused residual add.

Ops: `tscompile::rms_norm(x, weight, eps)` and
`tscompile::fused_add_rms_norm(x, residual, weight, eps) -> (normed, x + residual)`.
Math (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.
Napkin math: one read of x (and residual), one write; purely bandwidth bound.
Not here: the all-reduce + add + norm fusion (a compiler pass builds it on these ops).
"""
from __future__ import annotations

import torch

from .registry import dispatch, kernel_op, register


@register("rms_norm", "reference")
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)  # HF order: cast back, then scale


@register("fused_add_rms_norm", "reference")
def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


@kernel_op("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H]"""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x has last dim {x.shape[-1]} but weight has {weight.shape[0]}")
    return dispatch("rms_norm", x, weight, eps).contiguous()


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@kernel_op("fused_add_rms_norm")
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual) normalised, and x + residual (the new residual stream)."""
    normed, summed = dispatch("fused_add_rms_norm", x, residual, weight, eps)
    return normed.contiguous(), summed.contiguous()


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)
