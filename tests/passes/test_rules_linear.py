"""passes/rules/linear.py with a bias: column parallel splits the bias with the output dim
(n); row parallel (the contracted dim k split, a partial sum) keeps the bias whole and adds
it on rank 0 only (`x * (rank == 0)` before the linear, collectives.py row 7), so the sum
over ranks counts it once."""
from __future__ import annotations

import pytest
import sympy

from tscompile.passes.ir import T, target_name

from . import toys

@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name,module", [("bias_row", "mlp.down"),
                                         ("bias_row_input", "row.proj")])
def test_row_parallel_linear_adds_its_bias_on_rank0(tmp_path, world, name, module):
    built = toys.compile_toy(tmp_path, name, toys.PARITY[name], world)
    plan = {k: v["placement"] for k, v in built.manifest["tensors"].items()}
    assert plan[f"{module}.weight"] == "S(1)" and plan[f"{module}.bias"] == "R"
    # The bias is masked to rank 0 (R -> P) right before its linear, whose output is P.
    assert ("rank0", "R", "P", module.replace(".", "_") + "_bias") in [
        (c["kind"], c["from"], c["to"], c["value"]) for c in built.manifest["schedule"]]
    lin = next(n for n in built.stage.gm.graph.nodes if target_name(n) == "linear"
               and n.args[1].target == f"{module}.weight")
    mask = lin.args[2]
    assert target_name(mask) == "mul" and mask.args[0].target == f"{module}.bias"
    assert target_name(mask.args[1]) == "eq" and mask.args[1].args[1] == 0
    assert str(lin.meta["placement"]) == "P"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["bias_row", "bias_row_input"])
def test_row_parallel_bias_matches_single_device(world, name):
    toys.assert_parity(world, name)


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
