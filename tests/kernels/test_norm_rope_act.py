"""rms_norm, fused_add_rms_norm, rope (+ its cos/sin tables) and silu_and_mul against direct
formulations (transformers' own rope parameter code where it is the definition)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tscompile.kernels import fused_add_rms_norm, rms_norm, rope, rope_cos_sin_cache, silu_and_mul


def test_rms_norm():
    x, w = torch.randn(5, 32) * 3, torch.randn(32)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), want)
    one = torch.randn(1, 32)  # a single token
    torch.testing.assert_close(rms_norm(one, w, 1e-6), one / one.pow(2).mean().add(1e-6).sqrt() * w)


def test_fused_add_rms_norm():
    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    normed, summed = fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(summed, x + r)
    torch.testing.assert_close(normed, rms_norm(x + r, w, 1e-5))
    with pytest.raises(ValueError, match="last dim 16 but weight has 8"):
        rms_norm(x, torch.randn(8), 1e-5)


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])
    with pytest.raises(ValueError, match="even last dim"):
        silu_and_mul(torch.randn(2, 5))


def _rotate_complex(x, pos, inv_freq, interleaved):
    """RoPE as complex multiplication by e^{i pos f}: the paper's definition."""
    r = inv_freq.numel() * 2
    xr = x[..., :r].double()
    if interleaved:
        pairs = torch.complex(xr[..., 0::2], xr[..., 1::2])
    else:
        pairs = torch.complex(xr[..., : r // 2], xr[..., r // 2:])
    angle = pos.double()[:, None, None] * inv_freq.double()[None, None, :]
    rot = pairs * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        out = torch.stack([rot.real, rot.imag], -1).flatten(-2)
    else:
        out = torch.cat([rot.real, rot.imag], -1)
    return torch.cat([out.float(), x[..., r:]], -1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matches_complex_rotation(interleaved):
    t, h, d, r = 6, 3, 16, 12  # partial rotary: 12 of 16 dims
    x = torch.randn(t, h, d)
    pos = torch.tensor([0, 1, 5, 9, 63, 2])
    table = rope_cos_sin_cache(r, 64, 10000.0)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, r, 2).double() / r)
    torch.testing.assert_close(rope(x, pos, table, interleaved),
                               _rotate_complex(x, pos, inv_freq, interleaved),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 128,
     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_tables_match_transformers(scaling):
    dim, base = 32, 10000.0
    cfg = transformers.LlamaConfig(hidden_size=dim * 2, num_attention_heads=2, head_dim=dim,
                                   max_position_embeddings=512,
                                   rope_parameters={"rope_theta": base, **scaling})
    inv_freq, attn = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    table = rope_cos_sin_cache(dim, 512, base, scaling)
    freqs = torch.outer(torch.arange(512).float(), inv_freq.float())
    want = torch.cat([freqs.cos() * attn, freqs.sin() * attn], -1)
    torch.testing.assert_close(table, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(table, rope_cos_sin_cache(dim, 512, base))  # scaling did something


def test_rope_errors():
    with pytest.raises(ValueError, match="unsupported rope scaling type 'dynamic'"):
        rope_cos_sin_cache(8, 16, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="exceeds head dim"):
        rope(torch.randn(2, 1, 4), torch.zeros(2, dtype=torch.long),
             rope_cos_sin_cache(8, 4, 1e4), False)
