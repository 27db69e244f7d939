"""Kimi K2 / K2.5 and Moonlight: the DeepSeek-V3 architecture (DeepSeek-AI 2024; Kimi Team
2025) as Moonshot configures it, and DeepSeek-V2 / V2-Lite (DeepSeek-AI 2024), its
predecessor. Pre-norm decoder; multi-head latent attention (MLA) with decoupled RoPE; the
first `first_k_dense_replace` layers use a dense SwiGLU MLP, the rest a mixture of experts
with shared experts. Routing (`scoring_func`):
    "sigmoid" (V3, Kimi, Moonlight; topk_method "noaux_tc"): s = sigmoid(logits), chosen by
        s + e_score_correction_bias (auxiliary-loss-free balancing) within the best
        `topk_group` of `n_group` expert groups; weights s, renormalised if norm_topk_prob,
        times routed_scaling_factor.
    "softmax" (V2, V2-Lite; topk_method "greedy"): p = softmax(logits), the top k of p over
        all experts, no bias, no groups; weights p, renormalised only if norm_topk_prob (as
        DeepSeek's own modeling code does; transformers' DeepseekV2 ignores the flag; V2 and
        V2-Lite set it false), times routed_scaling_factor (V2-Lite: 1.0).

Dimension legend: T tokens in the step (flat batch of all sequences), H hidden_size,
Nh attention heads, Lq q_lora_rank, L kv_lora_rank, dn qk_nope_head_dim, dr qk_rope_head_dim,
dv v_head_dim, I intermediate_size (dense MLP), Ie moe_intermediate_size (one expert),
E routed experts, k experts per token, V vocab_size, S positions whose logits are returned.

MLA per token (paper eqs. 1-11; kernels: `kernels/mla.py`):
    q = W_UQ RMSNorm(W_DQ x)         (or q = W_Q x without a query LoRA: Moonlight)
    [q_nope ; q_pe] per head,  q_pe = RoPE(q_pe)
    [c ; k_pe] = W_DKV x,  c = RMSNorm(c),  k_pe = RoPE(k_pe)   (one k_pe for all heads)
    cache [c ; k_pe];  k_nope_h = W_UK_h c,  v_h = W_UV_h c   (W_UK, W_UV = kv_b_proj)
Single-device code: the compiler decides the parallel layout from annotations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tscompile.annotations import Partial, Replicate, placement
from tscompile.kernels import AttentionMetadata, mla_attention
from tscompile.models.checkpoint import Rule, fused_gate_up, stacked_experts
from tscompile.models.layers import CausalLM, GatedMLP, MoE, RMSNorm, Rotary, hf_rope


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True, slots=True)
class KimiK25Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int          # dense MLP of the first layers
    moe_intermediate_size: int      # one routed (or shared) expert
    num_layers: int
    num_heads: int
    q_lora_rank: int | None         # None: a plain q_proj (Moonlight)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    # "sigmoid": DeepSeek-V3 routing (correction bias, group limit); "softmax": DeepSeek-V2
    # greedy top-k (no bias; n_group must be 1). See the module docstring.
    scoring_func: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    rms_norm_eps: float = 1e-6
    # HF (and DeepSeek's reference code) build q_a_layernorm / kv_a_layernorm without an
    # eps, so they use 1e-6 whatever rms_norm_eps says; vLLM uses rms_norm_eps. We match HF.
    latent_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True    # GPT-J pairs (2i, 2i+1), as DeepSeek's checkpoints expect
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_layers", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                  "n_group", "topk_group", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise ValueError(f"KimiK25Config.{f} must be positive, got {getattr(self, f)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"KimiK25Config.q_lora_rank must be positive or None, "
                             f"got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"KimiK25Config.qk_rope_head_dim must be even (RoPE rotates "
                             f"pairs), got {self.qk_rope_head_dim}")
        if self.n_shared_experts < 0:
            raise ValueError(f"KimiK25Config.n_shared_experts must be >= 0, "
                             f"got {self.n_shared_experts}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"KimiK25Config.scoring_func must be 'sigmoid' (DeepSeek-V3) or "
                             f"'softmax' (DeepSeek-V2), got {self.scoring_func!r}")
        if self.scoring_func == "softmax" and self.n_group != 1:
            raise ValueError(f"KimiK25Config.n_group={self.n_group} with scoring_func='softmax':"
                             " softmax routing is DeepSeek-V2's greedy top-k over all experts "
                             "(n_group=1); its group-limited variant (group score = the "
                             "group's best expert) is not implemented")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"KimiK25Config.n_routed_experts={self.n_routed_experts} does not "
                             f"split into n_group={self.n_group} equal groups")
        if self.topk_group > self.n_group:
            raise ValueError(f"KimiK25Config.topk_group={self.topk_group} exceeds "
                             f"n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(f"KimiK25Config.num_experts_per_tok={self.num_experts_per_tok} "
                             f"exceeds the {self.topk_group} kept groups x {per_group} experts")
        if self.first_k_dense_replace < 0:  # >= num_layers: all dense, as in HF
            raise ValueError(f"KimiK25Config.first_k_dense_replace must be >= 0, "
                             f"got {self.first_k_dense_replace}")
        kind = (self.rope_scaling or {}).get("rope_type") or (self.rope_scaling or {}).get("type")
        if kind == "yarn" and "factor" not in self.rope_scaling:
            raise ValueError("KimiK25Config.rope_scaling: yarn needs a 'factor'")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN: DeepSeek
        stretches the softmax temperature along with the context (HF `yarn_apply_mscale`:
        any non-default rope type with a nonzero mscale_all_dim)."""
        scale = self.qk_head_dim ** -0.5
        s = self.rope_scaling or {}
        if (s.get("rope_type") or s.get("type") or "default") != "default":
            if s.get("mscale_all_dim"):
                scale *= yarn_mscale(float(s["factor"]), float(s["mscale_all_dim"])) ** 2
        return scale

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> KimiK25Config:
        # Kimi K2.5 is multimodal: its config.json nests the language model.
        d = d if "hidden_size" in d else d.get("text_config", d)
        # A key missing from config.json means what transformers' DeepseekV2Config or
        # DeepseekV3Config says (V2 has no scoring_func key: it always routes by softmax).
        v2 = d.get("model_type") == "deepseek_v2"
        d = {**(_HF_V2_DEFAULTS if v2 else _HF_DEFAULTS), **d}
        if d.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"config.json moe_layer_freq={d['moe_layer_freq']} is not "
                             "supported (only 1: every layer after the dense ones is MoE)")
        scoring, n_group, topk_group = _hf_routing(d)
        if d.get("num_experts_per_tok") is None:
            raise ValueError("config.json has no num_experts_per_tok")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={d['hidden_act']!r}: only silu is "
                             "supported")
        theta, scaling = hf_rope(d)
        experts = d.get("n_routed_experts") or d.get("num_local_experts")
        if experts is None:
            raise ValueError("config.json has neither n_routed_experts nor num_local_experts")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            moe_intermediate_size=d["moe_intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            q_lora_rank=d["q_lora_rank"], kv_lora_rank=d["kv_lora_rank"],
            qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"], n_routed_experts=experts,
            num_experts_per_tok=d["num_experts_per_tok"],
            n_shared_experts=d["n_shared_experts"] or 0, scoring_func=scoring,
            n_group=n_group, topk_group=topk_group,
            routed_scaling_factor=float(d["routed_scaling_factor"]),
            norm_topk_prob=bool(d["norm_topk_prob"]),
            first_k_dense_replace=d["first_k_dense_replace"] or 0,
            rms_norm_eps=d["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
            rope_interleave=bool(d["rope_interleave"]),
            max_position_embeddings=d["max_position_embeddings"],
            attention_bias=bool(d["attention_bias"]),
            tie_word_embeddings=bool(d["tie_word_embeddings"]),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))


