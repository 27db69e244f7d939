"""The tscompile kernel ops. Tensor inputs in argument order; step metadata (slot_mapping,
block_tables, query_start_loc, seq_lens) and RoPE tables are always R.

  rms_norm(x, w)                 x S(d), d not the normalised (last) dim -> S(d); w R
  fused_add_rms_norm(x, r, w)    x, r S(d) (d not last) -> (S(d), S(d))
  rope(x [T, H, D], pos, table)  heads split: S(1) -> S(1)
  silu_and_mul(x [T, 2I])        [gate ; up] split per chunk: S(-1)x2 -> S(-1)
  gqa_attention(q, k, v, cache [2, NB, PS, Hkv, D], meta..., sinks [Hq])
                                 heads: S(1)^3, cache S(3), sinks S(0) -> S(1)
  mla_attention(q_nope, q_pe, kv_c, k_pe, cache, w_kc [Nh..], w_vc [Nh..], meta...)
                                 heads split, the latent cache shared: S(1) S(1) R R R S(0) S(0)
  moe_route(logits, bias)        R only (top-k needs every expert's score)
  moe_experts(x, w13 [E, 2I, H], w2 [E, H, I], weights, ids, b13 [E, 2I], b2 [E, H])
                                 tensor parallel: the expert width split, w13 and b13 S(1)x2
                                 (S(1) when interleaved: each rank holds whole gate/up row
                                 pairs), w2 S(2), b2 R counted once (a row-parallel bias:
                                 rank 0 adds it) -> P; expert parallel (ctx.style "ep"):
                                 whole experts, w13 w2 b13 b2 S(0) -> P (each expert's bias
                                 lives with it, on one rank)
Inputs are matched to roles by the op schema's argument names (positional or keyword), so an
optional tensor (sinks, b13, b2) may be present or not.
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


def _roles(node: fx.Node) -> list[str]:
    """The schema argument name of each of tensor_args(node), in its order (args, then
    kwargs, as tensor_args flattens them)."""
    schema = node.target._schema.arguments
    names = [schema[i].name for i, a in enumerate(node.args) if a in tensor_args(node)]
    return names + [k for k, a in node.kwargs.items() if a in tensor_args(node)]


def _by_role(node: fx.Node, placements: dict[str, object], out, once: tuple[str, ...] = ()
             ) -> Strategy:
    """A strategy from placements by argument name (unnamed ones R); `once` names the
    R operands counted on one rank only (Strategy.once)."""
    roles = _roles(node)
    return Strategy(tuple(placements.get(r, R) for r in roles), out,
                    tuple(i for i, r in enumerate(roles) if r in once))


def _arg(node: fx.Node, name: str, default):
    """A non-tensor argument of a tscompile op by schema name (positional or keyword)."""
    schema = node.target._schema.arguments
    for i, a in enumerate(node.args):
        if schema[i].name == name:
            return a
    return node.kwargs.get(name, default)


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
    # One sink logit per query head [Hq]: split with the heads (a rank's queries see their
    # own heads' sinks). The step metadata stays R.
    heads = dict(q=Shard(1), k=Shard(1), v=Shard(1), kv_cache=Shard(3), sinks=Shard(0))
    return [_by_role(node, heads, Shard(1)), _all_r(node, R)]


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
    if ctx.style == "ep":      # whole experts, biases with them: each added on one rank
        split = _by_role(node, dict(w13=Shard(0), w2=Shard(0), b13=Shard(0), b2=Shard(0)), P)
    else:                      # the width I split; gate and up of a column stay together
        gate_up = Shard(1) if _arg(node, "interleaved", False) else Shard(1, 2)
        split = _by_role(node, dict(w13=gate_up, b13=gate_up, w2=Shard(2)), P, once=("b2",))
    return [split, _all_r(node, R)]
