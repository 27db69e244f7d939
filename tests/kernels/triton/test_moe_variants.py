"""Triton moe_experts variants (kernels/triton/moe.py) against the reference backend:
biases, "swigluoai", interleaved gate/up rows and strided (transposed) weights, through the
aligned path (small tiles: several row blocks, N tiles, K tails) and the one-token decode
path, with expert parallelism, in fp32 (1e-4) and bf16 (2e-2). CPU: the Triton interpreter.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tscompile.kernels import moe_experts  # noqa: E402
from tscompile.kernels.moe import moe_experts_reference, moe_route_reference  # noqa: E402
from tscompile.kernels.triton import moe as tmoe  # noqa: E402

from .test_moe import DECODE, DECODE_WIDE, SMALL, TALL  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def inputs(tokens, experts, hidden, width, k, *, hf_layout, biases, dtype=torch.float32,
           global_experts=None, seed=0):
    """w13/w2 as the op takes them: contiguous [E, 2I, H] / [E, H, I], or (hf_layout)
    transposed views of GPT-OSS's [E, H, 2I] / [E, I, H]. Weights wide enough that the
    swigluoai clamp at 7 bites."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    if hf_layout:
        w13 = (torch.randn(experts, hidden, 2 * width, generator=g) * 2).to(dtype).transpose(1, 2)
        w2 = (torch.randn(experts, width, hidden, generator=g) * width ** -0.5).to(
            dtype).transpose(1, 2)
    else:
        w13 = (torch.randn(experts, 2 * width, hidden, generator=g) * 2).to(dtype)
        w2 = (torch.randn(experts, hidden, width, generator=g) * width ** -0.5).to(dtype)
    b13 = torch.randn(experts, 2 * width, generator=g).to(dtype) if biases else None
    b2 = torch.randn(experts, hidden, generator=g).to(dtype) if biases else None
    logits = torch.randn(tokens, global_experts or experts, generator=g)
    weights, ids = moe_route_reference(logits, None, k, "softmax", True, 1, 1, 1.0)
    return (x, w13, w2, weights, ids), dict(b13=b13, b2=b2)


VARIANTS = [  # (activation, interleaved, hf_layout, biases)
    ("swigluoai", True, True, True),      # GPT-OSS exactly
    ("swigluoai", False, False, True),
    ("silu", True, False, False),
    ("silu", False, True, True),          # biases and strides with the plain SwiGLU
    ("swigluoai", True, True, False),
]
IDS = ["gpt_oss", "oai_stacked", "silu_interleaved", "silu_strided_bias", "oai_no_bias"]


