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
  expert_start=0) -> [T, H]`: out[t] = sum_j weights[t, j] * W2[e] (silu(W1[e] x) * W3[e] x),
  e = ids[t, j], with w13[e] = [W1 (gate) ; W3 (up)] stacked on dim 1.
  Expert parallelism: w13/w2 may hold only the experts [expert_start, expert_start + E) of a
  larger global set (E is then the local count); ids stay global, and a (token, expert) pair
  whose expert is not held here contributes nothing. The output is then this rank's partial
  sum (placement P): summed over the ranks that together hold every expert, it equals the
  single-device result.
  Napkin math at decode: every touched expert's 3*I*H weights are read once; with T*k >> E
  all E experts are touched, so bytes ~ 3*E*I*H*elem: bound by reading weights.
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


@register("moe_experts", "reference")
def moe_experts_reference(x, w13, w2, topk_weights, topk_ids, expert_start=0):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long() - expert_start           # local expert ids
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    flat_w = topk_weights.reshape(-1).float()
    held = (flat_ids >= 0) & (flat_ids < w13.shape[0])              # experts held here
    for e in torch.unique(flat_ids[held]).tolist():
        sel = (flat_ids == e).nonzero().squeeze(1)
        tokens = token_of[sel]
        h = F.linear(x[tokens], w13[e])                    # [n, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])             # [n, H]
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
                topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
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
    return dispatch("moe_experts", x, w13, w2, topk_weights, topk_ids, expert_start,
                    num_experts=e, hidden=h, width=two_i // 2)


@moe_experts.register_fake
def _(x, w13, w2, topk_weights, topk_ids, expert_start=0):
    return torch.empty_like(x)
