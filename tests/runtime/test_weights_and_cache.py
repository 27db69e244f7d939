"""Dummy weights (deterministic, sensible scale) and the KV block allocator."""
from __future__ import annotations

import pytest
import torch

from tscompile.models import BUILTIN, load_model_file
from tscompile.runtime import load_model
from tscompile.runtime.kv_cache import BlockAllocator
from tscompile.runtime.offline import PagedRunner


@pytest.mark.parametrize("family", BUILTIN)
def test_dummy_weights_are_deterministic_and_sane(family):
    a, cfg = load_model(family, preset="tiny", dummy_weights=True, seed=3)
    b, _ = load_model(family, preset="tiny", dummy_weights=True, seed=3)
    c, _ = load_model(family, preset="tiny", dummy_weights=True, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].dim() == 2)
    runner = PagedRunner(a, page_size=4, num_blocks=8)
    sid = runner.add()
    logits = runner.step([(sid, [1, 2, 3, 4, 5])], all_logits=True)
    assert torch.isfinite(logits).all()
    assert 0.05 < logits.std().item() < 20, logits.std()  # neither dead nor exploding


def test_every_preset_builds_on_meta():
    for family in BUILTIN:
        module = load_model_file(family)
        for name, cfg in module.PRESETS.items():
            with torch.device("meta"):
                model = module.MODEL(cfg)
            assert sum(p.numel() for p in model.parameters()) > 0, (family, name)


def test_block_allocator_owns_each_block_once():
    alloc = BlockAllocator(6)
    a, b = alloc.allocate(2), alloc.allocate(3)
    assert sorted(a + b) == [0, 1, 2, 3, 4] and alloc.num_free == 1
    with pytest.raises(MemoryError, match="need 2, 1 free of 6"):
        alloc.allocate(2)
    alloc.free(a)
    with pytest.raises(ValueError, match="block 0 freed but not allocated"):
        alloc.free([0])
    alloc.free(b)
    assert alloc.num_free == 6


def test_runner_interleaves_sequences_and_frees_blocks():
    """Two sequences stepped together (one decoding, one prefilling, fed in either order)
    give the same logits as each run alone."""
    model, _ = load_model("llama", preset="tiny", dummy_weights=True)
    alone = []
    for prompt, nxt in (([1, 2, 3], 9), ([4, 5, 6, 7, 8, 9, 10], 11)):
        r = PagedRunner(model, page_size=2, num_blocks=16)
        s = r.add()
        r.step([(s, prompt)])
        alone.append(r.step([(s, [nxt])])[0])
    r = PagedRunner(model, page_size=2, num_blocks=16)
    s0, s1 = r.add(), r.add()
    r.step([(s0, [1, 2, 3])])
    r.step([(s1, [4, 5, 6, 7, 8, 9])])  # s1 prefills all but its last prompt token
    both = r.step([(s1, [10, 11]), (s0, [9])])  # s1: a 2-token chunk; s0: a decode
    torch.testing.assert_close(both[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[0], alone[1], atol=1e-5, rtol=1e-5)
    r.free(s0)
    r.free(s1)
    assert r.allocator.num_free == 16
