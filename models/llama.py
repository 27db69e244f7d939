"""Llama 2/3 and SmolLM2 (Touvron et al. 2023; Llama 3 2024): pre-norm decoder, GQA, RoPE,
SwiGLU MLP, optional tied embeddings.

Dimension legend: T tokens in the step (flat batch of all sequences), H hidden_size,
Hq num_heads, Hkv num_kv_heads, D head_dim, I intermediate_size, V vocab_size,
S positions whose logits are returned (meta.logits_indices).

Single-device code: the compiler decides the parallel layout from annotations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tscompile.kernels import AttentionMetadata
from tscompile.models.checkpoint import Rule, fused_gate_up
from tscompile.models.layers import CausalLM, GatedMLP, GQAAttention, RMSNorm, Rotary, hf_rope


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None          # default hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads"):
            if getattr(self, f) <= 0:
                raise ValueError(f"LlamaConfig.{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} does not divide "
                                 f"into num_heads={self.num_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        theta, scaling = hf_rope(d)
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=8, num_kv_heads=4, max_position_embeddings=512,
                        rope_theta=10000.0),
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, rms_norm_eps=1e-5,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # meta-llama/Llama-3.1-8B-Instruct
    "llama-3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8,
                                rope_theta=500000.0, max_position_embeddings=131072,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192},
                                bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
}


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = GQAAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                      rotary, bias=c.attention_bias)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    CHECKPOINT_MAP = (
        *fused_gate_up("layers.{L}.mlp", "model.layers.{L}.mlp"),
        Rule("lm_head.weight", "lm_head.weight"),
        Rule("{*}", "model.{*}"),
    )

    def __init__(self, config: LlamaConfig):
        c = config
        rotary = Rotary(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
        super().__init__(c, [DecoderLayer(c, rotary) for _ in range(c.num_layers)])


MODEL = LlamaForCausalLM
CONFIG = LlamaConfig
HF_MODEL_TYPES = ("llama",)

