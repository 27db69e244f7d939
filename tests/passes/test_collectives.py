"""passes/collectives.py, the rows a decoder layer never reaches: R -> S(d)x2 (rank r
takes its share of every chunk, as `x.chunk(k, d)` then `.chunk(W, d)[r]` of each) and
S(a) -> S(b) (all_to_all splitting b, the dim that becomes sharded, and concatenating a,
the dim that was). Checked as structure (the slices' offsets for every rank against torch's
chunks; the all-to-all's dims against the kernel's shape contract) and as numbers (gloo
ranks against the single-device model)."""
from __future__ import annotations

import operator

import pytest
import sympy
import torch
from torch import fx

from tscompile.passes.ir import T

from . import toys


def schedule(built) -> list[tuple[str, str, str]]:
    return [(c["kind"], c["from"], c["to"]) for c in built.manifest["schedule"]]


def collective(built, kind: str) -> fx.Node:
    [n] = [n for n in built.stage.gm.graph.nodes if n.meta.get("collective", {}).get("kind")
           == kind]
    return n


def evaluate(a, rank: int) -> int:
    """An offset the program computes from `rank` (ints, rank, + - * //)."""
    if not isinstance(a, fx.Node):
        return a
    if a.op == "placeholder":
        assert a.target == "rank"
        return rank
    assert a.target in (operator.add, operator.sub, operator.mul, operator.floordiv), a
    return a.target(*(evaluate(b, rank) for b in a.args))


@pytest.mark.parametrize("world", [2, 4])
def test_chunked_slice_takes_each_ranks_share_of_every_chunk(tmp_path, world):
    built = toys.compile_toy(tmp_path, "chunked", toys.CHUNKED_SLICE, world)
    assert schedule(built) == [("slice", "R", "S(1)x2"), ("all_gather", "S(1)", "R")]
    cat = collective(built, "slice")
    assert cat.target is torch.cat and cat.meta["val"].shape == (T, sympy.Integer(32) / world)
    pieces, dim = cat.args
    columns = torch.arange(32)                                 # [2I]: gate then up
    for rank in range(world):
        got = []
        for p in pieces:
            assert p.target is torch.narrow and p.args[1] == dim == 1
            start, length = evaluate(p.args[2], rank), p.args[3]
            got.append(columns[start:start + length])
        want = torch.cat([c.chunk(world)[rank] for c in columns.chunk(2)])
        assert torch.equal(torch.cat(got), want), (rank, torch.cat(got), want)


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_splits_the_wanted_dim_and_concatenates_the_held_one(tmp_path, world):
    built = toys.compile_toy(tmp_path, "a2a", toys.ALL_TO_ALL, world)
    assert schedule(built) == [("all_to_all", "S(1)", "S(2)"), ("all_reduce", "P", "R")]
    a2a = collective(built, "all_to_all")
    x, split_dim, concat_dim = a2a.args
    # The kernel's contract (kernels/collectives.py): split_dim n -> n / W, concat_dim
    # m -> m * W. From x's per-rank shape it must give the per-rank shape of S(2).
    shape = list(x.meta["val"].shape)
    assert shape == [T, sympy.Integer(4) / world, 8]                      # S(1)
    shape[split_dim], shape[concat_dim] = shape[split_dim] / world, shape[concat_dim] * world
    assert tuple(shape) == a2a.meta["val"].shape == (T, 4, sympy.Integer(8) / world)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("toy", ["chunked_slice", "all_to_all"])
def test_lowered_redistributions_match_single_device(world, toy):
    toys.assert_parity(world, toy)
