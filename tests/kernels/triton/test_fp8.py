"""Triton block-scaled FP8 linear (kernels/triton/fp8.py) against kernels/fp8.py's reference.

CPU: the Triton interpreter on small shapes (N x K = 200 x 300, with short last blocks in
both dims, and 256 x 512), tiles forced small by the INTERPRET configs so that several M / N
tiles, the swizzle group, several K steps and split-K all occur.

Tolerances, per path:
* decode (M <= 16, weight-only): the kernel multiplies x by the exact fp8 weight and scales
  each block's fp32 product, so against the fp32 oracle (x.float() @ dequant(W).T) it
  differs only by summation order (fp32 x: rtol 1e-5) and the one rounding of the output
  to x's dtype (bf16: rtol 2^-7, one bf16 ulp, because the interpreter's fp32 -> bf16 cast
  truncates instead of rounding to nearest; on the GPU it is half that). The reference
  backend itself rounds W to bf16 before its bf16 matmul, so it is compared at a relative
  (Frobenius) error of 1e-2.
* prefill (M > 16, W8A8): x is rounded per 1 x 128 group to e4m3. Against the oracle on the
  *same* quantized activations (quantize_act_reference, whose bits the kernel's quantize
  reproduces exactly: tested) it is again summation order plus the output cast. Against
  the unquantized reference the error is the activation rounding: e4m3 keeps 3 mantissa
  bits, so each element is off by at most 2^-4 of itself (uniform within half an ulp:
  rms <= 2^-4 / sqrt(3) ~ 0.036); over a K-long dot of random signs the output's relative
  (Frobenius) error is that rms, so the bound is 0.05, and it must also be above 1e-3
  (a kernel that skipped the quantization would not be the W8A8 path).
Interpreter notes: its FP8 tl.dot is exact and is used as is; its fp32 -> e4m3 cast is
wrong at binade carries and above 448, so the kernel pre-rounds in fp32 there only
(`test_quantize_matches_reference_bits` covers every e4m3 midpoint).
GPU (`-m gpu`): real shapes (Qwen3-8B, DeepSeek-V3 linears) against the same oracles.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from tscompile.kernels.fp8 import (  # noqa: E402
    FP8, dequantize_fp8_block, fp8_block_linear_reference, quantize_fp8_block)
from tscompile.kernels.registry import REGISTRY, Query  # noqa: E402
from tscompile.kernels.triton import fp8 as tfp8  # noqa: E402

BLOCK = [128, 128]
SHAPES = [(200, 300), (256, 512)]
RTOL_OUT = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}


def make(m, n, k, dtype, bias, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed * 1000 + m * 7 + n + k)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    w[: min(n, 5), : min(k, 7)] *= 30.0            # one block with a much larger scale
    wq, ws = quantize_fp8_block(w)
    x = torch.randn(m, k, generator=gen)
    x[:, : min(k, 3)] *= 50.0                       # an outlier column (per-group amax)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x.to(dtype).to(device), wq.to(device), ws.to(device), b


def oracle(x, wq, ws, b, xq=None):
    """fp32 product of the dequantized weight and x (or the given activations), + bias."""
    w = dequantize_fp8_block(wq, ws, BLOCK)
    out = (x.float() if xq is None else xq) @ w.t()
    return out if b is None else out + b.to(x.dtype).float()


def dequant_act(q, s, k):
    return q.float() * s.t().repeat_interleave(128, 1)[:, :k]


def close(out, want, dtype):
    rtol = RTOL_OUT[dtype]
    scale = want.abs().max().item()
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=1e-5 * scale)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m,cuda_cores", [(1, True), (1, False), (3, True), (16, True)])
def test_decode_path_matches_reference(m, cuda_cores, n, k, bias, dtype):
    x, wq, ws, b = make(m, n, k, dtype, bias)
    cfg = tfp8.decode_config(m, n, k, tfp8.sm_count(x.device))
    out = tfp8.fp8_block_linear_triton(
        x, wq, ws, b, BLOCK, decode=dataclasses.replace(cfg, cuda_cores=cuda_cores))
    assert out.dtype == dtype and out.shape == (m, n)
    close(out, oracle(x, wq, ws, b), dtype)
    assert rel(out, fp8_block_linear_reference(x, wq, ws, b, BLOCK)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", SHAPES)
def test_prefill_path_matches_reference(n, k, bias, dtype):
    m = 80
    x, wq, ws, b = make(m, n, k, dtype, bias)
    out = tfp8.fp8_block_linear_triton(x, wq, ws, b, BLOCK)
    assert out.dtype == dtype and out.shape == (m, n)
    q, s = tfp8.quantize_act_reference(x)
    close(out, oracle(x, wq, ws, b, dequant_act(q, s, k)), dtype)
    err = rel(out, oracle(x, wq, ws, b))
    assert 1e-3 < err < 0.05, err
    assert rel(out, fp8_block_linear_reference(x, wq, ws, b, BLOCK)) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantization_gives_the_same_output(dtype):
    m, n, k = 40, 200, 300
    x, wq, ws, b = make(m, n, k, dtype, True)
    cfg = tfp8.prefill_config(m, n, k)
    sep = tfp8.fp8_block_linear_triton(x, wq, ws, b, BLOCK, prefill=cfg)
    fused = tfp8.fp8_block_linear_triton(
        x, wq, ws, b, BLOCK, prefill=dataclasses.replace(cfg, fuse_quant=True))
    torch.testing.assert_close(fused, sep, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_reference_bits(dtype):
    # Group 0 has amax 448 (scale 1): its values reach the e4m3 rounding unchanged, among
    # them every midpoint between neighbouring e4m3 values (ties to even), both signs,
    # the subnormal range and the binade carries the interpreter's own cast gets wrong.
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()   # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2
    vals = torch.cat([mids, -mids, torch.tensor([127.16, -124.2, 447.9, 2 ** -10])])
    k = 1024
    x = torch.randn(3, k) * 3
    x[0, 0] = 448.0
    x[0, 1:1 + vals.numel()] = vals
    x[1, 128:256] = 0.0                                              # an all-zero group
    x[2, 300:310] = 1e-8                                             # a tiny group
    x = x.to(dtype)                          # the midpoints have 4 mantissa bits: exact in bf16
    q, s = tfp8.quantize_act(x)
    qr, sr = tfp8.quantize_act_reference(x)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    assert torch.equal(s, sr)
    assert s.shape == (k // 128, 3)
    # and the quantized activations stand for x within e4m3's half ulp (2^-4 relative)
    deq = dequant_act(q, s, k)
    ax = x.float().abs()
    big = ax >= s.t().repeat_interleave(128, 1) * 2 ** -6           # e4m3 normals
    assert ((deq - x.float()).abs()[big] <= ax[big] * 2 ** -4 * (1 + 1e-6)).all()


def test_decode_split_k_is_used_and_deterministic():
    m, n, k = 2, 64, 1024           # 4 N tiles of 16 on a pretend 4-SM device: splits K
    cfg = tfp8.decode_config(m, n, k, tfp8.sm_count(torch.device("cpu")))
    assert cfg.split_k > 1
    x, wq, ws, b = make(m, n, k, torch.float32, True)
    a = tfp8.fp8_block_linear_triton(x, wq, ws, b, BLOCK)
    close(a, oracle(x, wq, ws, b), torch.float32)
    assert torch.equal(a, tfp8.fp8_block_linear_triton(x, wq, ws, b, BLOCK))
    one = tfp8.fp8_block_linear_triton(x, wq, ws, b, BLOCK,
                                       decode=tfp8.DecodeConfig(block_n=16, ksub=2, stages=1))
    close(one, oracle(x, wq, ws, b), torch.float32)


def test_leading_dims_and_strided_x():
    n, k = 200, 300
    x, wq, ws, b = make(6, n, 2 * k, torch.float32, True)
    x3 = x[:, ::2].reshape(2, 3, k)                   # non-contiguous last dim
    out = tfp8.fp8_block_linear_triton(x3, wq[:, :k].contiguous(),
                                       ws[:, : -(-k // 128)].contiguous(), b, BLOCK)
    assert out.shape == (2, 3, n)
    close(out.view(6, n), oracle(x3.reshape(6, k), wq[:, :k].contiguous(),
                                 ws[:, : -(-k // 128)].contiguous(), b), torch.float32)


def test_empty_batch():
    x, wq, ws, b = make(1, 200, 300, torch.bfloat16, True)
    assert tfp8.fp8_block_linear_triton(x[:0], wq, ws, b, BLOCK).shape == (0, 200)


@pytest.mark.parametrize("block", [[64, 64], [128, 64], [1, 128]])
def test_unsupported_block_is_an_error_naming_it(block):
    n, k = 256, 256
    wq, ws = quantize_fp8_block(torch.randn(n, k), block)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match=rf"block \[{block[0]}, {block[1]}\].*\[128, 128\]"):
        tfp8.fp8_block_linear_triton(x, wq, ws, None, block)
    # the shape check says the same when the op passes the block as shape facts
    q = Query(torch.device("cpu"), torch.float32, (("block_k", block[1]),
                                                   ("block_n", block[0])))
    assert f"block [{block[0]}, {block[1]}]" in tfp8.REQ.shape_check(q)


def test_bad_shapes_are_errors():
    wq, ws = quantize_fp8_block(torch.randn(256, 256))
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        tfp8.fp8_block_linear_triton(torch.randn(2, 256), wq, ws[:1], None, BLOCK)
    with pytest.raises(ValueError, match="last dim 255"):
        tfp8.fp8_block_linear_triton(torch.randn(2, 255), wq, ws, None, BLOCK)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        tfp8.fp8_block_linear_triton(torch.randn(2, 256), wq.float(), ws, None, BLOCK)
    with pytest.raises(ValueError, match="bias has shape"):
        tfp8.fp8_block_linear_triton(torch.randn(2, 256), wq, ws, torch.zeros(3), BLOCK)


def test_registered_below_reference_on_the_cpu():
    impls = {i.backend: i for i in REGISTRY.impls("fp8_block_linear")}
    assert "triton" in impls
    q = Query(torch.device("cpu"), torch.bfloat16)
    assert impls["triton"].requires.refuse(q) is None          # runs under the interpreter
    assert REGISTRY.select("fp8_block_linear", q).backend == "reference"
    assert impls["triton"].requires.refuse(Query(torch.device("cpu"), torch.int8))


# ---------------------------------------------------------------------------------------
# Real shapes on a GPU
# ---------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_SHAPES = [(4096, 4096), (24576, 4096), (4096, 12288), (576, 7168), (200, 300)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 8, 16, 17, 80, 512])
def test_gpu_matches_reference(m, n, k):
    dtype = torch.bfloat16
    x, wq, ws, b = make(m, n, k, dtype, True, device="cuda")
    assert REGISTRY.select("fp8_block_linear", Query(x.device, dtype)).backend == "triton"
    out = tfp8.fp8_block_linear_triton(x, wq, ws, b, BLOCK)
    if m <= tfp8.DECODE_MAX_M:
        want = oracle(x, wq, ws, b)
    else:
        q, s = tfp8.quantize_act_reference(x)
        got_q, got_s = tfp8.quantize_act(x)
        assert torch.equal(got_q.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(got_s, s)
        want = oracle(x, wq, ws, b, dequant_act(q, s, k))
        assert rel(out, oracle(x, wq, ws, b)) < 0.05
    # Hopper's FP8 MMA adds inside one 128-wide K block with ~14 mantissa bits (the reason
    # for the per-block promotion), so an output whose terms cancel (the outlier column
    # times the large block) is off by up to ~2^-13 of the sum of its terms' magnitudes.
    terms = oracle(x.abs(), wq.float().abs().to(FP8), ws, None,
                   None if m <= tfp8.DECODE_MAX_M else dequant_act(q, s, k).abs())
    err = (out.float() - want).abs()
    assert (err <= 2 ** -7 * want.abs() + 2 ** -12 * terms + 1e-6).all(), err.max()
