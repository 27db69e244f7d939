"""The tscompile kernel ops. Tensor inputs in argument order; step metadata (slot_mapping,
block_tables, query_start_loc, seq_lens) and RoPE tables are always R.

  rms_norm(x, w)                 x S(d), d not the normalised (last) dim -> S(d); w R
  fused_add_rms_norm(x, r, w)    x, r S(d) (d not last) -> (S(d), S(d))
  rope(x [T, H, D], pos, table)  heads split: S(1) -> S(1)
  silu_and_mul(x [T, 2I])        [gate ; up] split per chunk: S(-1)x2 -> S(-1)
  gqa_attention(q, k, v, cache [2, NB, PS, Hkv, D], meta...)   heads: S(1)^3, cache S(3) -> S(1)
  mla_attention(q_nope, q_pe, kv_c, k_pe, cache, w_kc [Nh..], w_vc [Nh..], meta...)
                                 heads split, the latent cache shared: S(1) S(1) R R R S(0) S(0)
  moe_route(logits, bias)        R only (top-k needs every expert's score)
  moe_experts(x, w13 [E, 2I, H], w2 [E, H, I], weights, ids)   tensor parallel: the expert
                                 width split, w13 S(1)x2, w2 S(2) -> P; expert parallel
                                 (ctx.style "ep"): whole experts, w13 S(0), w2 S(0) -> P
Every op also runs fully replicated (all R -> R), the choice when a group has one rank.
"""
from __future__ import annotations

from torch import fx

from tscompile.annotations import Partial, Shard
from tscompile.passes.ir import tensor_args
from tscompile.passes.rules import R, Ctx, Strategy, rule

P = Partial()


def _all_r(node: fx.Node, out) -> Strategy:
    return Strategy(tuple(R for _ in tensor_args(node)), out)


@rule("tscompile::rms_norm")
def rms_norm(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    n = node.meta["val"].ndim
    return [Strategy((Shard(d), R), Shard(d)) for d in range(n - 1)] + [_all_r(node, R)]


@rule("tscompile::fused_add_rms_norm", "tscompile::all_reduce_add_rms_norm")
def fused_add_rms_norm(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    n = node.meta["val"][0].ndim
    return ([Strategy((Shard(d), Shard(d), R), (Shard(d), Shard(d))) for d in range(n - 1)]
            + [_all_r(node, (R, R))])


@rule("tscompile::rope")
def rope(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    return [Strategy((Shard(1), R, R), Shard(1)), _all_r(node, R)]


@rule("tscompile::silu_and_mul")
def silu_and_mul(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    n = node.meta["val"].ndim
    found = [Strategy((Shard(n - 1, 2),), Shard(n - 1))]
    found += [Strategy((Shard(d),), Shard(d)) for d in range(n - 1)]
    return found + [_all_r(node, R)]


@rule("tscompile::gqa_attention")
def gqa_attention(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    meta = (R,) * (len(tensor_args(node)) - 4)
    return [Strategy((Shard(1), Shard(1), Shard(1), Shard(3)) + meta, Shard(1)),
            _all_r(node, R)]


@rule("tscompile::mla_attention")
def mla_attention(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    meta = (R,) * (len(tensor_args(node)) - 7)
    return [Strategy((Shard(1), Shard(1), R, R, R, Shard(0), Shard(0)) + meta, Shard(1)),
            _all_r(node, R)]


@rule("tscompile::moe_route")
def moe_route(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    return [_all_r(node, (R, R))]


@rule("tscompile::moe_experts")
def moe_experts(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    if ctx.style == "ep":
        split = Strategy((R, Shard(0), Shard(0), R, R), P)
    else:
        split = Strategy((R, Shard(1, 2), Shard(2), R, R), P)
    return [split, _all_r(node, R)]
