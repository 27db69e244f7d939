"""Building blocks shared by the model files: plain single-device modules over kernel ops.

Legend: T tokens in the step (flat batch), H hidden size, Hq query heads, Hkv KV heads,
D head dim, I MLP width, E experts, k experts per token, V vocabulary.

Nothing here knows about ranks or parallelism: each annotated module takes a replicated
input and returns a partial sum (`@placement(inputs=R, outputs=P)`), and the compiler finds
the weight shardings that make that need no communication inside (column/row-parallel
projections, heads, expert width or whole experts). Head counts appear only in weight shapes; forward
code reshapes with -1 on the head axis so per-device shapes need no rewriting of constants.
Each attention module owns a `kv_cache` buffer (non-persistent, empty until the runtime
binds the preallocated paged cache through `kv_cache_shape()`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tscompile.annotations import Partial, Replicate, placement
from tscompile.kernels import (
    AttentionMetadata, gqa_attention, moe_experts, moe_route, rms_norm, rope, rope_cos_sin_cache,
    silu_and_mul,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """Applies RoPE to [T, heads, D] by absolute position (table precomputed up to max_pos)."""

    def __init__(self, rot_dim: int, max_positions: int, base: float,
                 scaling: dict[str, Any] | None, interleaved: bool = False):
        super().__init__()
        self.rot_dim, self.max_positions, self.base = rot_dim, max_positions, base
        self.scaling, self.interleaved = scaling, interleaved
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the table; the runtime calls this after materialising a meta model."""
        device = self.cos_sin_cache.device
        if device.type == "meta":
            table = torch.empty(self.max_positions, self.rot_dim, device="meta")
        else:
            table = rope_cos_sin_cache(self.rot_dim, self.max_positions, self.base,
                                       self.scaling).to(device)
        self.cos_sin_cache = table

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rope(x, positions, self.cos_sin_cache, self.interleaved)


@placement(inputs=Replicate(), outputs=Partial(), group="dense")
class GatedMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate x) * up x), gate and up fused as [gate ; up]."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * width, bias=False)  # [2I, H]
        self.down_proj = nn.Linear(width, hidden, bias=False)         # [H, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


@placement(inputs=Replicate(), outputs=Partial(), group="attn")
class GQAAttention(nn.Module):
    """Grouped-query attention with RoPE and the options the families use: q/k/v biases
    (`bias`), an output bias (`o_bias`), a per-head QK RMSNorm (Qwen3: `qk_norm_eps`), a
    sliding window of `window` keys (0: full), and learned per-head attention sinks
    (GPT-OSS: `sinks`, a [Hq] parameter named `sinks`)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: Rotary, *, bias: bool = False, o_bias: bool = False,
                 qk_norm_eps: float | None = None, window: int = 0, sinks: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None    # [Hq]
        self.window = window
        self.rotary = rotary
        self.scale = head_dim ** -0.5
        self.register_buffer("kv_cache", torch.empty(0), persistent=False)

    def kv_cache_shape(self, num_blocks: int, page_size: int) -> tuple[int, ...]:
        return (2, num_blocks, page_size, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, -1, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(t, -1, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        variants = (self.window, self.sinks) if self.window or self.sinks is not None else ()
        o = gqa_attention(q, k, v, self.kv_cache, meta.slot_mapping, meta.block_tables,
                          meta.query_start_loc, meta.seq_lens, meta.num_decodes, self.scale,
                          *variants)
        return self.o_proj(o.view(t, -1))


@placement(inputs=Replicate(), outputs=Partial(), group="moe", experts=("w13", "w2"))
class MoE(nn.Module):
    """Routed experts (+ optional shared experts). Routing options: `kernels/moe.py`."""

    def __init__(self, hidden: int, width: int, num_experts: int, top_k: int, *,
                 scoring: str = "softmax", renormalize: bool = True, num_groups: int = 1,
                 topk_groups: int = 1, routed_scaling_factor: float = 1.0,
                 correction_bias: bool = False, shared_width: int = 0):
        super().__init__()
        self.top_k, self.scoring, self.renormalize = top_k, scoring, renormalize
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.gate = nn.Linear(hidden, num_experts, bias=False)      # router [E, H]
        if correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))  # [E, 2I, H]
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, width))       # [E, H, I]
        self.shared_experts = GatedMLP(hidden, shared_width) if shared_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(x.float(), self.gate.weight.float())  # [T, E] fp32 router
        weights, ids = moe_route(logits, self.e_score_correction_bias, self.top_k, self.scoring,
                                 self.renormalize, self.num_groups, self.topk_groups,
                                 self.routed_scaling_factor)
        out = moe_experts(x, self.w13, self.w2, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def hf_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from an HF config dict, old style (`rope_theta`, `rope_scaling`) or
    transformers 5 style (`rope_parameters`)."""
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or None
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type")
    if scaling is None and kind not in (None, "default"):
        scaling = params
    return theta, (dict(scaling) if scaling else None)


class CausalLM(nn.Module):
    """The decoder-only shell every model file shares: embed -> layers -> final norm ->
    LM head, logits only for `meta.logits_indices`. A subclass builds its layers (each
    `layer(x, positions, meta) -> x`) and passes them in."""

    def __init__(self, config: Any, layers: list[nn.Module]):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)            # [V, H]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)       # [V, H]
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (re-run after materialising a meta model:
        moving off the meta device gives every module its own tensor)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                      # [T, H]
        for layer in self.layers:
            x = layer(x, positions, meta)
        x = self.norm(x[meta.logits_indices])                 # [S, H]; norm is per token
        return self.lm_head(x)                                # [S, V]
