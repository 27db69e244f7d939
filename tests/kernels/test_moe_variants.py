"""moe_experts variants (kernels/moe.py): per-expert biases b13/b2, the "swigluoai"
activation with alpha/limit, interleaved gate/up rows, strided (transposed) weights.

Oracles: a dense "every expert on every token" formulation written here in float64, and
transformers' own `GptOssExperts` (the module GPT-OSS checkpoints run in) on the same
tensors in its [E, H, 2I] / [E, I, H] layout. Also: with no variant the reference computes
bit for bit what the op computed before the variants existed (a frozen copy), the variants
split over expert-parallel ranks sum to the whole, the down bias under the width split is
added once, and bad variant arguments are refused with the argument named.

Legend: T tokens, H hidden, E experts, I expert width, k experts per token.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tscompile.kernels import moe_experts, moe_route
from tscompile.kernels.moe import moe_experts_reference

ALPHA, LIMIT = 1.702, 7.0


def dense(x, w13, w2, weights, ids, b13=None, b2=None, activation="silu", alpha=ALPHA,
          limit=LIMIT, interleaved=False):
    """Every expert on every token in float64, combined by a one-hot weight matrix."""
    num_experts = w13.shape[0]
    h = torch.einsum("th,eih->eti", x.double(), w13.double())              # [E, T, 2I]
    if b13 is not None:
        h = h + b13.double()[:, None, :]
    if interleaved:
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if activation == "silu":
        act = F.silu(gate) * up
    else:
        gate = torch.minimum(gate, torch.tensor(limit, dtype=torch.float64))
        up = torch.clamp(up, -limit, limit)
        act = (up + 1) * gate / (1 + torch.exp(-alpha * gate))
    y = torch.einsum("eti,ehi->eth", act, w2.double())                     # [E, T, H]
    if b2 is not None:
        y = y + b2.double()[:, None, :]
    combine = (F.one_hot(ids.long(), num_experts).double()
               * weights.double()[..., None]).sum(1)                       # [T, E]
    return torch.einsum("te,eth->th", combine, y)


def gpt_oss_inputs(tokens=9, experts=6, hidden=24, width=20, k=3, scale=3.0, seed=0):
    """GPT-OSS's tensors as HF stores them (input-major, gate/up interleaved), wide enough
    that the clamp at LIMIT bites, plus the op's views of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, hidden, 2 * width, generator=g) * hidden ** -0.5 * scale
    gate_up_bias = torch.randn(experts, 2 * width, generator=g)
    down = torch.randn(experts, width, hidden, generator=g) * width ** -0.5
    down_bias = torch.randn(experts, hidden, generator=g)
    weights, ids = moe_route(torch.randn(tokens, experts, generator=g) * 2, None, k, "softmax",
                             True, 1, 1, 1.0)
    return dict(x=x, gate_up=gate_up, gate_up_bias=gate_up_bias, down=down,
                down_bias=down_bias, weights=weights, ids=ids)


def op_args(t):
    return ((t["x"], t["gate_up"].transpose(1, 2), t["down"].transpose(1, 2), t["weights"],
             t["ids"]),
            dict(b13=t["gate_up_bias"], b2=t["down_bias"], activation="swigluoai", alpha=ALPHA,
                 limit=LIMIT, interleaved=True))


def test_gpt_oss_experts_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    t = gpt_oss_inputs()
    cfg = transformers.GptOssConfig(hidden_size=24, intermediate_size=20, num_local_experts=6,
                                    swiglu_limit=LIMIT)
    hf = GptOssExperts(cfg)
    with torch.no_grad():
        hf.gate_up_proj.copy_(t["gate_up"])
        hf.gate_up_proj_bias.copy_(t["gate_up_bias"])
        hf.down_proj.copy_(t["down"])
        hf.down_proj_bias.copy_(t["down_bias"])
        want = hf(t["x"], t["ids"].long(), t["weights"])
    pre = torch.einsum("th,ehi->eti", t["x"], t["gate_up"]) + t["gate_up_bias"][:, None]
    assert (pre[..., 0::2] > LIMIT).any() and (pre[..., 1::2].abs() > LIMIT).any()
    args, kw = op_args(t)
    got = moe_experts(*args, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), dense(*args, **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("biases", ["none", "b13", "b2", "both"])
def test_reference_variants_against_dense(activation, interleaved, biases):
    g = torch.Generator().manual_seed(1)
    num_tokens, num_experts, hidden, width, k = 11, 5, 16, 12, 2
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * width, hidden, generator=g) * 0.8
    w2 = torch.randn(num_experts, hidden, width, generator=g) * width ** -0.5
    b13 = torch.randn(num_experts, 2 * width, generator=g) if biases in ("b13", "both") else None
    b2 = torch.randn(num_experts, hidden, generator=g) if biases in ("b2", "both") else None
    weights, ids = moe_route(torch.randn(num_tokens, num_experts, generator=g), None, k,
                             "softmax", False, 1, 1, 1.0)
    kw = dict(b13=b13, b2=b2, activation=activation, alpha=1.3, limit=1.5,
              interleaved=interleaved)
    got = moe_experts(x, w13, w2, weights, ids, **kw)
    torch.testing.assert_close(got.double(), dense(x, w13, w2, weights, ids, **kw),
                               atol=1e-5, rtol=1e-5)


