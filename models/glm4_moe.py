"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (Zhipu AI / Z.ai 2025, "GLM-4.5: Agentic, Reasoning, and
Coding (ARC) Foundation Models"): transformers' `Glm4MoeForCausalLM`, model_type "glm4_moe".

The Llama recipe (pre-norm, GQA, SwiGLU) with DeepSeek-V3's mixture of experts:
    attention: q/k/v projections with biases (`attention_bias`; o_proj never has one),
        optional per-head QK RMSNorm over all D dims before RoPE (`use_qk_norm`: GLM-4.5
        and 4.6 on, Air off), and *partial* rotary: only the first
        r = int(D * partial_rotary_factor) dims of each head rotate (0.5: 64 of 128), paired
        rotate-half style (i, i + r/2) inside those r dims; dims r..D-1 pass through.
        (HF `apply_rotary_pos_emb` slices [..., :r] and applies `rotate_half` to it; this is
        not the interleaved pairing of the dense GLM-4 / ChatGLM files.)
    MLP: the first `first_k_dense_replace` layers dense SwiGLU (width I); the rest E routed
        experts (width Im) + `n_shared_experts` shared ones (one SwiGLU of width
        Im * n_shared), routed DeepSeek-V3 style: s = sigmoid(router logits) in fp32; choice
        score s + e_score_correction_bias; experts in `n_group` groups, each scored by the
        sum of its two best choice scores, only the best `topk_group` groups compete; top-k
        by choice score; weights the uncorrected s, renormalised if `norm_topk_prob`, times
        `routed_scaling_factor` (HF Glm4MoeTopkRouter; `kernels/moe.py` sigmoid routing).

Dimension legend: T tokens in the step (flat batch of all sequences), H hidden_size,
Hq num_heads, Hkv num_kv_heads, D head_dim, r rotary dims (D * partial_rotary_factor),
I intermediate_size (dense MLP), Im moe_intermediate_size (one expert), E routed experts,
k experts per token, V vocab_size, S positions whose logits are returned.

Single-device code: the compiler decides the parallel layout (heads, expert width or whole
experts) from the annotations of `models/layers.py`'s blocks. What this file is not:
    * the multi-token-prediction (MTP) layer. GLM checkpoints append
      `num_nextn_predict_layers` (1) extra decoder layers as `model.layers.{num_layers}.*`
      (eh_proj, enorm, hnorm, shared_head, ...) for speculative decoding. They are not
      built and not loaded: the map below only asks for layers 0..num_layers-1, and the
      loader logs the checkpoint's other tensors as unused (transformers skips them too,
      `_keys_to_ignore_on_load_unexpected`). The count is kept in the config for a later
      MTP drafter.
    * quantized checkpoints (`quantization_config`, e.g. GLM-4.5-FP8's 128x128 block
      scales): refused by `from_hf`, since loading FP8 tensors without their scales would
      silently give wrong weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tscompile.kernels import AttentionMetadata
from tscompile.models.checkpoint import Rule, fused_gate_up, stacked_experts
from tscompile.models.layers import (
    CausalLM, GatedMLP, GQAAttention, MoE, RMSNorm, Rotary, hf_rope,
)


