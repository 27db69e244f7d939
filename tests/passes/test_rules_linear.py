"""passes/rules/linear.py with a bias: column parallel splits the bias with the output dim
(n); row parallel (the contracted dim k split, a partial sum) is refused, naming the weight
and its bias, since each rank would add the bias once (issue 17 will lower it instead)."""
from __future__ import annotations

import pytest
import sympy

from tscompile.passes.ir import T, target_name
from tscompile.passes.propagate import PlacementError

from . import toys

# x arrives split on its last (contracted) dim, so only a row-parallel linear could take it.
SPLIT_INPUT = toys.source('''
@placement(inputs=Shard(1), outputs=Partial())
class Row(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=True)

    def forward(self, x):
        return self.proj(x)
''', "self.row = Row()", "x = x + self.row(x)")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name,text,module", [
    ("mlp_down_bias", toys.mlp(up_bias=False, down_bias=True), "mlp"),
    ("row_bias", SPLIT_INPUT, "row")])
def test_row_parallel_linear_with_bias_is_refused(tmp_path, world, name, text, module):
    with pytest.raises(PlacementError) as e:
        toys.compile_toy(tmp_path, name, text, world)
    msg = str(e.value)
    weight = "mlp.down" if module == "mlp" else "row.proj"
    for part in (f"cannot split {module} over group dense ({world} ranks)",
                 f"{weight}.weight has a bias ({weight}.bias)", "row parallel",
                 "added once per rank", "bias=False"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("world", [2, 4])
def test_column_parallel_linear_splits_its_bias(tmp_path, world):
    built = toys.compile_toy(tmp_path, "bias_column", toys.PARITY["bias_column"], world)
    plan = {k: v["placement"] for k, v in built.manifest["tensors"].items()}
    # "...k, nk, n -> ...n" with n split: weight [n, k] S(0), bias [n] S(0); down is the
    # row-parallel linear after it (no bias), weight [n, k] S(1), giving P.
    assert plan == {"embed.weight": "R", "mlp.up.weight": "S(0)", "mlp.up.bias": "S(0)",
                    "mlp.down.weight": "S(1)", "head.weight": "R"}
    assert [(c["kind"], c["from"], c["to"]) for c in built.manifest["schedule"]] == [
        ("all_reduce", "P", "R")]
    up = next(n for n in built.stage.gm.graph.nodes if target_name(n) == "linear"
              and n.args[1].target == "mlp.up.weight")
    assert up.meta["val"].shape == (T, sympy.Integer(32) / world)
    assert up.args[2].target == "mlp.up.bias"


@pytest.mark.parametrize("world", [2, 4])
def test_column_parallel_bias_matches_single_device(world):
    toys.assert_parity(world, "bias_column")
