"""layer_norm, fused_add_layer_norm and all_reduce_add_layer_norm (kernels/norm.py,
kernels/collectives.py, kernels/triton/norm.py).

The reference against torch.nn.LayerNorm (bit for bit in fp32: it is torch's own kernel on
the fp32 values) and against the formula with eps inside the square root and the biased
variance; the Triton kernels (CPU interpreter, selected through TSCOMPILE_KERNELS) against
the reference: fp32 within 1e-5 (only the order of the sums differs), fp16 and bf16 within
a rounding of the output (the interpreter truncates fp32 -> bf16, see
tests/kernels/triton/test_norm_rope_act.py). Across real ranks: tests/kernels/test_collectives.py.
"""
from __future__ import annotations

import pytest
import torch

from tscompile.kernels import all_reduce_add_layer_norm, fused_add_layer_norm, layer_norm
from tscompile.kernels.norm import fused_add_layer_norm_reference, layer_norm_reference

OPS = ("layer_norm", "fused_add_layer_norm", "all_reduce_add_layer_norm")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[want.dtype])


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_reference_is_torch_layer_norm(bias):
    x = torch.randn(3, 5, 48) * 4 + 2
    ln = torch.nn.LayerNorm(48, eps=1e-5, bias=bias)
    with torch.no_grad():
        ln.weight.normal_()
        if bias:
            ln.bias.normal_()
    got = layer_norm(x, ln.weight.detach(), None if not bias else ln.bias.detach(), 1e-5)
    assert torch.equal(got, ln(x).detach())
    # The formula: biased variance, eps inside the square root (a large eps makes it show).
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    b = ln.bias.detach() if bias else 0.0
    want = (x - mean) / torch.sqrt(var + 0.5) * ln.weight.detach() + b
    torch.testing.assert_close(layer_norm(x, ln.weight.detach(), ln.bias if bias else None, 0.5),
                               want.detach(), atol=1e-5, rtol=1e-5)


def test_reference_bf16_is_fp32_math_rounded_once():
    x, w, b = torch.randn(4, 64).bfloat16(), torch.randn(64).bfloat16(), torch.randn(64).bfloat16()
    want = torch.nn.functional.layer_norm(x.float(), (64,), w.float(), b.float(), 1e-6)
    got = layer_norm(x, w, b, 1e-6)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())


def test_fused_add_and_one_rank_all_reduce_are_the_unfused_sequence():
    x, r = torch.randn(6, 32), torch.randn(6, 32)
    w, b = torch.randn(32), torch.randn(32)
    y, s = fused_add_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(s, x + r) and torch.equal(y, layer_norm(x + r, w, b, 1e-5))
    y2, s2 = all_reduce_add_layer_norm(x, r, w, b, 1e-5)       # no process group: identity
    assert torch.equal(y2, y) and torch.equal(s2, s)
    y3, _ = all_reduce_add_layer_norm(x, r, w, None, 1e-5)
    assert torch.equal(y3, layer_norm(x + r, w, None, 1e-5))


def test_bad_shapes_are_named():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"layer_norm: weight \[4\] and bias None must be \[8\]"):
        layer_norm(x, torch.ones(4), None, 1e-5)
    with pytest.raises(ValueError, match=r"bias \[3\] must be \[8\]"):
        fused_add_layer_norm(x, x, torch.ones(8), torch.ones(3), 1e-5)
    with pytest.raises(ValueError, match=r"all_reduce_add_layer_norm: residual \[2, 4\]"):
        all_reduce_add_layer_norm(x, torch.randn(2, 4), torch.ones(8), None, 1e-5)


def test_ops_trace_on_meta():
    x = torch.empty(3, 8, device="meta")
    w = torch.empty(8, device="meta")
    assert layer_norm(x, w, w, 1e-5).shape == (3, 8)
    y, s = all_reduce_add_layer_norm(x, x, w, None, 1e-5)
    assert y.shape == s.shape == (3, 8)
    schema = str(torch.ops.tscompile.all_reduce_add_layer_norm.default._schema)
    assert "(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps)" in schema


# ---------------------------------------------------------------------------------------
# Triton (interpreter on the CPU)
# ---------------------------------------------------------------------------------------
try:
    from tscompile.kernels.triton import norm as triton_norm
except ImportError:                                # no triton: the reference tests still run
    triton_norm = None
needs_triton = pytest.mark.skipif(triton_norm is None, reason="needs the triton package")


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("TSCOMPILE_KERNELS", ",".join(f"{op}=triton" for op in OPS))


@needs_triton
@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 96), (3, 2, 16), (9, 512)])
def test_triton_layer_norm(dtype, shape):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    w, b = torch.randn(shape[-1]).to(dtype), torch.randn(shape[-1]).to(dtype)
    close(layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5))
    close(layer_norm(x, w, None, 1e-5), layer_norm_reference(x, w, None, 1e-5))


@needs_triton
@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_fused_add_and_all_reduce(dtype):
    x, r = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype)
    w, b = torch.randn(96).to(dtype), torch.randn(96).to(dtype)
    want_y, want_s = fused_add_layer_norm_reference(x, r, w, b, 1e-5)
    for y, s in (fused_add_layer_norm(x, r, w, b, 1e-5),
                 all_reduce_add_layer_norm(x, r, w, b, 1e-5)):
        close(s, want_s)           # bf16: the interpreter truncates where the GPU rounds
        close(y, want_y)


@needs_triton
@pytest.mark.usefixtures("force_triton")
def test_triton_long_rows_take_three_passes(monkeypatch):
    """Rows longer than the register tile: mean, centred variance, normalise in chunks.
    A mean of 300 over a spread of 1 costs fp32 ~4e-5 in any order (torch's kernel too), and
    a one-pass E[x^2] - E[x]^2 variance ~5e-2: so against float64, within 2e-4."""
    monkeypatch.setattr(triton_norm, "MAX_TILE", 32)
    x, r = torch.randn(3, 70) + 300.0, torch.randn(3, 70)
    w, b = torch.randn(70), torch.randn(70)
    exact = torch.nn.functional.layer_norm(x.double(), (70,), w.double(), b.double(), 1e-5)
    torch.testing.assert_close(layer_norm(x, w, b, 1e-5).double(), exact, atol=2e-4, rtol=0)
    y, s = fused_add_layer_norm(x, r, w, None, 1e-5)
    assert torch.equal(s, x + r)
    exact = torch.nn.functional.layer_norm(s.double(), (70,), w.double(), None, 1e-5)
    torch.testing.assert_close(y.double(), exact, atol=2e-4, rtol=0)
    close(layer_norm(x - 300.0, w, b, 1e-5), layer_norm_reference(x - 300.0, w, b, 1e-5))


@needs_triton
@pytest.mark.usefixtures("force_triton")
def test_triton_strided_rows():
    base = torch.randn(6, 40 + 8)
    x = base[:, :40]                                # rows 48 apart, no copy needed
    w, b = torch.randn(40), torch.randn(40)
    close(layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5))