# transformers' DeepseekV3Config defaults for the keys a config.json may leave out.
_HF_DEFAULTS: dict[str, Any] = {
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "moe_intermediate_size": 2048, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
    "rope_interleave": True, "max_position_embeddings": 4096, "attention_bias": False,
    "tie_word_embeddings": False,
}
# transformers' DeepseekV2Config defaults (model_type deepseek_v2). V2 always pairs RoPE dims
# GPT-J style (HF: complex multiplication of (2i, 2i+1)); it has no rope_interleave key.
_HF_V2_DEFAULTS: dict[str, Any] = {
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "moe_intermediate_size": 1407, "n_shared_experts": 2, "n_group": None,
    "topk_group": None, "first_k_dense_replace": 0, "routed_scaling_factor": 1.0,
    "norm_topk_prob": False, "rms_norm_eps": 1e-6, "rope_interleave": True,
    "max_position_embeddings": 2048, "attention_bias": False, "tie_word_embeddings": False,
    "scoring_func": "softmax", "topk_method": "greedy",
}


def _hf_routing(d: dict[str, Any]) -> tuple[str, int, int]:
    """(scoring_func, n_group, topk_group) from config.json's scoring_func / topk_method.

    sigmoid + noaux_tc (V3; a V3 config without topk_method means noaux_tc): as written.
    softmax + greedy (V2-Lite): top-k over all experts, so n_group / topk_group (which
    DeepSeek's and HF's greedy routers ignore) become 1. softmax + group_limited_greedy
    (V2, V2.5) is the same when it keeps every group; otherwise it is refused."""
    scoring = d.get("scoring_func") or "sigmoid"
    method = d.get("topk_method") or ("noaux_tc" if scoring == "sigmoid" else "greedy")
    n_group, topk_group = d.get("n_group") or 1, d.get("topk_group") or 1
    if scoring == "sigmoid" and method == "noaux_tc":
        return scoring, n_group, topk_group
    if scoring == "softmax" and method == "greedy":
        return scoring, 1, 1
    if scoring == "softmax" and method == "group_limited_greedy":
        if n_group == 1 or topk_group >= n_group:
            return scoring, 1, 1
        raise ValueError(f"config.json topk_method='group_limited_greedy' with n_group={n_group}"
                         f", topk_group={topk_group} (DeepSeek-V2's device-limited routing: "
                         "only the experts of the best topk_group groups, each group scored "
                         "by its best expert, compete) is not supported; supported: "
                         "topk_method 'greedy' (or group_limited_greedy keeping every group)")
    raise ValueError(f"config.json scoring_func={scoring!r} with topk_method={method!r} is not "
                     "supported; supported: sigmoid + noaux_tc (DeepSeek-V3) and softmax + "
                     "greedy (DeepSeek-V2)")


