"""passes/rules/view.py: a shard moves with its dim through permute and transpose, whatever
the call form (torch.permute(x, dims), x.permute(*dims), x.permute(dims), dims=...,
negative dims). The oracle is torch itself: on a tensor whose dims all have different
sizes, the sharded dim goes where its size went."""
from __future__ import annotations

import itertools

import pytest
import sympy
import torch
from torch import fx

from tscompile.annotations import Partial, Replicate, Shard
from tscompile.passes.ir import T, TensorVal, target_name
from tscompile.passes.rules import Ctx, lookup

from . import toys

SIZES = (2, 3, 5)                       # distinct: a dim is found again by its size


def _val(shape) -> TensorVal:
    return TensorVal(tuple(sympy.Integer(s) for s in shape), torch.float32)


def placed(expr: str, sizes: tuple[int, ...], known) -> tuple[object, torch.Size]:
    """The one strategy the rule gives `expr` (over `x` of `sizes` placed `known`), and the
    output shape torch computes."""
    fn = eval(f"lambda x: {expr}", {"torch": torch})
    gm = fx.symbolic_trace(fn)
    x, op = [n for n in gm.graph.nodes if n.op != "output"]
    out = fn(torch.empty(sizes))
    x.meta["val"], op.meta["val"] = _val(sizes), _val(out.shape)
    [strategy] = lookup(target_name(op))(op, Ctx(2, "tp", lambda n: known if n is x else None))
    assert strategy.inputs == (known,)
    return strategy.output, out.shape


PERMUTES = ["torch.permute(x, {p})", "torch.permute(x, dims={p})", "x.permute{p}",
            "x.permute({p})", "x.permute(dims={p})", "x.permute{n}", "torch.permute(x, {n})"]
TRANSPOSES = ["x.transpose({a}, {b})", "torch.transpose(x, {a}, {b})",
              "x.transpose(dim0={a}, dim1={b})", "torch.transpose(x, {na}, {nb})"]


@pytest.mark.parametrize("form", PERMUTES)
def test_permute_moves_the_shard_with_its_dim(form):
    for perm in itertools.permutations(range(3)):
        expr = form.format(p=perm, n=tuple(d - 3 for d in perm))    # n: negative dims
        for d in range(3):
            got, shape = placed(expr, SIZES, Shard(d))
            assert got == Shard(shape.index(SIZES[d])), (expr, d, got)


@pytest.mark.parametrize("form", TRANSPOSES)
def test_transpose_moves_the_shard_with_its_dim(form):
    for a, b in itertools.combinations(range(3), 2):
        expr = form.format(a=a, b=b, na=a - 3, nb=b - 3)
        for d in range(3):
            got, shape = placed(expr, SIZES, Shard(d, 2))
            assert got == Shard(shape.index(SIZES[d]), 2), (expr, d, got)


def test_t_and_unsharded_values():
    got, shape = placed("x.t()", SIZES[:2], Shard(0))
    assert got == Shard(shape.index(SIZES[0]))
    for p in (Replicate(), Partial()):      # linear data movement: R and P pass through
        assert placed("torch.permute(x, (2, 0, 1))", SIZES, p)[0] == p
        assert placed("x.transpose(0, 2)", SIZES, p)[0] == p


# Compiled: heads are split ([T, H, D] S(1)), then [T, D, H]; every form must compile the
# same program, with the heads dim (1) moved to where (0, 2, 1) puts it.
MOVES = ["torch.permute(h, (0, 2, 1))", "torch.permute(h, dims=(0, 2, 1))",
         "h.permute(0, 2, 1)", "h.permute((0, 2, 1))", "h.transpose(1, 2)",
         "torch.transpose(h, 1, 2)", "h.transpose(-1, -2)"]
HEADS_DIM = (0, 2, 1).index(1)


@pytest.mark.parametrize("world", [2, 4])
def test_every_permute_form_compiles_to_the_method_forms_placements(tmp_path, world):
    programs = {}
    for i, move in enumerate(MOVES):
        built = toys.compile_toy(tmp_path, f"heads_{i}", toys.heads(move=move), world)
        nodes = list(built.stage.gm.graph.nodes)
        [moved] = [n for n in nodes if target_name(n).split(":")[-1] in ("permute", "transpose")]
        assert moved.meta["placement"] == Shard(HEADS_DIM), (move, moved.meta["placement"])
        assert moved.meta["val"].shape == (T, 8, sympy.Integer(4) / world), move
        programs[move] = ([str(n.meta.get("placement")) for n in nodes],
                          [(c["kind"], c["from"], c["to"]) for c in built.manifest["schedule"]],
                          {k: v["placement"] for k, v in built.manifest["tensors"].items()})
    reference = programs["h.permute(0, 2, 1)"]
    assert reference[1] == [("all_reduce", "P", "R")]
    assert reference[2]["heads.proj.weight"] == "S(0)"          # column parallel: heads
    for move, got in programs.items():
        assert got == reference, move


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("toy", ["permute_function", "permute_method"])
def test_permuted_heads_match_single_device(world, toy):
    toys.assert_parity(world, toy)
