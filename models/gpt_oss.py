"""GPT-OSS (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b model card"): a mixture-of-experts
decoder with attention sinks and alternating sliding-window / full attention.

The block is pre-norm (RMSNorm) with two residual lines, as Llama's, and differs in:
* attention: GQA with biases on q, k, v *and* o; RoPE with YaRN (theta 150000, factor 32
  over 4096 original positions, `truncate: false`); one learned sink logit per query head
  joins every softmax as a key whose value is 0 (`sinks`); layer i attends over its last
  `sliding_window` (128) keys when `layer_types[i] == "sliding_attention"` (the even
  layers in the published configs) and over the whole context otherwise. The kernel op
  takes both per call (kernels/gqa.py, "Variants").
* MoE on every layer: a router with a bias, softmax over the top-k logits (= softmax over
  all E, top-k, renormalised: the same numbers), no shared expert. Each expert is
  down(act(gate_up x + b_gu)) + b_down with GPT-OSS's clamped SwiGLU ("swigluoai"):
  gate = min(gate, limit), up = clamp(up, -limit, limit), act = (up + 1) * gate *
  sigmoid(alpha * gate), alpha 1.702, limit 7.0 (kernels/moe.py).
The parameters keep Hugging Face's names and layouts, so the checkpoint map is the
catch-all rule: the experts are stacked tensors `gate_up_proj` [E, H, 2I] (gate and up
*interleaved* along 2I: gate_i is column 2i, up_i column 2i + 1), `gate_up_proj_bias`
[E, 2I], `down_proj` [E, I, H], `down_proj_bias` [E, H] (transformers'
`GptOssExperts`, input-major: x @ W). The MoE passes them to the op as transposed views,
read in place, with `interleaved=True`; under MoE TP the 2I dim splits in whole (gate, up)
pairs, under EP the experts split with their biases.

Precision: the published checkpoints store the expert weights in MXFP4 (`quantization_config`
quant_method "mxfp4"); this file builds and loads them in bf16 (or fp32), i.e. a
dequantised checkpoint (transformers: `Mxfp4Config(dequantize=True)`, then
`save_pretrained`). A config.json that still declares MXFP4 is refused, not approximated.

Dimension legend: T tokens in the step (flat batch of all sequences), H hidden_size,
Hq num_heads, Hkv num_kv_heads, D head_dim, E num_experts, k num_experts_per_tok,
I intermediate_size (one expert's width), V vocab_size, W sliding_window,
S positions whose logits are returned (meta.logits_indices).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tscompile.annotations import Partial, Replicate, placement
from tscompile.kernels import AttentionMetadata, moe_experts, moe_route
from tscompile.models.checkpoint import Rule
from tscompile.models.layers import CausalLM, GQAAttention, RMSNorm, Rotary, hf_rope

LAYER_TYPES = ("sliding_attention", "full_attention")
# The published configs' RoPE: YaRN, factor 32 over 4096 positions, without the floor/ceil
# of the correction range (`truncate: false`).
YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}


def alternating(num_layers: int) -> tuple[str, ...]:
    """HF GptOssConfig's default: sliding on even layers (0, 2, ...), full on odd ones."""
    return tuple(LAYER_TYPES[i % 2] for i in range(num_layers))


