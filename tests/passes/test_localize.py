"""passes/localize.py: the graph one rank runs. A literal size that model code writes for a
sharded dim (`h.view(-1, 4, 8)` with the 4 heads split) becomes the rank's share (4 / W),
in whichever call form it was written; other literals, -1 and sizes read from a tensor stay;
every sharded value's shape is divided on its sharded dim."""
from __future__ import annotations

import pytest
import sympy
from torch import fx

from tscompile.annotations import Shard
from tscompile.passes.ir import T, target_name

from . import toys

# (view, sizes passed as one sequence)
VIEWS = [("self.proj(x).view(-1, 4, 8)", False), ("self.proj(x).view((-1, 4, 8))", True),
         ("self.proj(x).reshape(-1, 4, 8)", False),
         ("torch.reshape(self.proj(x), (-1, 4, 8))", True),
         ("self.proj(x).view(x.shape[0], 4, 8)", False)]


def views(built) -> list:
    return [n for n in built.stage.gm.graph.nodes
            if target_name(n) in ("method:view", "method:reshape", "reshape")]


def sizes(n) -> tuple[list, bool]:
    """A view's sizes and whether they were passed as one sequence."""
    packed = isinstance(n.args[1], (list, tuple))
    return list(n.args[1] if packed else n.args[1:]), packed


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("view,packed", VIEWS)
def test_literal_view_size_on_the_split_dim_is_divided(tmp_path, world, view, packed):
    built = toys.compile_toy(tmp_path, "heads", toys.heads(view=view), world)
    [n] = views(built)
    assert n.meta["placement"] == Shard(1)                    # [T, H, D], heads split
    got, as_one = sizes(n)
    assert as_one == packed                                   # the call form is kept
    assert got[1:] == [4 // world, 8]                         # H literal divided, D kept
    assert got[0] == -1 if "-1" in view else isinstance(got[0], fx.Node)   # T untouched
    assert n.meta["val"].shape == (T, sympy.Integer(4) / world, sympy.Integer(8))


@pytest.mark.parametrize("world", [2, 4])
def test_merge_of_a_split_dim_divides_its_literal(tmp_path, world):
    """[T, D, H] with D split -> reshape(-1, 32): the merged dim is split (32 / W)."""
    built = toys.compile_toy(tmp_path, "a2a", toys.ALL_TO_ALL, world)
    split, merge = views(built)
    assert sizes(split) == ([-1, 4 // world, 8], False)
    assert (merge.meta["placement"], sizes(merge)) == (Shard(1), ([-1, 32 // world], False))
    assert merge.meta["val"].shape == (T, sympy.Integer(32) / world)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("toy", ["reshape_function", "all_to_all"])
def test_localized_views_match_single_device(world, toy):
    toys.assert_parity(world, toy)
