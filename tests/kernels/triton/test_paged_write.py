"""Triton write_slots2 (kernels/triton/paged.py) against the reference scatter, for both
cache layouts (GQA's K and V pools, MLA's latent and rope columns of one pool), strided
sources (a narrow view of a packed projection), and an FP8 pool's saturation."""
from __future__ import annotations

import pytest
import torch

from tscompile.kernels.paged import write_slots2, write_slots2_reference


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("TSCOMPILE_KERNELS", "write_slots2=triton")


def _both(make, slots, a, b):
    ours, ref = make(), make()
    write_slots2(*ours[:2], slots, a, b)
    write_slots2_reference(*ref[:2], slots, a, b)
    return ours[2], ref[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_k_and_v_pools(dtype):
    nb, ps, hkv, d, t = 5, 4, 2, 8, 6
    slots = torch.tensor([3, 17, 0, 9, 19, 4])
    packed = torch.randn(t, (4 + 2 * hkv) * d).to(dtype)      # q | k | v of a packed matmul
    k = packed[:, 4 * d:(4 + hkv) * d].view(t, hkv, d)
    v = packed[:, (4 + hkv) * d:].view(t, hkv, d)

    def make():
        cache = torch.zeros(2, nb, ps, hkv, d, dtype=dtype)
        return cache[0], cache[1], cache
    ours, ref = _both(make, slots, k, v)
    assert torch.equal(ours, ref) and ours.abs().sum() > 0


def test_mla_latent_and_rope_columns():
    nb, ps, rank, rope, t = 3, 4, 16, 8, 5
    slots = torch.tensor([1, 2, 11, 5, 0])
    kv_c, k_pe = torch.randn(t, rank), torch.randn(t, rope)

    def make():
        cache = torch.zeros(nb, ps, rank + rope)
        return cache[..., :rank], cache[..., rank:], cache
    ours, ref = _both(make, slots, kv_c, k_pe)
    assert torch.equal(ours, ref)
    assert torch.equal(ours.view(-1, rank + rope)[11], torch.cat([kv_c[2], k_pe[2]]))


def test_fp8_pool_saturates_like_the_reference():
    slots = torch.tensor([0, 3])
    k = torch.tensor([[[1000.0, -1e6, 0.5, 2.0]], [[3.0, -4.0, 448.0, -449.0]]])

    def make():
        cache = torch.zeros(2, 2, 2, 1, 4, dtype=torch.float8_e4m3fn)
        return cache[0], cache[1], cache
    ours, ref = _both(make, slots, k, -k)
    assert torch.equal(ours.float(), ref.float())
    assert not ours.float().isnan().any() and ours.float().abs().max() == 448


def test_a_pool_that_is_not_slot_rows_is_named():
    cache = torch.zeros(2, 3, 4, 8)[..., ::2]                  # strided columns
    with pytest.raises(ValueError, match="write_slots2 \\(triton\\): dst_a"):
        write_slots2(cache, cache, torch.tensor([0]), torch.ones(1, 4), torch.ones(1, 4))
