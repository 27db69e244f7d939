"""Triton MoE (kernels/triton/moe.py) against the reference backend.

CPU: the Triton interpreter on tiny shapes. Routing must give the reference's ids exactly (in
the same order: scores descending, an exact tie to the lower expert id) and its weights to
1e-6. The experts are compared at atol/rtol 1e-4 in fp32 and 2e-2 in bf16 (the kernel keeps
gate/up and the w2 product in fp32 where the reference rounds each to bf16). The tiles are
forced small (block_m 16 or 32, block_n/k 16) so several row blocks per expert, several
N tiles, K tails and padded rows all occur; the align step is checked against the layout
it promises. The one-token decode path (no align, w2 GEMM and slot sum in one launch) is
checked the same way with its own small tiles (DECODE, DECODE_WIDE).
GPU (`-m gpu`): Moonlight and Kimi K2.5 EP8 shapes against the reference, through both
paths at T=1.
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from tscompile.kernels import moe_experts, moe_route  # noqa: E402
from tscompile.kernels.moe import moe_experts_reference, moe_route_reference  # noqa: E402
from tscompile.kernels.triton import moe as tmoe  # noqa: E402



gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def assert_route_equal(got, want):
    (w, ids), (w_ref, ids_ref) = got, want
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.cpu(), ids_ref.cpu()), f"{ids} vs {ids_ref}"
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# moe_route

@pytest.mark.parametrize("tokens, experts, k", [(1, 8, 2), (5, 6, 6), (7, 20, 3),
                                                (3, 384, 8),
                                                (4, 64, 6)])   # DeepSeek-V2-Lite (no renorm)
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_softmax(monkeypatch, tokens, experts, k, renormalize):
    monkeypatch.setenv("TSCOMPILE_KERNELS", "moe_route=triton")
    logits = torch.randn(tokens, experts) * 2
    args = (None, k, "softmax", renormalize, 1, 1, 1.5)
    assert_route_equal(moe_route(logits, *args), moe_route_reference(logits, *args))


def test_route_bf16_logits_strided():
    """bf16 logits tie often; where they do, the reference's topk may order the tied ids
    either way, so there the chosen ids only need equal logits."""
    logits = (torch.randn(6, 40) * 2).bfloat16()[:, :32]          # row stride 40
    args = (None, 4, "softmax", True, 1, 1, 1.0)
    (w, ids), (w_ref, ids_ref) = (tmoe.moe_route_triton(logits, *args),
                                  moe_route_reference(logits, *args))
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(logits.gather(1, ids.long()), logits.gather(1, ids_ref.long()))


@pytest.mark.parametrize("experts, groups, topk_groups, k", [
    (32, 1, 1, 4), (32, 4, 2, 4), (32, 8, 3, 6), (24, 3, 2, 5),   # group size 8
    (40, 4, 2, 8),                                                 # group size 10 (padded)
    (8, 8, 3, 2),                                                  # groups of one expert
    (64, 1, 1, 6)])                                                # Moonlight: no groups
@pytest.mark.parametrize("with_bias", [True, False])
def test_route_sigmoid_grouped(monkeypatch, experts, groups, topk_groups, k, with_bias):
    monkeypatch.setenv("TSCOMPILE_KERNELS", "moe_route=triton")
    logits = torch.randn(7, experts) * 2
    bias = torch.randn(experts) * 0.5 if with_bias else None
    for renormalize in (True, False):
        args = (bias, k, "sigmoid", renormalize, groups, topk_groups, 2.5)
        assert_route_equal(moe_route(logits, *args), moe_route_reference(logits, *args))


def test_route_ties_go_to_the_lower_expert_id():
    logits = torch.zeros(2, 12)
    logits[1, [3, 7, 9]] = 1.0                                    # three tied winners
    w, ids = tmoe.moe_route_triton(logits, None, 4, "softmax", False, 1, 1, 1.0)
    assert ids.tolist() == [[0, 1, 2, 3], [3, 7, 9, 0]]
    # Grouped: groups 1 and 2 tie on score; the lower group wins.
    logits = torch.full((1, 12), -4.0)
    logits[0, [4, 5, 8, 9]] = 2.0
    _, ids = tmoe.moe_route_triton(logits, None, 2, "sigmoid", True, 3, 1, 1.0)
    assert ids.tolist() == [[4, 5]]


# ---------------------------------------------------------------------------------------
# moe_experts

def make_experts(tokens, experts, hidden, width, k, dtype=torch.float32, global_experts=None,
                 gen=None):
    """Inputs on gen's device (the GPU tests draw their GB of weights there)."""
    dev = gen.device if gen is not None else "cpu"
    x = torch.randn(tokens, hidden, generator=gen, device=dev).to(dtype)
    w13 = (torch.randn(experts, 2 * width, hidden, generator=gen, device=dev)
           * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, width, generator=gen, device=dev)
          * width ** -0.5).to(dtype)
    logits = torch.randn(tokens, global_experts or experts, generator=gen, device=dev)
    weights, ids = moe_route_reference(logits, None, k, "softmax", True, 1, 1, 1.0)
    return x, w13, w2, weights, ids


