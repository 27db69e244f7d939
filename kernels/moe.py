"""Mixture-of-experts: routing and the routed expert MLPs.

Legend: T tokens, H hidden, E experts, I expert width, k experts per token.

* `tscompile::moe_route(router_logits [T, E], correction_bias [E] | None, top_k, scoring,
  renormalize, num_groups, topk_groups, routed_scaling_factor) -> (weights [T, k] fp32,
  ids [T, k] int32)`.
    - `scoring="softmax"` (Mixtral, Qwen3-MoE, DeepSeek-V2 "greedy"): p = softmax(logits);
      top-k of p; optionally renormalised to sum to 1; times `routed_scaling_factor`.
      With `num_groups > 1` the groups are scored as below (sum of the two best), which is
      not DeepSeek-V2's "group_limited_greedy" (a group's best expert): no model file uses it.
    - `scoring="sigmoid"` (DeepSeek-V3, Kimi K2): s = sigmoid(logits); choice score
      s + correction_bias; experts are split into `num_groups` groups, each group scored by
      the sum of its two best choice scores, only the best `topk_groups` groups compete;
      top-k by choice score, but the weights are the *uncorrected* s, optionally renormalised,
      times `routed_scaling_factor`.
* `tscompile::moe_experts(x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights [T, k], ids [T, k],
  expert_start=0, b13=None, b2=None, activation="silu", alpha=1.702, limit=7.0,
  interleaved=False) -> [T, H]`:
  out[t] = sum_j weights[t, j] * (W2[e] act(W13[e] x + b13[e]) + b2[e]), e = ids[t, j].
  w13[e] holds gate and up: stacked [W1 (gate) ; W3 (up)] on dim 1, or, with
  `interleaved=True`, alternating rows (gate_i = row 2i, up_i = row 2i + 1: GPT-OSS's fused
  `gate_up_proj`); b13 [E, 2I] follows the same layout. The weights may be strided views
  (GPT-OSS stores [E, H, 2I] and [E, I, H]; the model passes `.transpose(1, 2)`).
    - `activation="silu"` (SwiGLU): act = silu(gate) * up.
    - `activation="swigluoai"` (GPT-OSS's clamped SwiGLU): gate = min(gate, limit),
      up = clamp(up, -limit, limit), act = (up + 1) * gate * sigmoid(alpha * gate)
      (`modeling_gpt_oss.GptOssExperts._apply_gate`).
  b13 / b2 are optional per-expert biases: b13 on the gate/up projection, b2 on the down
  projection, each weighted by the routing weight like the rest of its expert's output.
  Pass the arguments after `ids` by keyword (the compiler rewrites `expert_start`).
  Expert parallelism: w13/w2 (and b13/b2) may hold only the experts [expert_start,
  expert_start + E) of a larger global set (E is then the local count); ids stay global,
  and a (token, expert) pair whose expert is not held here contributes nothing. The output
  is then this rank's partial sum (placement P): summed over the ranks that together hold
  every expert, it equals the single-device result. Under MoE tensor parallelism (the
  expert width I split) b2 is a row-parallel bias: the compiler passes it whole on rank 0
  and zero elsewhere, so the sum over ranks adds it once (passes/rules/kernels.py).
  Napkin math at decode: every touched expert's 3*I*H weights are read once; with T*k >> E
  all E experts are touched, so bytes ~ 3*E*I*H*elem: bound by reading weights; the biases
  add (2I + H)*elem per expert, noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import dispatch, kernel_op, register


@register("moe_route", "reference")
def moe_route_reference(router_logits, correction_bias, top_k, scoring, renormalize,
                        num_groups, topk_groups, routed_scaling_factor):
    logits = router_logits.float()
    num_tokens, num_experts = logits.shape
    if scoring == "softmax":
        scores = logits.softmax(dim=-1)
        choice = scores
    else:
        scores = logits.sigmoid()
        choice = scores + correction_bias.float() if correction_bias is not None else scores
    if num_groups > 1:
        grouped = choice.view(num_tokens, num_groups, num_experts // num_groups)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_groups, dim=-1).indices, True)
        keep = keep[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


ACTIVATIONS = ("silu", "swigluoai")


def gate_up_activation(h: torch.Tensor, activation: str, alpha: float, limit: float,
                       interleaved: bool) -> torch.Tensor:
    """[n, 2I] gate/up pre-activations -> [n, I] (the layout and formulas of the docstring)."""
    gate, up = (h[..., 0::2], h[..., 1::2]) if interleaved else h.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@register("moe_experts", "reference")
def moe_experts_reference(x, w13, w2, topk_weights, topk_ids, expert_start=0, b13=None,
                          b2=None, activation="silu", alpha=1.702, limit=7.0,
                          interleaved=False):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long() - expert_start           # local expert ids
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    flat_w = topk_weights.reshape(-1).float()
    held = (flat_ids >= 0) & (flat_ids < w13.shape[0])              # experts held here
    for e in torch.unique(flat_ids[held]).tolist():
        sel = (flat_ids == e).nonzero().squeeze(1)
        tokens = token_of[sel]
        h = F.linear(x[tokens], w13[e], None if b13 is None else b13[e])       # [n, 2I]
        act = gate_up_activation(h, activation, alpha, limit, interleaved)    # [n, I]
        y = F.linear(act, w2[e], None if b2 is None else b2[e])              # [n, H]
        out.index_add_(0, tokens, y.float() * flat_w[sel, None])
    return out.to(x.dtype)


@kernel_op("moe_route")
def moe_route(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
              scoring: str, renormalize: bool, num_groups: int, topk_groups: int,
              routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = router_logits.shape[-1]
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"moe_route: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moe_route: top_k={top_k} outside [1, {num_experts} experts]")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"moe_route: {num_experts} experts do not split into {num_groups} groups")
    if num_groups > 1 and not (1 <= topk_groups <= num_groups
                               and top_k <= topk_groups * (num_experts // num_groups)):
        raise ValueError(f"moe_route: topk_groups={topk_groups} of {num_groups} groups cannot "
                         f"supply top_k={top_k} experts")
    return dispatch("moe_route", router_logits, correction_bias, top_k, scoring, renormalize,
                    num_groups, topk_groups, routed_scaling_factor)


@moe_route.register_fake
def _(router_logits, correction_bias, top_k, scoring, renormalize, num_groups, topk_groups,
      routed_scaling_factor):
    t = router_logits.shape[0]
    return (router_logits.new_empty(t, top_k, dtype=torch.float32),
            router_logits.new_empty(t, top_k, dtype=torch.int32))


@kernel_op("moe_experts")
def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, expert_start: int = 0, b13: torch.Tensor | None = None,
                b2: torch.Tensor | None = None, activation: str = "silu", alpha: float = 1.702,
                limit: float = 7.0, interleaved: bool = False) -> torch.Tensor:
    e, two_i, h = w13.shape
    if expert_start < 0:
        raise ValueError(f"moe_experts: expert_start={expert_start} must be >= 0 (the global id "
                         f"of w13[0]; w13/w2 hold experts [expert_start, expert_start + {e}))")
    if x.shape[-1] != h or w2.shape != (e, h, two_i // 2):
        raise ValueError(f"moe_experts: x [T, {x.shape[-1]}], w13 {list(w13.shape)} and w2 "
                         f"{list(w2.shape)} disagree (expected w2 [{e}, {h}, {two_i // 2}])")
    t = x.shape[0]
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != t:
        raise ValueError(f"moe_experts: topk_weights {list(topk_weights.shape)} and topk_ids "
                         f"{list(topk_ids.shape)} must both be [T={t}, k]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_experts: activation must be one of {ACTIVATIONS}, got "
                         f"{activation!r}")
    if activation == "swigluoai" and not limit > 0:
        raise ValueError(f"moe_experts: swigluoai needs limit > 0 (the clamp), got {limit}")
    for name, b, want in (("b13", b13, (e, two_i)), ("b2", b2, (e, h))):
        if b is not None and (tuple(b.shape) != want or not b.is_floating_point()):
            raise ValueError(f"moe_experts: {name} must be a floating {list(want)} tensor (one "
                             f"bias row per held expert), got {b.dtype} {list(b.shape)}; under "
                             f"expert parallelism it is split with the experts")
    # Registry facts for the variants that are on: a backend without them refuses.
    facts = {k: 1 for k, on in (("bias", b13 is not None or b2 is not None),
                                ("swigluoai", activation == "swigluoai"),
                                ("interleaved", interleaved)) if on}
    return dispatch("moe_experts", x, w13, w2, topk_weights, topk_ids, expert_start, b13, b2,
                    activation, alpha, limit, interleaved, num_experts=e, hidden=h,
                    width=two_i // 2, **facts)


@moe_experts.register_fake
def _(x, w13, w2, topk_weights, topk_ids, expert_start=0, b13=None, b2=None,
      activation="silu", alpha=1.702, limit=7.0, interleaved=False):
    return torch.empty_like(x)
