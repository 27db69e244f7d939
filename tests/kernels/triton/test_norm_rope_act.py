"""Triton rms_norm, fused_add_rms_norm, rope, rms_norm_rope and silu_and_mul against their
references.

On the CPU the kernels run in Triton's interpreter (tiny shapes, selected through
TSCOMPILE_KERNELS since they rank below the reference there). Tolerances: fp32 1e-5
(only the order of the sum of squares differs); fp16 one or two ulps. bf16: the interpreter
rounds fp32 -> bf16 by truncation where the GPU rounds to nearest, so each rounding can be
one bf16 ulp (2^-8 relative) off: we allow rtol 2e-2 there, and the GPU tests (marked
`gpu`) hold bf16 at the real shapes to at most one ulp on a small fraction of elements.
"""
from __future__ import annotations

import pytest
import torch

from tscompile.kernels import (
    REGISTRY, Query, fused_add_rms_norm, rms_norm, rms_norm_rope, rope, silu_and_mul,
)
from tscompile.kernels.activation import silu_and_mul_reference
from tscompile.kernels.norm import fused_add_rms_norm_reference, rms_norm_reference
from tscompile.kernels.rope import rms_norm_rope_reference, rope_cos_sin_cache, rope_reference
from tscompile.kernels.triton import norm as triton_norm

OPS = ("rms_norm", "fused_add_rms_norm", "rope", "rms_norm_rope", "silu_and_mul")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("TSCOMPILE_KERNELS", ",".join(f"{op}=triton" for op in OPS))


def close(got, want, dtype=None):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype or want.dtype])


def test_registered_below_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TSCOMPILE_KERNELS")
    q = Query(torch.device("cpu"), torch.float32)
    for op in OPS:
        text = REGISTRY.explain(op, q)
        assert f"{op}/triton (priority -10): eligible, lower priority" in text, text
        assert REGISTRY.select(op, q).backend == "reference"


# --- RMSNorm -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 96), (3, 2, 16), (9, 512)])
def test_rms_norm(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype):
    x, r = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype)
    w = torch.randn(96).to(dtype)
    normed, summed = fused_add_rms_norm(x, r, w, 1e-5)
    want_normed, want_summed = fused_add_rms_norm_reference(x, r, w, 1e-5)
    close(summed, want_summed)
    close(normed, want_normed)


def test_rms_norm_mixed_dtypes_promote_like_reference():
    """bf16 activations with an fp32 weight: the reference's `weight * y.to(bf16)` is fp32."""
    x, w = torch.randn(4, 32).bfloat16(), torch.randn(32)
    got = rms_norm(x, w, 1e-6)
    assert got.dtype == torch.float32
    close(got, rms_norm_reference(x, w, 1e-6), torch.bfloat16)


def test_rms_norm_strided_rows():
    """MLA's kv_a_layernorm gets kv_c = kv_a[..., :L], rows L + dr apart: no copy needed."""
    kv_a = torch.randn(6, 40 + 8)
    kv_c = kv_a[:, :40]
    w = torch.randn(40)
    close(rms_norm(kv_c, w, 1e-6), rms_norm_reference(kv_c, w, 1e-6))
    summed_in = torch.randn(6, 40)
    got = fused_add_rms_norm(kv_c, summed_in, w, 1e-6)
    for g, want in zip(got, fused_add_rms_norm_reference(kv_c, summed_in, w, 1e-6)):
        close(g, want)


@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm_long_rows_loop(monkeypatch, fused):
    """Rows longer than MAX_TILE take the two-pass chunked path (forced here with a tiny tile)."""
    monkeypatch.setattr(triton_norm, "MAX_TILE", 16)
    x, r, w = torch.randn(3, 50) * 2, torch.randn(3, 50), torch.randn(50)
    if fused:
        for g, want in zip(fused_add_rms_norm(x, r, w, 1e-6),
                           fused_add_rms_norm_reference(x, r, w, 1e-6)):
            close(g, want)
    else:
        close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_rms_norm_zero_rows():
    assert rms_norm(torch.randn(0, 8), torch.randn(8), 1e-6).shape == (0, 8)


