"""A test-only architecture, not in models/: GPT-2 (Radford et al. 2019) written as a model
author would, in plain torch with Hugging Face's parameter names: Conv1D projections
(`addmm(bias, x, weight [in, out])`, biased everywhere), the fused c_attn split into q, k, v,
learned position embeddings, LayerNorm, tanh GELU, an LM head tied to the embedding. The
row-parallel c_proj linears keep their biases inside modules whose output is a partial sum.
Its only parallelism code is the two @placement lines.

Legend: T tokens, H hidden, nh heads, D head dim, I = 4H MLP width, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tscompile.annotations import Partial, Replicate, placement
from tscompile.kernels import gqa_attention
from tscompile.models.checkpoint import Rule


@dataclass(frozen=True, slots=True)
class GPT2StyleConfig:
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 256
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = None


PRESETS = {"tiny": GPT2StyleConfig()}


class Conv1D(nn.Module):
    """HF's Conv1D: a linear whose weight is stored [in, out]."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))      # [in, out]
        self.bias = nn.Parameter(torch.empty(nf))

    def forward(self, x):                                    # [T, in] -> [T, out]
        return torch.addmm(self.bias, x, self.weight)


@placement(inputs=Replicate(), outputs=Partial(), group="attn")
class Attention(nn.Module):
    def __init__(self, c: GPT2StyleConfig):
        super().__init__()
        self.hidden, self.num_heads, self.head_dim = (c.hidden_size, c.num_heads,
                                                      c.hidden_size // c.num_heads)
        self.c_attn = Conv1D(3 * c.hidden_size, c.hidden_size)   # [H, 3H]: [q ; k ; v]
        self.c_proj = Conv1D(c.hidden_size, c.hidden_size)
        self.register_buffer("kv_cache", torch.empty(0), persistent=False)

    def kv_cache_shape(self, num_blocks, page_size):
        return (2, num_blocks, page_size, self.num_heads, self.head_dim)

    def forward(self, x, positions, meta):
        t = x.shape[0]
        q, k, v = self.c_attn(x).split(self.hidden, dim=-1)     # [T, H] each
        q, k, v = (y.reshape(t, -1, self.head_dim) for y in (q, k, v))   # [T, nh, D]
        o = gqa_attention(q, k, v, self.kv_cache, meta.slot_mapping, meta.block_tables,
                          meta.query_start_loc, meta.seq_lens, meta.num_decodes,
                          self.head_dim ** -0.5)
        return self.c_proj(o.reshape(t, -1))                      # [T, H] P + bias


@placement(inputs=Replicate(), outputs=Partial(), group="dense")
class MLP(nn.Module):
    def __init__(self, c: GPT2StyleConfig):
        super().__init__()
        self.c_fc = Conv1D(4 * c.hidden_size, c.hidden_size)
        self.c_proj = Conv1D(c.hidden_size, 4 * c.hidden_size)

    def forward(self, x):
        return self.c_proj(nn.functional.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c: GPT2StyleConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = Attention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, positions, meta):
        x = x + self.attn(self.ln_1(x), positions, meta)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, c: GPT2StyleConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.h = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class GPT2Style(nn.Module):
    CHECKPOINT_MAP = (Rule("{*}", "{*}"),)

    def __init__(self, c: GPT2StyleConfig):
        super().__init__()
        self.config = c
        self.transformer = Transformer(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids, positions, meta):
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)   # [T, H] R
        for block in self.transformer.h:
            x = block(x, positions, meta)
        return self.lm_head(self.transformer.ln_f(x[meta.logits_indices]))


CONFIG, MODEL = GPT2StyleConfig, GPT2Style
