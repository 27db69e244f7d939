"""A test-only architecture, not in models/: GPT-NeoX / Pythia (Black et al. 2022) written
as a model author would, in plain torch with Hugging Face's parameter names, plus the paged
attention kernel for the KV cache. Biases stay where the checkpoint has them (fused QKV,
attention output, both MLP linears, every LayerNorm); the row-parallel ones (`dense`,
`dense_4h_to_h`) end modules whose output is a partial sum. Its only parallelism code is
the two @placement lines.

Legend: T tokens, H hidden, nh heads, D head dim, Dr rotary dims (the first Dr of D),
I MLP width, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tscompile.annotations import Partial, Replicate, placement
from tscompile.kernels import gqa_attention
from tscompile.models.checkpoint import Rule


@dataclass(frozen=True, slots=True)
class GPTNeoXStyleConfig:
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 256
    use_parallel_residual: bool = True
    eos_token_id: int | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GPTNeoXStyleConfig:
        rope = d.get("rope_parameters") or {}
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                   intermediate_size=d["intermediate_size"],
                   rotary_pct=rope.get("partial_rotary_factor", d.get("rotary_pct", 1.0)),
                   rope_theta=rope.get("rope_theta", d.get("rotary_emb_base", 10000.0)),
                   layer_norm_eps=d["layer_norm_eps"],
                   max_position_embeddings=d["max_position_embeddings"],
                   use_parallel_residual=d["use_parallel_residual"])


PRESETS = {"tiny": GPTNeoXStyleConfig()}


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@placement(inputs=Replicate(), outputs=Partial(), group="attn")
class Attention(nn.Module):
    def __init__(self, c: GPTNeoXStyleConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.hidden_size // c.num_heads
        self.rot, self.theta, self.max_positions = (int(self.head_dim * c.rotary_pct),
                                                    c.rope_theta, c.max_position_embeddings)
        self.query_key_value = nn.Linear(c.hidden_size, 3 * c.hidden_size)   # [nh*3D, H]
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)                 # [H, nh*D]
        self.register_buffer("cos", torch.empty(0), persistent=False)        # [P, Dr]
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.register_buffer("kv_cache", torch.empty(0), persistent=False)
        self.init_buffers()

    def init_buffers(self):
        dev = self.cos.device
        inv = 1.0 / (self.theta ** (torch.arange(0, self.rot, 2, device=dev).float() / self.rot))
        freqs = torch.outer(torch.arange(self.max_positions, device=dev).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def kv_cache_shape(self, num_blocks, page_size):
        return (2, num_blocks, page_size, self.num_heads, self.head_dim)

    def forward(self, x, positions, meta):
        t = x.shape[0]
        qkv = self.query_key_value(x).view(t, -1, 3 * self.head_dim)   # [T, nh, 3D]
        q, k, v = qkv.chunk(3, dim=-1)                                  # [T, nh, D] each
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        q_rot, q_pass = q[..., :self.rot], q[..., self.rot:]            # partial rotary
        k_rot, k_pass = k[..., :self.rot], k[..., self.rot:]
        q = torch.cat([q_rot * cos + rotate_half(q_rot) * sin, q_pass], dim=-1)
        k = torch.cat([k_rot * cos + rotate_half(k_rot) * sin, k_pass], dim=-1)
        o = gqa_attention(q, k, v.contiguous(), self.kv_cache, meta.slot_mapping,
                          meta.block_tables, meta.query_start_loc, meta.seq_lens,
                          meta.num_decodes, self.head_dim ** -0.5)
        return self.dense(o.reshape(t, -1))                             # [T, H] P + bias


@placement(inputs=Replicate(), outputs=Partial(), group="dense")
class MLP(nn.Module):
    def __init__(self, c: GPTNeoXStyleConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, c.intermediate_size)
        self.dense_4h_to_h = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(nn.functional.gelu(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, c: GPTNeoXStyleConfig):
        super().__init__()
        self.parallel = c.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention, self.mlp = Attention(c), MLP(c)

    def forward(self, x, positions, meta):
        a = self.attention(self.input_layernorm(x), positions, meta)
        if self.parallel:           # both partial sums first: one all-reduce for the layer
            return self.mlp(self.post_attention_layernorm(x)) + a + x
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: GPTNeoXStyleConfig):
        super().__init__()
        self.embed_in = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class GPTNeoXStyle(nn.Module):
    CHECKPOINT_MAP = (Rule("{*}", "{*}"),)         # parameter names are the checkpoint's

    def __init__(self, c: GPTNeoXStyleConfig):
        super().__init__()
        self.config = c
        self.gpt_neox = Backbone(c)
        self.embed_out = nn.Linear(c.hidden_size, c.vocab_size, bias=False)   # untied

    def forward(self, input_ids, positions, meta):
        x = self.gpt_neox.embed_in(input_ids)                           # [T, H] R
        for layer in self.gpt_neox.layers:
            x = layer(x, positions, meta)
        return self.embed_out(self.gpt_neox.final_layer_norm(x[meta.logits_indices]))


CONFIG, MODEL = GPTNeoXStyleConfig, GPTNeoXStyle
HF_MODEL_TYPES = ("gpt_neox",)