# --- RoPE ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,head_dim,rot_dim", [
    (3, 16, 16),   # full rotary
    (5, 16, 12),   # partial rotary, r/2 = 6 not a power of two
    (1, 10, 4),    # one head (MLA's k_pe), pass-through of 6 dims
    (33, 8, 8),    # more heads than one program's tile
])
def test_rope(dtype, interleaved, heads, head_dim, rot_dim):
    t = 4
    x = torch.randn(t, heads, head_dim).to(dtype)
    pos = torch.tensor([0, 1, 37, 63])
    table = rope_cos_sin_cache(rot_dim, 64, 10000.0)
    close(rope(x, pos, table, interleaved), rope_reference(x, pos, table, interleaved))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_strided_q_pe_int32_positions_bf16_table(interleaved):
    """MLA: q_pe = q.view(T, Nh, dn + dr)[..., dn:] is strided; positions may be int32 and the
    table may have been cast with the model."""
    dn, dr = 6, 8
    q = torch.randn(3, 4, dn + dr)
    q_pe = q[..., dn:]
    pos = torch.tensor([5, 0, 2], dtype=torch.int32)
    table = rope_cos_sin_cache(dr, 8, 10000.0, {"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 4})
    close(rope(q_pe, pos, table, interleaved), rope_reference(q_pe, pos, table, interleaved))
    table16 = table.bfloat16()
    close(rope(q_pe, pos, table16, interleaved), rope_reference(q_pe, pos, table16, interleaved))


def test_rope_one_token():
    x, table = torch.randn(1, 2, 8), rope_cos_sin_cache(8, 16, 10000.0)
    pos = torch.tensor([15])
    close(rope(x, pos, table, False), rope_reference(x, pos, table, False))


# --- rms_norm_rope (QK-norm + RoPE in one launch) -----------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,head_dim,rot_dim", [(3, 16, 16), (5, 16, 12), (33, 8, 8)])
def test_rms_norm_rope(dtype, interleaved, heads, head_dim, rot_dim):
    x = (3 * torch.randn(4, heads, head_dim)).to(dtype)
    w = (1 + 0.3 * torch.randn(head_dim)).to(dtype)
    pos = torch.tensor([0, 1, 37, 63])
    table = rope_cos_sin_cache(rot_dim, 64, 10000.0)
    got = rms_norm_rope(x, w, 1e-6, pos, table, interleaved)
    close(got, rms_norm_rope_reference(x, w, 1e-6, pos, table, interleaved))
    # The reference is the composition it replaces.
    want = rope_reference(rms_norm_reference(x, w, 1e-6), pos, table, interleaved)
    assert torch.equal(rms_norm_rope_reference(x, w, 1e-6, pos, table, interleaved), want)


def test_rms_norm_rope_strided_slice_of_a_packed_projection():
    """What pack_linears hands it: k = qkv[:, q_width : q_width + k_width].view(T, Hkv, D),
    rows strided by the packed width, not copied first."""
    t, hq, hkv, d = 3, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    assert not k.is_contiguous()
    w, pos, table = torch.randn(d), torch.tensor([3, 9, 0]), rope_cos_sin_cache(d, 16, 1e6)
    close(rms_norm_rope(k, w, 1e-6, pos, table, False),
          rms_norm_rope_reference(k.contiguous(), w, 1e-6, pos, table, False))


def test_rms_norm_rope_names_a_bad_weight():
    x, table = torch.randn(2, 3, 8), rope_cos_sin_cache(8, 4, 1e4)
    with pytest.raises(ValueError, match=r"rms_norm_rope: weight must be \[8\]"):
        rms_norm_rope(x, torch.ones(4), 1e-6, torch.tensor([0, 1]), table, False)


# --- silu_and_mul --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 200), (2, 3, 80)])
def test_silu_and_mul(dtype, shape):
    x = (torch.randn(shape) * 4).to(dtype)
    close(silu_and_mul(x), silu_and_mul_reference(x))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, interpreter only
def test_silu_and_mul_extremes_and_strided_rows():
    x = torch.randn(4, 2 * 9)
    x[0, :9] = torch.tensor([-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4])
    got = silu_and_mul(x)
    assert torch.isfinite(got).all()
    close(got, silu_and_mul_reference(x))
    wide = torch.randn(3, 30)
    close(silu_and_mul(wide[:, :18]), silu_and_mul_reference(wide[:, :18]))


# --- real shapes on the GPU ----------------------------------------------------------------

def _ulp_mismatch(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(fraction of elements that differ, largest difference in units of want's ulp)."""
    diff = (got.float() - want.float()).abs()
    eps = torch.finfo(want.dtype).eps
    ulp = (want.float().abs() * eps).clamp_min(torch.finfo(want.dtype).tiny)
    return (diff > 0).float().mean().item(), (diff / ulp).max().item()


def _check_gpu(got, want):
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    frac, worst = _ulp_mismatch(got, want)
    assert worst <= 2.01 and frac < 0.01, (frac, worst)  # an ulp or two, on < 1% of elements


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,h", [(1, 7168), (64, 4096), (4096, 7168), (333, 1536), (77, 128)])
def test_gpu_rms_norm(dtype, t, h):
    x = torch.randn(t, h, device="cuda").to(dtype)
    r = torch.randn(t, h, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(h, device="cuda")).to(dtype)
    _check_gpu(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    for g, want in zip(fused_add_rms_norm(x, r, w, 1e-6),
                       fused_add_rms_norm_reference(x, r, w, 1e-6)):
        _check_gpu(g, want)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,heads,head_dim,rot_dim,interleaved", [
    (4096, 128, 64, 64, True), (64, 64, 64, 64, True), (4096, 32, 128, 128, False),
    (7, 8, 128, 64, False), (7, 8, 128, 64, True)])
def test_gpu_rope(dtype, t, heads, head_dim, rot_dim, interleaved):
    x = torch.randn(t, heads, head_dim, device="cuda").to(dtype)
    pos = torch.randint(0, 8192, (t,), device="cuda")
    table = rope_cos_sin_cache(rot_dim, 8192, 50000.0).cuda()
    _check_gpu(rope(x, pos, table, interleaved), rope_reference(x, pos, table, interleaved))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,heads,head_dim", [(1, 32, 128), (1, 8, 128), (4096, 32, 128),
                                              (7, 64, 64)])
def test_gpu_rms_norm_rope(dtype, t, heads, head_dim):
    x = (3 * torch.randn(t, heads, head_dim, device="cuda")).to(dtype)
    w = (1 + 0.1 * torch.randn(head_dim, device="cuda")).to(dtype)
    pos = torch.randint(0, 8192, (t,), device="cuda")
    table = rope_cos_sin_cache(head_dim, 8192, 1e6).cuda()
    got = rms_norm_rope(x, w, 1e-6, pos, table, False)
    want = rms_norm_rope_reference(x, w, 1e-6, pos, table, False)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    # The norm's bf16 rounding may flip by one ulp where rstd's last bit differs (the
    # rms_norm test's < 1% of elements); RoPE then rotates that flip into both outputs of
    # the pair, so an output can be off by one ulp of the larger *input* of its pair (under
    # cancellation that is many ulps of the output). Bound each element by exactly that.
    y = rms_norm_reference(x, w, 1e-6).float()
    half = head_dim // 2
    mag = torch.maximum(y.abs(), torch.cat([y[..., half:], y[..., :half]], -1).abs())
    ulp = lambda v: torch.finfo(dtype).eps * v.clamp_min(torch.finfo(dtype).tiny)  # noqa: E731
    bound = 1.5 * ulp(mag) + ulp(want.float().abs())
    diff = (got.float() - want.float()).abs()
    assert (diff <= bound).all(), float((diff / bound).max())
    assert (diff > 0).float().mean() < 0.02


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,inter", [(1, 4608), (64, 14336), (4096, 4608), (5, 1000)])
def test_gpu_silu_and_mul(dtype, t, inter):
    x = (3 * torch.randn(t, 2 * inter, device="cuda")).to(dtype)
    _check_gpu(silu_and_mul(x), silu_and_mul_reference(x))
