"""SwiGLU activation: `tscompile::silu_and_mul(x[..., 2I]) -> silu(x[..., :I]) * x[..., I:]`.

The gate and up projections are one fused matrix whose output is [gate | up]
(the layout vLLM and the MoE expert weights use), so the MLP makes one GEMM and one op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import dispatch, kernel_op, register


@register("silu_and_mul", "reference")
def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@kernel_op("silu_and_mul")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim ([gate | up]), got {x.shape[-1]}")
    return dispatch("silu_and_mul", x).contiguous()


@silu_and_mul.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