SMALL = tmoe.MoeConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16)
TALL = tmoe.MoeConfig(block_m=32, block_n1=32, block_k1=32, block_n2=16, block_k2=32)
DECODE = tmoe.MoeConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16,
                        decode=True)
DECODE_WIDE = tmoe.MoeConfig(block_m=16, block_n1=32, block_k1=32, block_n2=32, block_k2=32,
                             decode=True)


@pytest.mark.parametrize("tokens, experts, hidden, width, k", [
    (1, 4, 24, 20, 2),       # one decode token; H, I not multiples of the tiles
    (5, 6, 32, 16, 3),       # even tiles (no K/N masks)
    (20, 3, 24, 40, 2),      # >16 pairs per expert: several row blocks per expert
    (9, 8, 16, 16, 1),       # top-1
])
@pytest.mark.parametrize("cfg", [SMALL, TALL], ids=["bm16", "bm32"])
def test_experts_fp32(tokens, experts, hidden, width, k, cfg):
    x, w13, w2, weights, ids = make_experts(tokens, experts, hidden, width, k)
    out = tmoe.experts_with_config(x, w13, w2, weights, ids, 0, cfg)
    want = moe_experts_reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_experts_registered_op_bf16(monkeypatch):
    monkeypatch.setenv("TSCOMPILE_KERNELS", "moe_experts=triton")
    x, w13, w2, weights, ids = make_experts(6, 5, 32, 24, 2, dtype=torch.bfloat16)
    out = moe_experts(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16
    want = moe_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_experts_bf16_slot_rows_past_the_fp32_budget(monkeypatch):
    monkeypatch.setattr(tmoe, "Y_FP32_MAX_BYTES", 0)
    x, w13, w2, weights, ids = make_experts(6, 5, 32, 24, 3, dtype=torch.bfloat16)
    out = tmoe.experts_with_config(x, w13, w2, weights, ids, 0, SMALL)
    want = moe_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("start", [0, 4, 12])
def test_experts_expert_parallel(start):
    """w13/w2 hold experts [start, start+4) of 16; other ids contribute nothing."""
    x, w13, w2, weights, ids = make_experts(7, 4, 24, 20, 4, global_experts=16)
    out = tmoe.experts_with_config(x, w13, w2, weights, ids, start, SMALL)
    want = moe_experts_reference(x, w13, w2, weights, ids, start)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_experts_nothing_held_gives_zeros():
    x, w13, w2, weights, ids = make_experts(3, 2, 16, 16, 2, global_experts=8)
    ids = ids % 4                                                # all in [0, 4)
    out = tmoe.experts_with_config(x, w13, w2, weights, ids, 6, SMALL)
    assert torch.equal(out, torch.zeros_like(x))


def test_experts_idle_expert_weights_are_never_read():
    x, w13, w2, _, _ = make_experts(3, 8, 16, 16, 2)
    ids = torch.tensor([[1, 5], [5, 1], [1, 5]], dtype=torch.int32)
    weights = torch.rand(3, 2) + 0.1
    want = moe_experts_reference(x, w13, w2, weights, ids)
    idle = torch.tensor([0, 2, 3, 4, 6, 7])
    w13[idle], w2[idle] = float("nan"), float("nan")
    out = tmoe.experts_with_config(x, w13, w2, weights, ids, 0, SMALL)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# moe_experts, one token: the decode path

@pytest.mark.parametrize("experts, hidden, width, k", [
    (4, 24, 20, 2),          # H, I not multiples of the tiles: K and N tails
    (8, 32, 64, 6),          # even tiles, several K steps per slot, k not a power of 2
    (6, 16, 16, 1),          # top-1
    (5, 48, 40, 5),          # k = E: every expert
])
@pytest.mark.parametrize("cfg", [DECODE, DECODE_WIDE], ids=["n16", "n32"])
def test_experts_decode_fp32(experts, hidden, width, k, cfg):
    x, w13, w2, weights, ids = make_experts(1, experts, hidden, width, k)
    out = tmoe.experts_with_config(x, w13, w2, weights, ids, 0, cfg)
    want = moe_experts_reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("start", [0, 4, 12])
def test_experts_decode_expert_parallel(start):
    """Held experts [start, start+4) of 16: non-held slots are skipped, wherever they sit
    among the k slots (the held ones are found by rank)."""
    gen = torch.Generator().manual_seed(start)
    for _ in range(3):
        x, w13, w2, weights, ids = make_experts(1, 4, 24, 20, 6, global_experts=16, gen=gen)
        out = tmoe.experts_with_config(x, w13, w2, weights, ids, start, DECODE)
        want = moe_experts_reference(x, w13, w2, weights, ids, start)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_experts_decode_nothing_held_gives_zeros():
    x, w13, w2, weights, ids = make_experts(1, 2, 16, 16, 3, global_experts=8)
    ids = torch.tensor([[0, 1, 3]], dtype=torch.int32)
    out = tmoe.experts_with_config(x, w13, w2, weights, ids, 6, DECODE)
    assert torch.equal(out, torch.zeros_like(x))


def test_experts_decode_idle_expert_weights_are_never_read():
    x, w13, w2, _, _ = make_experts(1, 8, 16, 48, 3)
    ids = torch.tensor([[6, 1, 3]], dtype=torch.int32)
    weights = torch.rand(1, 3) + 0.1
    want = moe_experts_reference(x, w13, w2, weights, ids)
    idle = torch.tensor([0, 2, 4, 5, 7])
    w13[idle], w2[idle] = float("nan"), float("nan")
    out = tmoe.experts_with_config(x, w13, w2, weights, ids, 0, DECODE)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_experts_decode_bf16_and_strided_x():
    x, w13, w2, weights, ids = make_experts(1, 5, 32, 24, 3, dtype=torch.bfloat16)
    wide = torch.randn(1, 48).bfloat16()
    wide[:, :32] = x
    out = tmoe.experts_with_config(wide[:, :32], w13, w2, weights, ids, 0, DECODE)
    assert out.dtype == torch.bfloat16
    want = moe_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_experts_decode_config_refuses_several_tokens():
    x, w13, w2, weights, ids = make_experts(2, 4, 16, 16, 2)
    with pytest.raises(ValueError, match="one token"):
        tmoe.experts_with_config(x, w13, w2, weights, ids, 0, DECODE)


def test_registered_op_takes_the_decode_path_at_one_token(monkeypatch):
    monkeypatch.setenv("TSCOMPILE_KERNELS", "moe_experts=triton")
    seen = []
    real = tmoe.experts_with_config

    def spy(*args):
        seen.append(args[-1].decode)
        return real(*args)

    monkeypatch.setattr(tmoe, "experts_with_config", spy)
    for tokens in (1, 2):
        x, w13, w2, weights, ids = make_experts(tokens, 5, 32, 24, 2)
        out = moe_experts(x, w13, w2, weights, ids)
        torch.testing.assert_close(out, moe_experts_reference(x, w13, w2, weights, ids),
                                   atol=1e-4, rtol=1e-4)
    assert seen == [True, False]


@pytest.mark.parametrize("block_m, pairs, chunk", [(16, 111, 16), (32, 111, 128), (16, 3, 16)])
def test_align_layout(block_m, pairs, chunk):
    """Each held expert's pairs, in pair order, from its segment's first block; segments in
    expert order, each padded to whole blocks; then unused blocks (-1) to the bound."""
    gen = torch.Generator().manual_seed(pairs)
    experts, start = 5, 3
    ids = torch.randint(0, 12, (pairs,), generator=gen, dtype=torch.int32)
    max_blocks = -(-(pairs + min(pairs, experts) * (block_m - 1)) // block_m)
    sp = torch.full((max_blocks * block_m,), -7, dtype=torch.int32)
    be = torch.full((max_blocks,), -7, dtype=torch.int32)
    br = torch.full((max_blocks,), -7, dtype=torch.int32)
    tmoe._align_kernel[(experts,)](ids, sp, be, br, pairs, start, experts, max_blocks,
                                   BLOCK_M=block_m, E_PAD=8, CHUNK=chunk)
    want_be, want_br, b = [], [], 0
    for e in range(experts):
        mine = (ids == start + e).nonzero().squeeze(1)
        for j in range(0, len(mine), block_m):
            rows = mine[j:j + block_m]
            assert torch.equal(sp[b * block_m: b * block_m + len(rows)], rows.int())
            want_be.append(e)
            want_br.append(len(rows))
            b += 1
    assert be[:b].tolist() == want_be and br[:b].tolist() == want_br
    assert (be[b:] == -1).all()


def test_pick_config_reads_weights_once_at_decode(monkeypatch):
    monkeypatch.setattr(tmoe, "INTERPRET", False)
    # Moonlight: 64 experts, top-6. One token: the decode path; from two on, aligned rows,
    # block_m covering the expected pairs per expert.
    assert tmoe.pick_config(1, 6, 64, 2048, 1408).decode
    for tokens, bm in ((2, 16), (64, 16), (256, 32), (8192, 128)):
        cfg = tmoe.pick_config(tokens, 6, 64, 2048, 1408)
        assert not cfg.decode and cfg.block_m == bm


# ---------------------------------------------------------------------------------------
# GPU: real shapes

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tokens, y_fp32", [(1, True), (64, True), (256, True),
                                            (2048, True), (2048, False)])  # 2048: block_m 128