@dataclass(frozen=True, slots=True)
class GptOssConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int               # one expert's width I
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    num_experts_per_tok: int
    head_dim: int = 64
    sliding_window: int = 128
    layer_types: tuple[str, ...] | None = None   # None: alternating(num_layers)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True          # q, k, v and o biases (every published config)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "num_experts", "head_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"GptOssConfig.{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"GptOssConfig: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"GptOssConfig.head_dim must be even (RoPE rotates pairs), got "
                             f"{self.head_dim}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"GptOssConfig.num_experts_per_tok={self.num_experts_per_tok} "
                             f"must be in [1, num_experts={self.num_experts}]")
        if not self.swiglu_limit > 0:
            raise ValueError(f"GptOssConfig.swiglu_limit must be > 0, got {self.swiglu_limit}")
        types = (alternating(self.num_layers) if self.layer_types is None
                 else tuple(self.layer_types))
        object.__setattr__(self, "layer_types", types)
        if len(types) != self.num_layers:
            raise ValueError(f"GptOssConfig.layer_types has {len(types)} entries for "
                             f"{self.num_layers} layers")
        bad = sorted(set(types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"GptOssConfig.layer_types has {bad}; supported: "
                             f"{', '.join(LAYER_TYPES)}")
        if "sliding_attention" in types and self.sliding_window <= 0:
            raise ValueError(f"GptOssConfig.sliding_window must be positive with sliding "
                             f"layers, got {self.sliding_window}")

    def window(self, i: int) -> int:
        """Layer i's attention window in keys (0 = the whole context)."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else 0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GptOssConfig:
        """From a hub config.json (`rope_scaling`, `rope_theta`) or one written by
        transformers 5 (`rope_parameters`); `num_local_experts` (or `num_experts`)."""
        quant = d.get("quantization_config")
        if quant:
            raise ValueError(
                f"GPT-OSS config has quantization_config "
                f"(quant_method={quant.get('quant_method')!r}): the checkpoint stores its "
                f"experts quantised, and this model file builds and loads bf16 experts only; "
                f"hint: use a dequantised bf16 checkpoint (transformers "
                f"Mxfp4Config(dequantize=True), then save_pretrained), or build from the "
                f"gpt-oss-20b / gpt-oss-120b preset")
        experts = d.get("num_local_experts") or d.get("num_experts")
        k = d.get("num_experts_per_tok") or d.get("experts_per_token")
        if not experts or not k:
            raise ValueError("GPT-OSS config has no num_local_experts / num_experts_per_tok: "
                             "every GPT-OSS layer is a mixture of experts")
        theta, scaling = hf_rope(d)
        if scaling is not None and (scaling.get("rope_type") or scaling.get("type")) not in (
                "yarn", "default", None):
            raise ValueError(f"GPT-OSS config has rope type "
                             f"{scaling.get('rope_type') or scaling.get('type')!r}; this file "
                             "builds YaRN (the published configs) or plain RoPE")
        layers = d["num_hidden_layers"]
        types = d.get("layer_types")
        window = d.get("sliding_window")
        if types is not None and "sliding_attention" in types and not window:
            raise ValueError("GPT-OSS config has sliding_attention layers but sliding_window="
                             f"{window!r}; give the window size")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=layers,
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            num_experts=experts, num_experts_per_tok=k,
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            sliding_window=window or 0,
            layer_types=tuple(types) if types is not None else alternating(layers),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            swiglu_alpha=d.get("swiglu_alpha", 1.702), swiglu_limit=d.get("swiglu_limit", 7.0),
            attention_bias=d.get("attention_bias", True),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"))


# openai/gpt-oss-20b and -120b config.json (hub): 24 / 36 layers of 32 / 128 experts, the
# rest shared. Parameter counts (tests/models/test_gpt_oss.py, in bf16 on the meta device):
# 20b 20.91e9 total, 3.61e9 active per token; 120b 116.83e9 / 5.13e9 (the model card's
# figures; active = attention + router + 4 experts per layer + the LM head, not the input
# embedding, which is a lookup).
_PUBLISHED = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_heads=64,
                  num_kv_heads=8, head_dim=64, num_experts_per_tok=4, sliding_window=128,
                  rms_norm_eps=1e-5, rope_theta=150000.0, rope_scaling=YARN,
                  max_position_embeddings=131072, swiglu_alpha=1.702, swiglu_limit=7.0,
                  eos_token_id=200002, pad_token_id=199999)

PRESETS: dict[str, GptOssConfig] = {
    # Sliding window 4 over prompts of 10+ tokens: both layer kinds matter.
    "tiny": GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_layers=2,
                         num_heads=8, num_kv_heads=4, head_dim=16, num_experts=8,
                         num_experts_per_tok=2, sliding_window=4, max_position_embeddings=512,
                         rope_scaling={**YARN, "factor": 4.0,
                                       "original_max_position_embeddings": 64}),
    "gpt-oss-20b": GptOssConfig(num_layers=24, num_experts=32, **_PUBLISHED),
    "gpt-oss-120b": GptOssConfig(num_layers=36, num_experts=128, **_PUBLISHED),
}


class GptOssExperts(nn.Module):
    """The stacked expert tensors, in Hugging Face's names and layouts (no forward: the
    MoE passes them to the op)."""

    def __init__(self, hidden: int, width: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * width))  # [E, H, 2I]
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * width))     # [E, 2I]
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, hidden))         # [E, I, H]
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden))           # [E, H]


@placement(inputs=Replicate(), outputs=Partial(), group="moe",
           experts=("experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj",
                    "experts.down_proj_bias"))
class GptOssMoE(nn.Module):
    """Biased router, softmax over the chosen k, clamped-SwiGLU experts with biases."""

    def __init__(self, c: GptOssConfig):
        super().__init__()
        self.top_k, self.alpha, self.limit = c.num_experts_per_tok, c.swiglu_alpha, c.swiglu_limit
        self.router = nn.Linear(c.hidden_size, c.num_experts, bias=True)   # [E, H], [E]
        self.experts = GptOssExperts(c.hidden_size, c.intermediate_size, c.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(x.float(), self.router.weight.float(),
                                      self.router.bias.float())            # [T, E] fp32
        # softmax(top-k logits) == top-k of softmax(all), renormalised over the k.
        weights, ids = moe_route(logits, None, self.top_k, "softmax", True, 1, 1, 1.0)
        e = self.experts
        return moe_experts(x, e.gate_up_proj.transpose(1, 2), e.down_proj.transpose(1, 2),
                           weights, ids, b13=e.gate_up_proj_bias, b2=e.down_proj_bias,
                           activation="swigluoai", alpha=self.alpha, limit=self.limit,
                           interleaved=True)


class DecoderLayer(nn.Module):
    def __init__(self, c: GptOssConfig, index: int, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # GQA with q/k/v/o biases, YaRN RoPE, per-head sinks and this layer's window.
        self.self_attn = GQAAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                      rotary, bias=c.attention_bias, o_bias=c.attention_bias,
                                      window=c.window(index), sinks=True)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GptOssMoE(c)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssForCausalLM(CausalLM):
    # Our names are HF's (experts stacked as HF stores them), so the map is the catch-all.
    CHECKPOINT_MAP = (
        Rule("lm_head.weight", "lm_head.weight"),
        Rule("{*}", "model.{*}"),
    )

    def __init__(self, config: GptOssConfig):
        c = config
        rotary = Rotary(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
        super().__init__(c, [DecoderLayer(c, i, rotary) for i in range(c.num_layers)])


MODEL = GptOssForCausalLM
CONFIG = GptOssConfig
HF_MODEL_TYPES = ("gpt_oss",)
