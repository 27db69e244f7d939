"""Qwen3 (Qwen Team 2025, "Qwen3 Technical Report"): dense and mixture-of-experts decoders.

Both are the Llama recipe (pre-norm, GQA, RoPE, SwiGLU) plus QK-norm: an RMSNorm over
head_dim on every query and key head, before RoPE, in place of attention biases. Qwen3-MoE
replaces the MLP of most layers with E routed SwiGLU experts: softmax router, top-k,
optionally renormalised over the chosen k (`norm_topk_prob`), no shared expert. Which
layers are MoE follows HF's Qwen3MoeDecoderLayer exactly: layer i is MoE iff
`num_experts > 0`, `(i + 1) % decoder_sparse_step == 0` and i is not in `mlp_only_layers`.

Dimension legend: T tokens in the step (flat batch of all sequences), H hidden_size,
Hq num_heads, Hkv num_kv_heads, D head_dim, I intermediate_size (dense MLP),
Im moe_intermediate_size (one expert), E num_experts, k num_experts_per_tok, V vocab_size,
S positions whose logits are returned (meta.logits_indices).

Single-device code: the compiler decides the parallel layout (heads, experts) from
annotations. What this file is not: sliding-window attention (Qwen3 checkpoints ship with
`use_sliding_window: false`; a config that turns it on is refused, not approximated).
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
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int               # dense MLP width I (0 allowed if every layer is MoE)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None          # default hidden_size // num_heads (Qwen3 sets 128)
    rms_norm_eps: float = 1e-6           # also the QK-norm eps, as in HF
    rope_theta: float = 1000000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    # Mixture of experts; num_experts == 0 is the dense model and the rest is ignored.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False         # renormalise the k chosen softmax probs to sum 1
    decoder_sparse_step: int = 1         # every step-th layer (1-based) is MoE ...
    mlp_only_layers: tuple[int, ...] = ()  # ... unless listed here (0-based)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, f) <= 0:
                raise ValueError(f"Qwen3Config.{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Qwen3Config: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"Qwen3Config: hidden_size={self.hidden_size} does not divide "
                                 f"into num_heads={self.num_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        elif self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim must be positive and even (RoPE rotates "
                             f"pairs), got {self.head_dim}")
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if self.num_experts < 0:
            raise ValueError(f"Qwen3Config.num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts:
            self._check_moe()
        if self.intermediate_size < 0 or (self.intermediate_size == 0 and not all(
                self.is_moe_layer(i) for i in range(self.num_layers))):
            raise ValueError(f"Qwen3Config.intermediate_size must be positive when any layer "
                             f"has a dense MLP, got {self.intermediate_size}")

    def _check_moe(self) -> None:
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"Qwen3Config.num_experts_per_tok={self.num_experts_per_tok} must "
                             f"be in [1, num_experts={self.num_experts}]")
        if self.moe_intermediate_size <= 0:
            raise ValueError(f"Qwen3Config.moe_intermediate_size must be positive with "
                             f"num_experts={self.num_experts}, got {self.moe_intermediate_size}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"Qwen3Config.decoder_sparse_step must be >= 1, got "
                             f"{self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"Qwen3Config.mlp_only_layers has {bad}, outside the "
                             f"{self.num_layers} layers [0, {self.num_layers - 1}]")

    def is_moe_layer(self, i: int) -> bool:
        """HF Qwen3MoeDecoderLayer's rule, verbatim."""
        return (self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0
                and i not in self.mlp_only_layers)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Qwen3Config:
        """From a hub config.json (`rope_theta`, `num_experts`) or one written by transformers 5
        (`rope_parameters`, and Qwen3MoeConfig saves `num_experts` as `num_local_experts`)."""
        if d.get("attention_bias"):
            raise ValueError("Qwen3 config has attention_bias=true; Qwen3 checkpoints have no "
                             "attention biases and this model file does not build them")
        if d.get("use_sliding_window") or any(
                t != "full_attention" for t in d.get("layer_types") or ()):
            raise ValueError("Qwen3 config enables sliding-window attention "
                             "(use_sliding_window/layer_types); only full attention is supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Qwen3 config has hidden_act={d['hidden_act']!r}; only 'silu' "
                             "(SwiGLU) is supported")
        theta, scaling = hf_rope(d)
        experts = d.get("num_experts") or d.get("num_local_experts") or 0
        moe: dict[str, Any] = {}
        if experts:
            moe = dict(num_experts=experts, num_experts_per_tok=d["num_experts_per_tok"],
                       moe_intermediate_size=d["moe_intermediate_size"],
                       norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                       decoder_sparse_step=d.get("decoder_sparse_step") or 1,
                       mlp_only_layers=tuple(d.get("mlp_only_layers") or ()))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d.get("intermediate_size") or 0,
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 40960),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), **moe)