@dataclass(frozen=True, slots=True)
class Glm4MoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int            # dense MLP of the first_k_dense_replace layers
    moe_intermediate_size: int        # one routed (or shared) expert
    num_layers: int
    num_heads: int
    num_kv_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    head_dim: int | None = None       # default hidden_size // num_heads (GLM sets 128)
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    partial_rotary_factor: float = 0.5   # r = int(D * factor) leading dims of a head rotate
    attention_bias: bool = True          # q/k/v biases (o_proj has none in any case)
    use_qk_norm: bool = False            # per-head RMSNorm on q and k, eps rms_norm_eps
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0    # MTP layers in the checkpoint: recorded, not built
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "n_routed_experts", "num_experts_per_tok",
                  "n_group", "topk_group", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise ValueError(f"Glm4MoeConfig.{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Glm4MoeConfig: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"Glm4MoeConfig: hidden_size={self.hidden_size} does not "
                                 f"divide into num_heads={self.num_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        elif self.head_dim <= 0:
            raise ValueError(f"Glm4MoeConfig.head_dim must be positive, got {self.head_dim}")
        r = self.rotary_dim
        if not 0 < self.partial_rotary_factor <= 1 or r <= 0 or r % 2:
            raise ValueError(f"Glm4MoeConfig.partial_rotary_factor={self.partial_rotary_factor} "
                             f"gives {r} rotary dims of head_dim={self.head_dim}; they must be "
                             "a positive even count (RoPE rotates pairs), factor in (0, 1]")
        kind = (self.rope_scaling or {}).get("rope_type") or (self.rope_scaling or {}).get(
            "type") or "default"
        if kind not in _ROPE_TYPES:
            raise ValueError(f"Glm4MoeConfig.rope_scaling type {kind!r} is not supported; "
                             f"supported: {', '.join(_ROPE_TYPES)} (kernels/rope.py)")
        if self.first_k_dense_replace < 0:      # >= num_layers: all dense, as in HF
            raise ValueError(f"Glm4MoeConfig.first_k_dense_replace must be >= 0, "
                             f"got {self.first_k_dense_replace}")
        if self.first_k_dense_replace and self.intermediate_size <= 0:
            raise ValueError(f"Glm4MoeConfig.intermediate_size must be positive with "
                             f"first_k_dense_replace={self.first_k_dense_replace} dense layers, "
                             f"got {self.intermediate_size}")
        if self.n_shared_experts < 0:
            raise ValueError(f"Glm4MoeConfig.n_shared_experts must be >= 0, "
                             f"got {self.n_shared_experts}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"Glm4MoeConfig.n_routed_experts={self.n_routed_experts} does not "
                             f"split into n_group={self.n_group} equal groups")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            # HF scores a group by topk(2) of its experts: it cannot run with 1 per group.
            raise ValueError(f"Glm4MoeConfig: n_group={self.n_group} leaves {per_group} expert "
                             "per group; a group is scored by its two best experts")
        if self.topk_group > self.n_group:
            raise ValueError(f"Glm4MoeConfig.topk_group={self.topk_group} exceeds "
                             f"n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(f"Glm4MoeConfig.num_experts_per_tok={self.num_experts_per_tok} "
                             f"exceeds the {self.topk_group} kept groups x {per_group} experts")

    @property
    def rotary_dim(self) -> int:
        """HF: int(head_dim * partial_rotary_factor) (truncated, as Glm4MoeRotaryEmbedding)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Glm4MoeConfig:
        """From a hub config.json (`rope_theta`, top-level `partial_rotary_factor`) or one
        written by transformers 5 (`rope_parameters` holding both). A key left out means
        what transformers' Glm4MoeConfig defaults it to."""
        d = {**_HF_DEFAULTS, **d}
        if d.get("quantization_config"):
            q = d["quantization_config"]
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise ValueError(f"glm4_moe config.json has quantization_config (quant_method="
                             f"{method!r}); quantized GLM checkpoints are not supported by "
                             "models/glm4_moe.py (their weights would load without their "
                             "scales); use the bf16 checkpoint")
        if d["hidden_act"] != "silu":
            raise ValueError(f"glm4_moe config.json hidden_act={d['hidden_act']!r}: only "
                             "'silu' (SwiGLU) is supported")
        if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get(
                "topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"glm4_moe config.json scoring_func={d.get('scoring_func')!r}, "
                             f"topk_method={d.get('topk_method')!r}: GLM-4.5 routes by sigmoid "
                             "+ correction bias (noaux_tc) only, as transformers' "
                             "Glm4MoeTopkRouter")
        if d.get("num_experts_per_tok") is None:
            raise ValueError("glm4_moe config.json has no num_experts_per_tok")
        theta, scaling = hf_rope(d)
        params = d.get("rope_parameters") or {}
        factor = params.get("partial_rotary_factor", d["partial_rotary_factor"])
        if scaling is not None:
            # transformers 5 keeps partial_rotary_factor in rope_parameters; it is no part of
            # the frequency scaling (the Rotary module gets r dims directly).
            scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
        experts = d.get("n_routed_experts") or d.get("num_local_experts")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            moe_intermediate_size=d["moe_intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), n_routed_experts=experts,
            num_experts_per_tok=d["num_experts_per_tok"],
            n_shared_experts=d["n_shared_experts"] or 0, n_group=d["n_group"] or 1,
            topk_group=d["topk_group"] or 1,
            routed_scaling_factor=float(d["routed_scaling_factor"]),
            norm_topk_prob=bool(d["norm_topk_prob"]),
            first_k_dense_replace=d["first_k_dense_replace"] or 0,
            partial_rotary_factor=float(factor), attention_bias=bool(d["attention_bias"]),
            use_qk_norm=bool(d["use_qk_norm"]), rms_norm_eps=d["rms_norm_eps"],
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=d["max_position_embeddings"],
            tie_word_embeddings=bool(d["tie_word_embeddings"]),
            num_nextn_predict_layers=d.get("num_nextn_predict_layers") or 0,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))


# What kernels/rope.py's rope_cos_sin_cache builds (HF's names), checked at config time:
# the table is only computed off the meta device, long after a build.
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# transformers 5.24 Glm4MoeConfig defaults, for the keys a config.json may leave out. Note
# attention_bias: HF's default is False though every published GLM-4.5 config sets true.
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu", "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "n_shared_experts": 1, "n_routed_experts": 128, "num_experts_per_tok": 8,
    "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": True, "use_qk_norm": False, "attention_bias": False,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}

# GLM's stop tokens (<|endoftext|>, <|user|>, <|observation|>) in all three published configs.
_GLM_EOS = [151329, 151336, 151338]

