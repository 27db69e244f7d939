"""A test-only architecture, not in models/: a Mixtral-style decoder written in plain torch
(RMSNorm, RoPE and a top-2 softmax MoE over a list of expert MLPs, all from elementwise
ops, reductions, topk and linears) plus the paged attention kernel for the KV cache. Its
only parallelism code is the two @placement lines: porting by annotation.

Legend: T tokens, H hidden, Hq/Hkv heads, D head dim, I expert width, E experts, k top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tscompile.annotations import Partial, Replicate, placement
from tscompile.kernels import gqa_attention


@dataclass(frozen=True, slots=True)
class MixtralStyleConfig:
    vocab_size: int = 128
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    num_experts: int = 4
    top_k: int = 2
    expert_width: int = 24
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None


PRESETS = {"tiny": MixtralStyleConfig()}


class Norm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x, cos, sin):
    """x [T, h, D]; cos, sin [T, 1, D/2] (NeoX halves)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@placement(inputs=Replicate(), outputs=Partial(), group="attn")
class Attention(nn.Module):
    def __init__(self, c: MixtralStyleConfig):
        super().__init__()
        self.num_kv_heads, self.head_dim = c.num_kv_heads, c.head_dim
        self.wq = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.max_positions = c.max_position_embeddings
        self.register_buffer("cos", torch.empty(0), persistent=False)   # [P, D/2]
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.register_buffer("kv_cache", torch.empty(0), persistent=False)
        self.init_buffers()

    def init_buffers(self):
        """RoPE tables (recomputed by the runtime after materialising a meta model)."""
        dev, d = self.cos.device, self.head_dim
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
        angles = torch.outer(torch.arange(self.max_positions, device=dev).float(), inv)
        self.cos, self.sin = angles.cos(), angles.sin()

    def kv_cache_shape(self, num_blocks, page_size):
        return (2, num_blocks, page_size, self.num_kv_heads, self.head_dim)

    def forward(self, x, positions, meta):
        t = x.shape[0]
        q = self.wq(x).view(t, -1, self.head_dim)
        k = self.wk(x).view(t, -1, self.head_dim)
        v = self.wv(x).view(t, -1, self.head_dim)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        o = gqa_attention(q, k, v, self.kv_cache, meta.slot_mapping, meta.block_tables,
                          meta.query_start_loc, meta.seq_lens, meta.num_decodes,
                          self.head_dim ** -0.5)
        return self.wo(o.reshape(t, -1))


class Expert(nn.Module):
    def __init__(self, c: MixtralStyleConfig):
        super().__init__()
        self.w1 = nn.Linear(c.hidden_size, c.expert_width, bias=False)
        self.w3 = nn.Linear(c.hidden_size, c.expert_width, bias=False)
        self.w2 = nn.Linear(c.expert_width, c.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


@placement(inputs=Replicate(), outputs=Partial(), group="moe")
class SparseMoE(nn.Module):
    def __init__(self, c: MixtralStyleConfig):
        super().__init__()
        self.top_k = c.top_k
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(c) for _ in range(c.num_experts))

    def forward(self, x):
        probs = self.gate(x).softmax(dim=-1)                       # [T, E]
        weights, ids = probs.topk(self.top_k, dim=-1)              # [T, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = None
        for e, expert in enumerate(self.experts):                  # dense over experts
            w_e = (weights * (ids == e)).sum(dim=-1, keepdim=True)  # [T, 1]
            y = expert(x) * w_e
            out = y if out is None else out + y
        return out


class Block(nn.Module):
    def __init__(self, c: MixtralStyleConfig):
        super().__init__()
        self.attn_norm, self.attn = Norm(c.hidden_size, c.rms_norm_eps), Attention(c)
        self.moe_norm, self.moe = Norm(c.hidden_size, c.rms_norm_eps), SparseMoE(c)

    def forward(self, x, positions, meta):
        x = x + self.attn(self.attn_norm(x), positions, meta)
        return x + self.moe(self.moe_norm(x))


class MixtralStyle(nn.Module):
    def __init__(self, c: MixtralStyleConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = Norm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids, positions, meta):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, positions, meta)
        return self.lm_head(self.norm(x[meta.logits_indices]))


CONFIG, MODEL = MixtralStyleConfig, MixtralStyle