PRESETS: dict[str, Qwen3Config] = {
    "tiny": Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=8, num_kv_heads=4, head_dim=16, max_position_embeddings=512,
                        tie_word_embeddings=True),
    # Layer 0 dense, layers 1-2 MoE: both MLP kinds in one small model.
    "tiny-moe": Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3,
                            num_heads=8, num_kv_heads=4, head_dim=16, max_position_embeddings=512,
                            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                            norm_topk_prob=True, mlp_only_layers=(0,)),
    # Qwen/Qwen3-0.6B config.json (hub, transformers 4.51): ~0.6e9 params, tied.
    "qwen3-0.6b": Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                              num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                              rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=40960, tie_word_embeddings=True,
                              bos_token_id=151643, eos_token_id=151645),
    # Qwen/Qwen3-8B config.json with the long-context setting its model card gives (YaRN,
    # factor 4 over 32768 original positions: 131072 tokens). ~8.2e9 params, untied.
    "qwen3-8b": Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                            rms_norm_eps=1e-6, rope_theta=1000000.0,
                            rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 32768},
                            max_position_embeddings=131072, tie_word_embeddings=False,
                            bos_token_id=151643, eos_token_id=151645),
    # Qwen/Qwen3-30B-A3B config.json: 48 MoE layers of 128 experts, top-8 renormalised.
    # ~30.5e9 params: 48 x (128 x 3 x 768 x 2048 experts + 18.9e6 attention) + 2 x 311e6
    # embeddings; ~3.3e9 active per token (8 of 128 experts).
    "qwen3-30b-a3b": Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                 num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
                                 rms_norm_eps=1e-6, rope_theta=1000000.0,
                                 max_position_embeddings=40960, tie_word_embeddings=False,
                                 num_experts=128, num_experts_per_tok=8,
                                 moe_intermediate_size=768, norm_topk_prob=True,
                                 bos_token_id=151643, eos_token_id=151645),
}


class DecoderLayer(nn.Module):
    def __init__(self, c: Qwen3Config, index: int, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # QK-norm shares the model's eps (HF builds q_norm/k_norm with config.rms_norm_eps).
        self.self_attn = GQAAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                      rotary, qk_norm_eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.is_moe_layer(index):
            # Softmax over all E router logits, then top-k: renormalising or not changes the
            # scale of the whole expert branch, so it follows the checkpoint's flag.
            self.mlp: nn.Module = MoE(c.hidden_size, c.moe_intermediate_size, c.num_experts,
                                      c.num_experts_per_tok, scoring="softmax",
                                      renormalize=c.norm_topk_prob)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3ForCausalLM(CausalLM):
    CHECKPOINT_MAP = (
        *fused_gate_up("layers.{L}.mlp", "model.layers.{L}.mlp"),         # dense layers
        *stacked_experts("layers.{L}.mlp", "model.layers.{L}.mlp"),       # MoE layers
        Rule("layers.{L}.mlp.gate.weight", "model.layers.{L}.mlp.gate.weight"),  # router [E, H]
        Rule("lm_head.weight", "lm_head.weight"),
        Rule("{*}", "model.{*}"),
    )

    def __init__(self, config: Qwen3Config):
        c = config
        rotary = Rotary(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
        super().__init__(c, [DecoderLayer(c, i, rotary) for i in range(c.num_layers)])


MODEL = Qwen3ForCausalLM
CONFIG = Qwen3Config
HF_MODEL_TYPES = ("qwen3", "qwen3_moe")
