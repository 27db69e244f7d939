"""moe_route and moe_experts against formulations written independently here: per-token
loops for routing (what the papers describe), and a dense "every expert on every token,
combined by a one-hot weight matrix" for the experts. Plus input validation and the
registry's backend override.

Legend: T tokens, H hidden, E experts, I expert width, k experts per token, G groups.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tscompile.kernels import REGISTRY, moe_experts, moe_route


# ---------------------------------------------------------------------------------------
# Direct formulations

def route_softmax(logits: torch.Tensor, k: int, renormalize: bool, scale: float = 1.0
                  ) -> list[dict[int, float]]:
    """Mixtral / Qwen3-MoE: per token, p = softmax(logits); keep the k largest p."""
    out = []
    for row in logits.double():
        p = torch.exp(row - row.max())
        p = p / p.sum()
        chosen = sorted(range(len(p)), key=lambda e: -float(p[e]))[:k]
        total = sum(float(p[e]) for e in chosen) if renormalize else 1.0
        out.append({e: float(p[e]) / total * scale for e in chosen})
    return out


def route_sigmoid_grouped(logits: torch.Tensor, bias: torch.Tensor | None, k: int,
                          renormalize: bool, groups: int, topk_groups: int, scale: float
                          ) -> list[dict[int, float]]:
    """DeepSeek-V3: s = sigmoid(logits) decides the weights, s + bias decides the choice;
    a group's score is the sum of its two best biased scores; only the best topk_groups
    groups may supply experts."""
    out = []
    num_experts = logits.shape[1]
    size = num_experts // groups
    for row in logits.double():
        s = 1.0 / (1.0 + torch.exp(-row))
        c = s + (bias.double() if bias is not None else 0.0)
        group_score = []
        for g in range(groups):
            members = sorted((float(c[e]) for e in range(g * size, (g + 1) * size)),
                             reverse=True)
            group_score.append(sum(members[:2]))
        best_groups = sorted(range(groups), key=lambda g: -group_score[g])[:topk_groups]
        allowed = [e for g in best_groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: -float(c[e]))[:k]
        total = sum(float(s[e]) for e in chosen) if renormalize else 1.0
        out.append({e: float(s[e]) / total * scale for e in chosen})
    return out


def experts_dense(x, w13, w2, weights, ids):
    """Every expert on every token ([E, T, H]), combined by a one-hot weight matrix [T, E]."""
    num_experts = w13.shape[0]
    gate, up = torch.einsum("th,eih->eti", x.double(), w13.double()).chunk(2, dim=-1)
    y = torch.einsum("eti,ehi->eth", F.silu(gate) * up, w2.double())       # [E, T, H]
    combine = (F.one_hot(ids.long(), num_experts).double()
               * weights.double()[..., None]).sum(1)                       # [T, E]
    return torch.einsum("te,eth->th", combine, y)


def assert_same_routing(weights, ids, expected: list[dict[int, float]], atol=1e-6):
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (len(expected), len(expected[0]))
    for t, want in enumerate(expected):
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert set(got) == set(want), f"token {t}: chose {sorted(got)}, expected {sorted(want)}"
        for e in want:
            assert abs(got[e] - want[e]) < atol, f"token {t} expert {e}: {got[e]} vs {want[e]}"


# ---------------------------------------------------------------------------------------
# moe_route

@pytest.mark.parametrize("num_tokens, num_experts, k", [(1, 8, 2), (9, 8, 2), (5, 16, 1),
                                                        (4, 6, 6), (7, 128, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_softmax(num_tokens, num_experts, k, renormalize):
    logits = torch.randn(num_tokens, num_experts) * 2
    weights, ids = moe_route(logits, None, k, "softmax", renormalize, 1, 1, 1.0)
    assert_same_routing(weights, ids, route_softmax(logits, k, renormalize))
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens))


def test_route_softmax_scaling_and_low_precision_logits():
    logits = torch.randn(6, 16) * 2
    weights, ids = moe_route(logits.bfloat16(), None, 4, "softmax", True, 1, 1, 2.5)
    # The router runs in fp32 whatever the logits' dtype; compare on the rounded logits.
    assert_same_routing(weights, ids, route_softmax(logits.bfloat16().float(), 4, True, 2.5))


@pytest.mark.parametrize("groups, topk_groups, k", [(1, 1, 4), (4, 2, 4), (8, 3, 6),
                                                    (8, 8, 8), (4, 1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_sigmoid_grouped(groups, topk_groups, k, with_bias, renormalize):
    num_experts = 32
    logits = torch.randn(7, num_experts) * 2
    # A bias as large as the scores, so choosing by s + bias but weighting by s is visible.
    bias = torch.randn(num_experts) * 0.5 if with_bias else None
    weights, ids = moe_route(logits, bias, k, "sigmoid", renormalize, groups, topk_groups, 2.5)
    assert_same_routing(weights, ids, route_sigmoid_grouped(logits, bias, k, renormalize,
                                                            groups, topk_groups, 2.5))


def test_route_bias_changes_choice_not_weights():
    logits = torch.zeros(1, 4)
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])   # every s is 0.5; the bias alone picks 2
    weights, ids = moe_route(logits, bias, 1, "sigmoid", False, 1, 1, 1.0)
    assert ids.tolist() == [[2]] and weights.tolist() == [[0.5]]


def test_group_limit_excludes_experts_outside_best_groups():
    # Group 0 = experts 0-3 holds the single best expert but a weak second; group 1 has two
    # good ones. With one group allowed, the top-2 pair score picks group 1.
    logits = torch.tensor([[5.0, -5.0, -5.0, -5.0, 3.0, 3.0, -5.0, -5.0]])
    _, ids = moe_route(logits, None, 2, "sigmoid", True, 2, 1, 1.0)
    assert set(ids[0].tolist()) == {4, 5}
    _, ids = moe_route(logits, None, 2, "sigmoid", True, 1, 1, 1.0)
    assert set(ids[0].tolist()) == {0, 4} or set(ids[0].tolist()) == {0, 5}


# ---------------------------------------------------------------------------------------
# moe_experts

def _expert_weights(num_experts: int, hidden: int, width: int):
    w13 = torch.randn(num_experts, 2 * width, hidden) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, width) * width ** -0.5
    return w13, w2


@pytest.mark.parametrize("num_tokens, num_experts, k", [
    (1, 4, 2),     # a single decode token
    (2, 8, 2),     # at most 4 of 8 experts get tokens
    (9, 4, 1),     # top-1
    (16, 6, 3),
])
def test_experts_against_dense(num_tokens, num_experts, k):
    hidden, width = 24, 20
    x = torch.randn(num_tokens, hidden)
    w13, w2 = _expert_weights(num_experts, hidden, width)
    weights, ids = moe_route(torch.randn(num_tokens, num_experts) * 2, None, k, "softmax",
                             False, 1, 1, 1.0)
    out = moe_experts(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), experts_dense(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)


def test_experts_with_no_tokens_contribute_nothing():
    hidden, width = 16, 12
    x = torch.randn(3, hidden)
    w13, w2 = _expert_weights(8, hidden, width)
    ids = torch.tensor([[1, 5], [5, 1], [1, 5]], dtype=torch.int32)   # experts 0,2,3,4,6,7 idle
    weights = torch.rand(3, 2) + 0.1
    out = moe_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(out.double(), experts_dense(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)
    # Garbage in the idle experts changes nothing.
    idle = torch.tensor([0, 2, 3, 4, 6, 7])
    w13[idle], w2[idle] = float("nan"), float("nan")
    torch.testing.assert_close(moe_experts(x, w13, w2, weights, ids), out)


def test_experts_low_precision_input():
    hidden, width = 32, 16
    x = torch.randn(5, hidden).bfloat16()
    w13, w2 = (w.bfloat16() for w in _expert_weights(4, hidden, width))
    weights, ids = moe_route(torch.randn(5, 4), None, 2, "softmax", True, 1, 1, 1.0)
    out = moe_experts(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), experts_dense(x, w13, w2, weights, ids),
                               rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------
# Bad inputs

def test_route_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match=r"top_k=9.*8 experts"):
        moe_route(torch.randn(2, 8), None, 9, "softmax", True, 1, 1, 1.0)
    with pytest.raises(ValueError, match="top_k=0"):
        moe_route(torch.randn(2, 8), None, 0, "softmax", True, 1, 1, 1.0)


def test_route_rejects_groups_not_dividing_experts():
    with pytest.raises(ValueError, match=r"10 experts do not split into 4 groups"):
        moe_route(torch.randn(2, 10), None, 2, "sigmoid", True, 4, 2, 1.0)


def test_route_rejects_groups_too_few_for_top_k():
    with pytest.raises(ValueError, match=r"topk_groups=1 of 4 groups cannot supply top_k=3"):
        moe_route(torch.randn(2, 8), None, 3, "sigmoid", True, 4, 1, 1.0)


def test_route_rejects_unknown_scoring():
    with pytest.raises(ValueError, match=r"scoring.*'tanh'"):
        moe_route(torch.randn(2, 8), None, 2, "tanh", True, 1, 1, 1.0)


@pytest.mark.parametrize("w2_shape, x_hidden", [((4, 16, 10), 16),   # w2's I != w13's I
                                                ((4, 12, 8), 16),    # w2's H != w13's H
                                                ((3, 16, 8), 16),    # expert counts differ
                                                ((4, 16, 8), 12)])   # x's H != w13's H
def test_experts_reject_shape_mismatch(w2_shape, x_hidden):
    w13 = torch.randn(4, 16, 16)                       # E=4, I=8, H=16
    weights, ids = torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"moe_experts: .*disagree"):
        moe_experts(torch.randn(3, x_hidden), w13, torch.randn(*w2_shape), weights, ids)


# ---------------------------------------------------------------------------------------
# Registry

def test_forced_missing_backend_names_op_and_backend(monkeypatch):
    monkeypatch.setenv("TSCOMPILE_KERNELS", "moe_experts=nonexistent")
    w13, w2 = _expert_weights(4, 8, 4)
    with pytest.raises(RuntimeError, match=r"moe_experts=nonexistent.*available: reference"):
        moe_experts(torch.randn(2, 8), w13, w2, torch.ones(2, 1),
                    torch.zeros(2, 1, dtype=torch.int32))
    # Other ops are not affected by an override naming moe_experts.
    moe_route(torch.randn(2, 4), None, 1, "softmax", True, 1, 1, 1.0)


def test_forced_reference_is_selected_and_recorded(monkeypatch):
    monkeypatch.setenv("TSCOMPILE_KERNELS", "*=reference")
    weights, ids = moe_route(torch.randn(2, 4), None, 2, "softmax", True, 1, 1, 1.0)
    moe_experts(torch.randn(2, 8), *_expert_weights(4, 8, 4), weights, ids)
    chosen = REGISTRY.selections()
    assert chosen["moe_route@cpu/float32"] == "reference"
    assert chosen["moe_experts@cpu/float32"] == "reference"


def test_moe_experts_routing_shapes_must_agree():
    x = torch.randn(3, 8)
    w13, w2 = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"topk_weights \[3, 1\] and topk_ids \[3, 2\]"):
        moe_experts(x, w13, w2, torch.ones(3, 1), ids)


# ---------------------------------------------------------------------------------------
# Expert parallelism: w13/w2 hold experts [expert_start, expert_start + E_local)

def _routing(scoring: str, num_tokens: int, num_experts: int, k: int):
    logits = torch.randn(num_tokens, num_experts) * 2
    if scoring == "softmax":
        return moe_route(logits, None, k, "softmax", True, 1, 1, 1.0)
    # DeepSeek-V3 style: 4 groups, the best 2 compete, biased choice, scaled weights.
    return moe_route(logits, torch.randn(num_experts) * 0.5, k, "sigmoid", True, 4, 2, 2.5)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_experts_split_over_ranks_sum_to_full(scoring, ranks):
    num_tokens, num_experts, k, hidden, width = 11, 16, 4, 24, 20
    x = torch.randn(num_tokens, hidden)
    w13, w2 = _expert_weights(num_experts, hidden, width)
    weights, ids = _routing(scoring, num_tokens, num_experts, k)
    full = moe_experts(x, w13, w2, weights, ids)
    local = num_experts // ranks
    parts = []
    for start in range(0, num_experts, local):
        part = moe_experts(x, w13[start:start + local], w2[start:start + local], weights, ids,
                           start)
        # This rank's partial sum: only the (token, expert) pairs whose expert it holds.
        held = (ids >= start) & (ids < start + local)
        torch.testing.assert_close(part.double(),
                                   experts_dense(x, w13, w2, weights * held, ids),
                                   rtol=1e-5, atol=1e-5)
        parts.append(part)
    torch.testing.assert_close(sum(parts), full, rtol=0, atol=1e-5)


def test_experts_with_no_local_tokens_give_zeros():
    w13, w2 = _expert_weights(2, 8, 4)
    ids = torch.tensor([[0, 1], [1, 5]], dtype=torch.int32)   # nothing in [2, 4) or [6, 8)
    weights = torch.rand(2, 2)
    for start in (2, 6):
        out = moe_experts(torch.randn(2, 8), w13, w2, weights, ids, start)
        assert torch.equal(out, torch.zeros(2, 8))


def test_experts_reject_negative_expert_start():
    w13, w2 = _expert_weights(4, 8, 4)
    with pytest.raises(ValueError, match=r"moe_experts: expert_start=-4 must be >= 0"):
        moe_experts(torch.randn(2, 8), w13, w2, torch.ones(2, 1),
                    torch.zeros(2, 1, dtype=torch.int32), -4)
