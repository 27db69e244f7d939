"""The sample kernel: greedy, filters, and counter-based seeded draws."""
from __future__ import annotations

import pytest
import torch

from tscompile.kernels import sample
from tscompile.kernels.sample import apply_filters


def _args(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0):
    return (torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.int32),
            torch.full((n,), top_p), torch.full((n,), min_p),
            torch.full((n,), seed, dtype=torch.int64), torch.full((n,), offset, dtype=torch.int64))


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, *_args(4, temperature=0.0)), logits.argmax(-1))
    # top_k = 1 at any temperature is greedy too.
    assert torch.equal(sample(logits, *_args(4, temperature=2.0, top_k=1, seed=3)),
                       logits.argmax(-1))


def test_seeded_draws_are_reproducible_and_batch_independent():
    logits = torch.randn(1, 1000)
    alone = [int(sample(logits, *_args(1, seed=42, offset=i))[0]) for i in range(20)]
    again = [int(sample(logits, *_args(1, seed=42, offset=i))[0]) for i in range(20)]
    assert alone == again
    # Batched with other rows (other seeds), row 0 draws the same tokens.
    batch = torch.cat([logits, torch.randn(2, 1000)])
    seeds = torch.tensor([42, 7, 9])
    for i in range(20):
        args = list(_args(3, offset=i))
        args[4] = seeds
        assert int(sample(batch, *args)[0]) == alone[i]
    other = [int(sample(logits, *_args(1, seed=43, offset=i))[0]) for i in range(20)]
    assert other != alone


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log()[None].expand(4000, 4).contiguous()
    args = list(_args(4000, seed=1))
    args[5] = torch.arange(4000)  # 4000 independent draws
    counts = torch.bincount(sample(logits, *args), minlength=4).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03), counts


def test_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = lambda **kw: (apply_filters(logits, *[a for a in _args(1, **kw)[:4]]) > -1e9)[0].tolist()
    assert kept(top_k=2) == [True, True, False, False, False]
    p = torch.softmax(logits[0], 0)
    # top-p keeps the smallest prefix whose mass reaches p.
    assert kept(top_p=float(p[0] + p[1] / 2)) == [True, True, False, False, False]
    assert kept(top_p=float(p[0]) * 0.5) == [True, False, False, False, False]
    # min-p drops tokens below min_p * max prob.
    assert kept(min_p=float(p[2] / p[0]) * 0.99) == [True, True, True, False, False]
    draws = {int(sample(logits, *_args(1, top_k=2, offset=i))[0]) for i in range(200)}
    assert draws == {0, 1}


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="top_p must have shape"):
        args = list(_args(2))
        args[2] = torch.ones(3)
        sample(torch.randn(2, 5), *args)
