"""RMSNorm and LayerNorm, plain and with a fused residual add.

Ops: `tscompile::rms_norm(x, weight, eps)`,
`tscompile::fused_add_rms_norm(x, residual, weight, eps) -> (normed, x + residual)`,
`tscompile::layer_norm(x, weight, bias, eps)` and
`tscompile::fused_add_layer_norm(x, residual, weight, bias, eps) -> (normed, x + residual)`
(bias may be None: `nn.LayerNorm(bias=False)`).
Math: RMSNorm (Zhang & Sennrich 2019) y = x / sqrt(mean(x^2) + eps) * weight;
LayerNorm (Ba et al. 2016), as `torch.nn.LayerNorm`: y = (x - mean(x)) / sqrt(var(x) + eps)
* weight + bias, var biased (divided by H), eps inside the square root. Statistics in fp32;
RMSNorm rounds to x's dtype before the weight (HF's order), LayerNorm applies weight and bias
in fp32 and rounds once to x's dtype (torch's layer_norm kernels, any dtype).
Napkin math: one read of x (and residual), one write; purely bandwidth bound.
Not here: the all-reduce + add + norm fusions (`kernels/collectives.py`; a compiler pass
builds them on these ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


@register("layer_norm", "reference")
def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), b, eps).to(x.dtype)


@register("fused_add_layer_norm", "reference")
def fused_add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return layer_norm_reference(summed, weight, bias, eps), summed


def check_layer_norm_params(op: str, x: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None) -> None:
    h = x.shape[-1] if x.dim() else None
    if weight.shape != (h,) or (bias is not None and bias.shape != (h,)):
        raise ValueError(f"{op}: weight {list(weight.shape)} and bias "
                         f"{None if bias is None else list(bias.shape)} must be [{h}] "
                         f"(x's last dim)")


@kernel_op("layer_norm")
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """x [..., H], weight [H], bias [H] or None -> [..., H] in x's dtype"""
    check_layer_norm_params("layer_norm", x, weight, bias)
    return dispatch("layer_norm", x, weight, bias, eps).contiguous()


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


@kernel_op("fused_add_layer_norm")
def fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual) normalised, and x + residual (the new residual stream)."""
    check_layer_norm_params("fused_add_layer_norm", x, weight, bias)
    normed, summed = dispatch("fused_add_layer_norm", x, residual, weight, bias, eps)
    return normed.contiguous(), summed.contiguous()


@fused_add_layer_norm.register_fake
def _(x, residual, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)