def _check(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("activation, interleaved, hf_layout, biases", VARIANTS, ids=IDS)
@pytest.mark.parametrize("tokens, experts, hidden, width, k", [
    (5, 6, 32, 16, 3),       # even tiles
    (20, 3, 24, 40, 2),      # several row blocks per expert; K and N tails
])
@pytest.mark.parametrize("cfg", [SMALL, TALL], ids=["bm16", "bm32"])
def test_aligned(activation, interleaved, hf_layout, biases, tokens, experts, hidden, width,
                 k, cfg):
    args, kw = inputs(tokens, experts, hidden, width, k, hf_layout=hf_layout, biases=biases)
    kw.update(activation=activation, alpha=1.702, limit=7.0, interleaved=interleaved)
    got = tmoe.experts_with_config(*args, 0, cfg, **kw)
    _check(got, moe_experts_reference(*args, 0, **kw), torch.float32)


@pytest.mark.parametrize("activation, interleaved, hf_layout, biases", VARIANTS, ids=IDS)
@pytest.mark.parametrize("experts, hidden, width, k", [(4, 24, 20, 2), (8, 32, 64, 6)])
@pytest.mark.parametrize("cfg", [DECODE, DECODE_WIDE], ids=["n16", "n32"])
def test_decode(activation, interleaved, hf_layout, biases, experts, hidden, width, k, cfg):
    args, kw = inputs(1, experts, hidden, width, k, hf_layout=hf_layout, biases=biases)
    kw.update(activation=activation, alpha=1.702, limit=7.0, interleaved=interleaved)
    got = tmoe.experts_with_config(*args, 0, cfg, **kw)
    _check(got, moe_experts_reference(*args, 0, **kw), torch.float32)


@pytest.mark.parametrize("tokens, cfg", [(7, SMALL), (1, DECODE)], ids=["aligned", "decode"])
@pytest.mark.parametrize("start", [0, 4, 12])
def test_expert_parallel(tokens, cfg, start):
    """Experts [start, start + 4) of 16 held, with their biases: other ids add nothing."""
    args, kw = inputs(tokens, 4, 24, 20, 4, hf_layout=True, biases=True, global_experts=16,
                      seed=start)
    kw.update(activation="swigluoai", alpha=1.702, limit=7.0, interleaved=True)
    got = tmoe.experts_with_config(*args, start, cfg, **kw)
    _check(got, moe_experts_reference(*args, start, **kw), torch.float32)


@pytest.mark.parametrize("tokens", [1, 6])
def test_registered_op_bf16(monkeypatch, tokens):
    monkeypatch.setenv("TSCOMPILE_KERNELS", "moe_experts=triton")
    args, kw = inputs(tokens, 5, 32, 24, 2, hf_layout=True, biases=True, dtype=torch.bfloat16)
    kw.update(activation="swigluoai", alpha=1.702, limit=7.0, interleaved=True)
    got = moe_experts(*args, **kw)
    assert got.dtype == torch.bfloat16
    x, w13, w2, weights, ids = args
    want = moe_experts_reference(x.float(), w13.float(), w2.float(), weights, ids,
                                 b13=kw["b13"].float(), b2=kw["b2"].float(),
                                 activation="swigluoai", interleaved=True)
    # act is stored in bf16 between the GEMMs (as for silu): relative to the output scale
    # (|out| up to ~10 here, with the clamp biting), 2e-2.
    err = (got.float() - want).abs().max()
    assert err <= TOL[torch.bfloat16] * want.abs().max(), f"{err} vs {want.abs().max()}"


def test_idle_expert_biases_are_never_read():
    args, kw = inputs(3, 8, 16, 16, 2, hf_layout=True, biases=True)
    x, w13, w2, _, _ = args
    ids = torch.tensor([[1, 5], [5, 1], [1, 5]], dtype=torch.int32)
    weights = torch.rand(3, 2) + 0.1
    kw.update(activation="swigluoai", interleaved=True)
    want = moe_experts_reference(x, w13, w2, weights, ids, **kw)
    idle = torch.tensor([0, 2, 3, 4, 6, 7])
    kw["b13"][idle], kw["b2"][idle] = float("nan"), float("nan")
    for cfg, rows in ((SMALL, slice(None)), (DECODE, slice(0, 1))):
        got = tmoe.experts_with_config(x[rows], w13, w2, weights[rows], ids[rows], 0, cfg, **kw)
        _check(got, want[rows] if cfg is SMALL else moe_experts_reference(
            x[rows], w13, w2, weights[rows], ids[rows], **kw), torch.float32)


# ---------------------------------------------------------------------------------------
# GPU (`-m gpu`): GPT-OSS-20b's expert shapes (E=32, k=4, H=I=2880), bf16, HF's layout
# read through transposed views, both paths; the TP4 width slice and an EP4 expert slice.

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpt_oss_gpu(tokens, experts, width, global_experts=None, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    hidden, dev, bf16 = 2880, "cuda", torch.bfloat16
    x = torch.randn(tokens, hidden, generator=g, device=dev).to(bf16)
    gate_up = (torch.randn(experts, hidden, 2 * width, generator=g, device=dev) * 0.1).to(bf16)
    down = (torch.randn(experts, width, hidden, generator=g, device=dev) * width ** -0.5).to(bf16)
    b13 = torch.randn(experts, 2 * width, generator=g, device=dev).to(bf16)
    b2 = torch.randn(experts, hidden, generator=g, device=dev).to(bf16)
    logits = torch.randn(tokens, global_experts or experts, generator=g, device=dev)
    weights, ids = moe_route_reference(logits, None, 4, "softmax", True, 1, 1, 1.0)
    return (x, gate_up.transpose(1, 2), down.transpose(1, 2), weights, ids), dict(
        b13=b13, b2=b2, activation="swigluoai", alpha=1.702, limit=7.0, interleaved=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 1024])
@pytest.mark.parametrize("split", ["whole", "tp4", "ep4"])
def test_gpu_gpt_oss_20b(tokens, split):
    width, experts, start, glob = 2880, 32, 0, None
    if split == "tp4":
        width = 2880 // 4
    if split == "ep4":
        experts, start, glob = 8, 16, 32
    args, kw = _gpt_oss_gpu(tokens, experts, width, glob, seed=tokens)
    got = tmoe.moe_experts_triton(*args, start, **kw)
    x, w13, w2, weights, ids = args
    want = moe_experts_reference(x.float(), w13.float(), w2.float(), weights, ids, start,
                                 **{**kw, "b13": kw["b13"].float(), "b2": kw["b2"].float()})
    err = (got.float() - want).abs().max()
    assert err <= 2e-2 * want.abs().max(), f"{err} vs {want.abs().max()}"
