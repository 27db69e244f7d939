"""A test-only architecture, not in models/: Phi-3 (Abdin et al. 2024; the mini shape, as
many KV heads as query heads) written as a model author would, in plain torch with Hugging
Face's parameter names: a fused qkv_proj sliced into q, k, v, a fused gate_up_proj chunked
into gate and up, RMSNorm and RoPE from the kernel layer. Phi-3 has no biases; the
`tiny-bias` preset adds them on every linear (Qwen2 / GLM-style), so the biased row-parallel
o_proj and down_proj end the same modules and the all-reduce + add + RMSNorm fusion is
checked with them. Its only parallelism code is the two @placement lines.

Legend: T tokens, H hidden, nh heads, D head dim, I MLP width, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tscompile.annotations import Partial, Replicate, placement
from tscompile.kernels import gqa_attention
from tscompile.models.checkpoint import Rule
from tscompile.models.layers import RMSNorm, Rotary


@dataclass(frozen=True, slots=True)
class Phi3StyleConfig:
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 96
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 256
    bias: bool = False
    eos_token_id: int | None = None


PRESETS = {"tiny": Phi3StyleConfig(), "tiny-bias": Phi3StyleConfig(bias=True)}


@placement(inputs=Replicate(), outputs=Partial(), group="attn")
class Attention(nn.Module):
    def __init__(self, c: Phi3StyleConfig, rotary: Rotary):
        super().__init__()
        self.hidden, self.num_heads, self.head_dim = (c.hidden_size, c.num_heads,
                                                      c.hidden_size // c.num_heads)
        self.qkv_proj = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=c.bias)  # [q ; k ; v]
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.bias)
        self.rotary = rotary
        self.register_buffer("kv_cache", torch.empty(0), persistent=False)

    def kv_cache_shape(self, num_blocks, page_size):
        return (2, num_blocks, page_size, self.num_heads, self.head_dim)

    def forward(self, x, positions, meta):
        t, h = x.shape[0], self.hidden
        qkv = self.qkv_proj(x)                                        # [T, 3H]
        q = qkv[..., :h].view(t, -1, self.head_dim)                   # [T, nh, D]
        k = qkv[..., h:2 * h].view(t, -1, self.head_dim)
        v = qkv[..., 2 * h:].view(t, -1, self.head_dim)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        o = gqa_attention(q, k, v, self.kv_cache, meta.slot_mapping, meta.block_tables,
                          meta.query_start_loc, meta.seq_lens, meta.num_decodes,
                          self.head_dim ** -0.5)
        return self.o_proj(o.view(t, -1))


@placement(inputs=Replicate(), outputs=Partial(), group="dense")
class MLP(nn.Module):
    def __init__(self, c: Phi3StyleConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)              # [T, I] each
        return self.down_proj(up * nn.functional.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, c: Phi3StyleConfig, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, rotary)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, positions, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Style(nn.Module):
    CHECKPOINT_MAP = (Rule("lm_head.weight", "lm_head.weight"), Rule("{*}", "model.{*}"))

    def __init__(self, c: Phi3StyleConfig):
        super().__init__()
        self.config = c
        rotary = Rotary(c.hidden_size // c.num_heads, c.max_position_embeddings, c.rope_theta,
                        None)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, rotary) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)                               # [T, H] R
        for layer in self.layers:
            x = layer(x, positions, meta)
        return self.lm_head(self.norm(x[meta.logits_indices]))


CONFIG, MODEL = Phi3StyleConfig, Phi3Style