def _frozen_reference(x, w13, w2, topk_weights, topk_ids, expert_start=0):
    """moe_experts_reference as it was before the variants (copied verbatim)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long() - expert_start
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    flat_w = topk_weights.reshape(-1).float()
    held = (flat_ids >= 0) & (flat_ids < w13.shape[0])
    for e in torch.unique(flat_ids[held]).tolist():
        sel = (flat_ids == e).nonzero().squeeze(1)
        tokens = token_of[sel]
        h = F.linear(x[tokens], w13[e])
        gate, up = h.chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, tokens, y.float() * flat_w[sel, None])
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 4])
def test_no_variant_is_bit_identical_to_before(dtype, start):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 16, generator=g).to(dtype)
    w13 = torch.randn(4, 24, 16, generator=g).to(dtype)
    w2 = torch.randn(4, 16, 12, generator=g).to(dtype)
    weights, ids = moe_route(torch.randn(7, 8, generator=g), None, 3, "softmax", True, 1, 1,
                             1.0)
    want = _frozen_reference(x, w13, w2, weights, ids, start)
    assert torch.equal(moe_experts_reference(x, w13, w2, weights, ids, start), want)
    assert torch.equal(moe_experts(x, w13, w2, weights, ids, start), want)


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_parts_with_biases_sum_to_full(ranks):
    """Each rank holds E/ranks whole experts and their biases: the parts sum to the whole."""
    t = gpt_oss_inputs(tokens=10, experts=8, k=3, seed=3)
    args, kw = op_args(t)
    full = moe_experts(*args, **kw)
    x, w13, w2, weights, ids = args
    local = 8 // ranks
    parts = []
    for s in range(0, 8, local):
        part_kw = {**kw, "b13": kw["b13"][s:s + local], "b2": kw["b2"][s:s + local]}
        parts.append(moe_experts(x, w13[s:s + local], w2[s:s + local], weights, ids, s,
                                 **part_kw))
    torch.testing.assert_close(sum(parts), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ranks", [2, 4])
def test_width_split_with_down_bias_on_rank0_sums_to_full(ranks):
    """MoE TP: each rank holds a contiguous slice of the interleaved 2I (whole gate/up
    pairs) and of I in down; the down bias is passed whole on rank 0 and as zeros on the
    others (what the compiler's `bias * (rank == 0)` does): the parts sum to the whole."""
    t = gpt_oss_inputs(tokens=10, experts=6, width=20, k=2, seed=4)
    args, kw = op_args(t)
    full = moe_experts(*args, **kw)
    x, w13, w2, weights, ids = args
    two_i = w13.shape[1] // ranks
    parts = []
    for r in range(ranks):
        part_kw = {**kw, "b13": kw["b13"][:, r * two_i:(r + 1) * two_i],
                   "b2": kw["b2"] * (r == 0)}
        parts.append(moe_experts(x, w13[:, r * two_i:(r + 1) * two_i],
                                 w2[:, :, r * two_i // 2:(r + 1) * two_i // 2], weights, ids,
                                 **part_kw))
    torch.testing.assert_close(sum(parts), full, atol=1e-5, rtol=0)


def test_registry_query_carries_the_variants(monkeypatch):
    """A backend is asked about the variants that are on (so one without them refuses)."""
    from tscompile.kernels import registry
    seen = []
    real = registry.REGISTRY.select
    t = gpt_oss_inputs()
    args, kw = op_args(t)
    monkeypatch.setattr(registry.REGISTRY, "select",
                        lambda op, q: (seen.append(dict(q.shape)), real(op, q))[1])
    moe_experts(*args, **kw)
    moe_experts(*args)
    assert {"bias": 1, "swigluoai": 1, "interleaved": 1}.items() <= seen[0].items()
    assert not {"bias", "swigluoai", "interleaved"} & set(seen[1])


@pytest.mark.parametrize("kw, match", [
    (dict(activation="gelu"), r"activation must be one of \('silu', 'swigluoai'\), got 'gelu'"),
    (dict(activation="swigluoai", limit=0.0), "swigluoai needs limit > 0"),
    (dict(b13=torch.zeros(4, 8)), r"b13 must be a floating \[4, 16\]"),
    (dict(b2=torch.zeros(3, 8)), r"b2 must be a floating \[4, 8\]"),
    (dict(b2=torch.zeros(4, 8, dtype=torch.int32)), r"b2 must be a floating"),
])
def test_bad_variant_arguments_are_refused(kw, match):
    w13, w2 = torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    with pytest.raises(ValueError, match=match):
        moe_experts(torch.randn(2, 8), w13, w2, torch.ones(2, 1),
                    torch.zeros(2, 1, dtype=torch.int32), **kw)