# The real presets are the published config.json files' values as this file's author knows
# them (the hub cannot be reached from here to re-read them); tests/models/test_glm4_moe.py
# holds those config.json dicts and checks that from_hf turns them into these presets.
PRESETS: dict[str, Glm4MoeConfig] = {
    # CPU tests: partial rotary (8 of 16 dims), QKV biases, QK-norm, 2 expert groups of
    # which 1 competes, a shared expert, scaling 2.5 and one dense first layer.
    "tiny": Glm4MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_layers=3, num_heads=8, num_kv_heads=4, head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, first_k_dense_replace=1, partial_rotary_factor=0.5,
        use_qk_norm=True, rope_theta=10000.0, max_position_embeddings=512),
    # zai-org/GLM-4.5-Air config.json (hub, transformers 4.54): 46 layers, 1 dense; 128 experts
    # top-8 + 1 shared; 96 query / 8 KV heads of 128 (attention width 12288 > hidden 4096);
    # no QK-norm; 1 MTP layer (model.layers.46, not built). Built: 106.85e9 params, 12.18e9
    # active per token without embedding and LM head (published: 106B / 12B).
    "glm-4.5-air": Glm4MoeConfig(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944,
        moe_intermediate_size=1408, num_layers=46, num_heads=96, num_kv_heads=8, head_dim=128,
        n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1, n_group=1,
        topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True, first_k_dense_replace=1,
        partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=False, rms_norm_eps=1e-5,
        rope_theta=1000000.0, max_position_embeddings=131072, num_nextn_predict_layers=1,
        eos_token_id=_GLM_EOS),
    # zai-org/GLM-4.5 config.json: 92 layers, 3 dense; 160 experts top-8 + 1 shared, scale 2.5;
    # QK-norm on; 1 MTP layer (model.layers.92). Built: 352.80e9 params, 32.08e9 active
    # (published: 355B, which seems to count the ~4e9 MTP layer, / 32B).
    "glm-4.5": Glm4MoeConfig(
        vocab_size=151552, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_layers=92, num_heads=96, num_kv_heads=8, head_dim=128,
        n_routed_experts=160, num_experts_per_tok=8, n_shared_experts=1, n_group=1,
        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3,
        partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True, rms_norm_eps=1e-5,
        rope_theta=1000000.0, max_position_embeddings=131072, num_nextn_predict_layers=1,
        eos_token_id=_GLM_EOS),
}
# zai-org/GLM-4.6 config.json: GLM-4.5's shapes with a 200K context (202752 positions).
PRESETS["glm-4.6"] = Glm4MoeConfig(**{
    **{f: getattr(PRESETS["glm-4.5"], f) for f in Glm4MoeConfig.__dataclass_fields__},
    "max_position_embeddings": 202752})


class DecoderLayer(nn.Module):
    def __init__(self, c: Glm4MoeConfig, rotary: Rotary, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # QK-norm shares the model's eps (HF builds q_norm/k_norm with config.rms_norm_eps).
        self.self_attn = GQAAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                      rotary, bias=c.attention_bias,
                                      qk_norm_eps=c.rms_norm_eps if c.use_qk_norm else None)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if layer < c.first_k_dense_replace:
            self.mlp: nn.Module = GatedMLP(c.hidden_size, c.intermediate_size)
        else:
            self.mlp = MoE(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts,
                           c.num_experts_per_tok, scoring="sigmoid", correction_bias=True,
                           renormalize=c.norm_topk_prob, num_groups=c.n_group,
                           topk_groups=c.topk_group,
                           routed_scaling_factor=c.routed_scaling_factor,
                           shared_width=c.moe_intermediate_size * c.n_shared_experts)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Glm4MoeForCausalLM(CausalLM):
    # HF's checkpoint names as published (transformers 5 saves experts per expert, too).
    # Only layers 0..num_layers-1 exist in the model, so the MTP layer is never asked for.
    CHECKPOINT_MAP = (
        *stacked_experts("layers.{L}.mlp", "model.layers.{L}.mlp"),       # routed experts
        Rule("layers.{L}.mlp.e_score_correction_bias",
             "model.layers.{L}.mlp.gate.e_score_correction_bias"),        # [E] fp32
        *fused_gate_up("layers.{L}.mlp.shared_experts", "model.layers.{L}.mlp.shared_experts"),
        *fused_gate_up("layers.{L}.mlp", "model.layers.{L}.mlp"),         # dense layers
        Rule("lm_head.weight", "lm_head.weight"),
        Rule("{*}", "model.{*}"),   # router mlp.gate.weight, attention (+ biases), norms, embed
    )

    def __init__(self, config: Glm4MoeConfig):
        c = config
        # One RoPE table for all layers over the r rotated dims; rope() copies dims r..D-1.
        rotary = Rotary(c.rotary_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
        super().__init__(c, [DecoderLayer(c, rotary, i) for i in range(c.num_layers)])


MODEL = Glm4MoeForCausalLM
CONFIG = Glm4MoeConfig
HF_MODEL_TYPES = ("glm4_moe",)