def test_gpu_moonlight(monkeypatch, tokens, y_fp32):
    if not y_fp32:                                   # per-slot rows in bf16 (large prefills)
        monkeypatch.setattr(tmoe, "Y_FP32_MAX_BYTES", 0)
    gen = torch.Generator("cuda").manual_seed(tokens)
    x, w13, w2, weights, ids = make_experts(tokens, 64, 2048, 1408, 6, dtype=torch.bfloat16,
                                            gen=gen)
    out = tmoe.moe_experts_triton(x, w13, w2, weights, ids)
    want = moe_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.gpu
def test_gpu_moonlight_one_token_aligned_path():
    """The aligned path still serves one token correctly (pick_config sends T=1 to decode)."""
    gen = torch.Generator("cuda").manual_seed(11)
    x, w13, w2, weights, ids = make_experts(1, 64, 2048, 1408, 6, dtype=torch.bfloat16,
                                            gen=gen)
    cfg = tmoe.aligned_config(6, 64, 2048, 1408)
    out = tmoe.experts_with_config(x, w13, w2, weights, ids, 0, cfg)
    want = moe_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tokens, all_held", [(1, False), (1, True), (64, False)])
def test_gpu_kimi_ep8(tokens, all_held):
    gen = torch.Generator("cuda").manual_seed(tokens)
    x, w13, w2, weights, ids = make_experts(tokens, 48, 7168, 2048, 8, dtype=torch.bfloat16,
                                            global_experts=384, gen=gen)
    ids[0, 0] = 48 * 3 + 5                                      # at least one held pair
    if all_held:                                                # the slowest rank at T=1
        ids[0] = torch.tensor([150, 144, 191, 170, 160, 149, 188, 146], dtype=torch.int32,
                              device=ids.device)
    out = tmoe.moe_experts_triton(x, w13, w2, weights, ids, 48 * 3)
    want = moe_experts_reference(x.float(), w13.float(), w2.float(), weights, ids, 48 * 3)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scoring, groups, topk_groups", [("softmax", 1, 1),
                                                          ("sigmoid", 1, 1), ("sigmoid", 8, 4)])
def test_gpu_route(scoring, groups, topk_groups):
    logits = torch.randn(513, 384, device="cuda") * 2
    bias = torch.randn(384, device="cuda") * 0.1 if scoring == "sigmoid" else None
    args = (bias, 8, scoring, True, groups, topk_groups, 2.827)
    assert_route_equal(tmoe.moe_route_triton(logits, *args), moe_route_reference(logits, *args))
