"""Rotary position embedding: the cos/sin table and the op that applies it.

`rope_cos_sin_cache(rot_dim, max_positions, base, scaling)` builds the table
`[P, rot_dim]` = [cos(f_0..f_{r/2-1}) | sin(...)] for positions 0..P-1, already multiplied by
the YaRN attention factor (mscale) where the scaling asks for one. Scaling types:
`default`, `linear`, `llama3` (Llama 3.1 frequency bands) and `yarn` (with DeepSeek's
`mscale` / `mscale_all_dim`), following the formulas of the papers as Hugging Face
implements them, so the logits match.

`tscompile::rope(x [T, H, D], positions [T], cos_sin_cache [P, r], interleaved) -> [T, H, D]`
rotates the first r dims of each head (r <= D, partial rotary) and copies the rest.
`interleaved=False` is the GPT-NeoX / Llama "rotate half" pairing (i, i + r/2);
`interleaved=True` is the GPT-J / DeepSeek pairing (2i, 2i + 1).

`tscompile::rms_norm_rope(x, weight, eps, positions, cos_sin_cache, interleaved)` is
`rope(rms_norm(x, weight, eps), ...)` in one op (per-head QK-norm then RoPE), which the
compiler's `fuse_kernels` pass makes of that pair: one launch instead of two, and x may be
a strided view (a slice of a packed QKV projection) without a copy.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .registry import dispatch, kernel_op, register


def _yarn_inv_freq(rot_dim: int, base: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies by `factor`, keep high ones,
    ramp linearly between the dims that rotate beta_fast and beta_slow times over the
    original context; scale attention by mscale = 0.1 ln(factor) + 1."""
    factor = float(s["factor"])
    orig = float(s["original_max_position_embeddings"])
    beta_fast = float(s.get("beta_fast") or 32)
    beta_slow = float(s.get("beta_slow") or 1)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return rot_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: divide long wavelengths by `factor`, keep short ones, blend in between."""
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin_cache(rot_dim: int, max_positions: int, base: float,
                       scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """[max_positions, rot_dim] fp32 table: [cos | sin] times the attention factor."""
    if rot_dim % 2:
        raise ValueError(f"rotary dim must be even, got {rot_dim}")
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    attn = 1.0
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq, attn = _yarn_inv_freq(rot_dim, base, scaling)
    else:
        raise ValueError(f"unsupported rope scaling type {kind!r}; "
                         "supported: default, linear, llama3, yarn")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos() * attn, freqs.sin() * attn], dim=-1)


@register("rope", "reference")
def rope_reference(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                   interleaved: bool) -> torch.Tensor:
    r = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, r/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]                          # broadcast over heads
    rot, rest = x[..., :r].float(), x[..., r:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


@kernel_op("rope")
def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
         interleaved: bool) -> torch.Tensor:
    if x.dim() != 3 or positions.shape[0] != x.shape[0]:
        raise ValueError(f"rope expects x [T, H, D] and positions [T], got {list(x.shape)} and "
                         f"{list(positions.shape)}")
    if cos_sin_cache.shape[-1] > x.shape[-1]:
        raise ValueError(f"rope: rotary dim {cos_sin_cache.shape[-1]} exceeds head dim "
                         f"{x.shape[-1]}")
    return dispatch("rope", x, positions, cos_sin_cache, interleaved).contiguous()


@rope.register_fake
def _(x, positions, cos_sin_cache, interleaved):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------
# rms_norm_rope: QK-norm and RoPE of one tensor in one op (what `passes/fuse_kernels.py`
# makes of `rope(rms_norm(x, w, eps), positions, table, interleaved)`: Qwen3, GLM's QK-norm).
# ----------------------------------------------------------------------------------------
@register("rms_norm_rope", "reference")
def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                            positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                            interleaved: bool) -> torch.Tensor:
    from .norm import rms_norm_reference
    return rope_reference(rms_norm_reference(x, weight, eps), positions, cos_sin_cache,
                          interleaved)


@kernel_op("rms_norm_rope")
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, H, D] (rows of any stride, last dim contiguous), weight [D] -> [T, H, D]:
    RMSNorm over each head's D dims, then RoPE by position; exactly `rope(rms_norm(x))`."""
    if x.dim() != 3 or positions.shape[0] != x.shape[0]:
        raise ValueError(f"rms_norm_rope expects x [T, H, D] and positions [T], got "
                         f"{list(x.shape)} and {list(positions.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm_rope: weight must be [{x.shape[-1]}] (x's last dim), got "
                         f"{list(weight.shape)}")
    if cos_sin_cache.shape[-1] > x.shape[-1]:
        raise ValueError(f"rms_norm_rope: rotary dim {cos_sin_cache.shape[-1]} exceeds head "
                         f"dim {x.shape[-1]}")
    return dispatch("rms_norm_rope", x, weight, eps, positions, cos_sin_cache,
                    interleaved).contiguous()


@rms_norm_rope.register_fake
def _(x, weight, eps, positions, cos_sin_cache, interleaved):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