PRESETS: dict[str, KimiK25Config] = {
    # Small enough for CPU tests; exercises the query LoRA, YaRN with mscale, group-limited
    # routing (n_group > 1) and a dense first layer.
    "tiny": KimiK25Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_layers=3, num_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        first_k_dense_replace=1, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                      "mscale_all_dim": 1.0},
        max_position_embeddings=512),
    # moonshotai/Moonlight-16B-A3B config.json (model_type deepseek_v3): no query LoRA.
    "moonlight-16b-a3b": KimiK25Config(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264,
        moe_intermediate_size=1408, num_layers=27, num_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1,
        topk_group=1, routed_scaling_factor=2.446, first_k_dense_replace=1,
        rms_norm_eps=1e-5, rope_theta=50000.0, max_position_embeddings=8192,
        bos_token_id=163584, eos_token_id=163586),
    # deepseek-ai/DeepSeek-V2-Lite config.json (model_type deepseek_v2): 15.7B parameters,
    # 2.4B active per token. No query LoRA; softmax greedy routing (6 of 64 experts, not
    # renormalised, scale 1.0) + 2 shared experts; YaRN x40 from 4K, mscale = mscale_all_dim
    # (cos/sin unscaled, softmax scale x mscale(40, 0.707)^2). One GPU: 29.3 GiB of bf16
    # weights (H200, dummy weights: 31.2 GiB peak with 8 sequences of ~2K tokens).
    "deepseek-v2-lite": KimiK25Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_layers=27, num_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        scoring_func="softmax", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, first_k_dense_replace=1, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 40.0,
                      "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                      "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
        max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001),
    # moonshotai/Kimi-K2.5 config.json text_config (model_type kimi_k2), as mirrored by
    # NVIDIA Megatron-Lite's Kimi K2.5 family defaults and vLLM's Kimi K2.5 kernel tests:
    # YaRN x64 from 4K with beta_fast 32 (K2-Thinking used beta_fast 1), rms eps 1e-5.
    "kimi-k2.5": KimiK25Config(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_layers=61, num_heads=64, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=384, num_experts_per_tok=8, n_shared_experts=1, n_group=1,
        topk_group=1, routed_scaling_factor=2.827, first_k_dense_replace=1,
        rms_norm_eps=1e-5, rope_theta=50000.0,
        rope_scaling={"rope_type": "yarn", "factor": 64.0,
                      "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=262144),
}


@placement(inputs=Replicate(), outputs=Partial(), group="attn")
class MLAAttention(nn.Module):
    """Multi-head latent attention. Caches [c ; k_pe] (L + dr per token, shared by all
    heads); kv_b_proj is handed to the kernel as per-head views W_UK [Nh, dn, L] and
    W_UV^T [Nh, L, dv] so decode can absorb them and prefill can expand them."""

    def __init__(self, c: KimiK25Config, rotary: Rotary):
        super().__init__()
        self.dn, self.dr, self.dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = L = c.kv_lora_rank
        h, nh = c.hidden_size, c.num_heads
        self.q_lora = c.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = nn.Linear(h, nh * c.qk_head_dim, bias=False)             # [Nh*dqk, H]
        else:
            self.q_a_proj = nn.Linear(h, c.q_lora_rank, bias=c.attention_bias)     # [Lq, H]
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.latent_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, nh * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, L + self.dr, bias=c.attention_bias)  # [L+dr, H]
        self.kv_a_layernorm = RMSNorm(L, c.latent_norm_eps)
        self.kv_b_proj = nn.Linear(L, nh * (self.dn + self.dv), bias=False)     # [Nh*(dn+dv), L]
        self.o_proj = nn.Linear(nh * self.dv, h, bias=c.attention_bias)            # [H, Nh*dv]
        self.rotary = rotary
        self.scale = c.softmax_scale
        self.register_buffer("kv_cache", torch.empty(0), persistent=False)

    def kv_cache_shape(self, num_blocks: int, page_size: int) -> tuple[int, ...]:
        return (num_blocks, page_size, self.kv_lora_rank + self.dr)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))      # [T, Nh*(dn+dr)]
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(t, -1, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.dr], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c)                                  # [T, L]
        q_pe = self.rotary(q_pe, positions)                               # [T, Nh, dr]
        k_pe = self.rotary(k_pe.reshape(t, 1, self.dr), positions).view(t, self.dr)
        # kv_b_proj.weight rows per head: dn rows of W_UK, then dv rows of W_UV.
        w = self.kv_b_proj.weight.view(-1, self.dn + self.dv, self.kv_lora_rank)  # [Nh,dn+dv,L]
        w_kc = w[:, : self.dn]                                            # [Nh, dn, L]
        w_vc = w[:, self.dn :].transpose(1, 2)                            # [Nh, L, dv]
        o = mla_attention(q_nope, q_pe, kv_c, k_pe, self.kv_cache, w_kc, w_vc,
                          meta.slot_mapping, meta.block_tables, meta.query_start_loc,
                          meta.seq_lens, meta.num_decodes, self.scale)     # [T, Nh, dv]
        return self.o_proj(o.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, c: KimiK25Config, rotary: Rotary, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = MLAAttention(c, rotary)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if layer < c.first_k_dense_replace:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size)
        else:
            self.mlp = MoE(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts,
                           c.num_experts_per_tok, scoring=c.scoring_func,
                           correction_bias=c.scoring_func == "sigmoid",
                           renormalize=c.norm_topk_prob, num_groups=c.n_group,
                           topk_groups=c.topk_group,
                           routed_scaling_factor=c.routed_scaling_factor,
                           shared_width=c.moe_intermediate_size * c.n_shared_experts)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class KimiK25ForCausalLM(CausalLM):
    CHECKPOINT_MAP = (
        *stacked_experts("layers.{L}.mlp", "model.layers.{L}.mlp"),       # routed experts
        Rule("layers.{L}.mlp.e_score_correction_bias",
             "model.layers.{L}.mlp.gate.e_score_correction_bias"),
        *fused_gate_up("layers.{L}.mlp.shared_experts", "model.layers.{L}.mlp.shared_experts"),
        *fused_gate_up("layers.{L}.mlp", "model.layers.{L}.mlp"),         # dense layers
        Rule("lm_head.weight", "lm_head.weight"),
        Rule("{*}", "model.{*}"),   # router mlp.gate.weight, attention, norms, embeddings
    )

    def __init__(self, config: KimiK25Config):
        c = config
        # One RoPE table for all layers, over the decoupled rope part only (dr dims).
        rotary = Rotary(c.qk_rope_head_dim, c.max_position_embeddings, c.rope_theta,
                        c.rope_scaling, interleaved=c.rope_interleave)
        super().__init__(c, [DecoderLayer(c, rotary, i) for i in range(c.num_layers)])


MODEL = KimiK25ForCausalLM
CONFIG = KimiK25Config
HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2", "deepseek_v2")
