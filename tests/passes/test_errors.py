"""Compiler errors name the module path, the parameter or op, the dim and size, the group
and give a hint: sizes that don't divide, conflicting annotations, an op with no rule
inside an annotated module, a bad mesh."""
from __future__ import annotations


import pytest

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.cli import main
from tscompile.passes.propagate import PlacementError

TEMPLATE = '''
from dataclasses import dataclass

import torch
from torch import nn

from tscompile.annotations import Partial, Replicate, Shard, placement


@dataclass(frozen=True)
class Cfg:
    vocab_size: int = 32


PRESETS = {{"tiny": Cfg()}}
CONFIG = Cfg

{mlp_annotation}
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down({inner})

{block_annotation}
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = Mlp()

    def forward(self, x):
        return self.mlp(x)


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.block = Block()
        self.head = nn.Linear(16, 32, bias=False)

    def forward(self, input_ids, positions, meta):
        x = self.embed(input_ids)
        x = x + self.block(x)
        return self.head(x[meta.logits_indices])


MODEL = Model
'''
R_TO_P = "@placement(inputs=Replicate(), outputs=Partial()"


def model_file(tmp_path, *, mlp=R_TO_P + ")", block="", inner="torch.relu(self.up(x))"):
    path = tmp_path / "toy.py"
    path.write_text(TEMPLATE.format(mlp_annotation=mlp, block_annotation=block, inner=inner))
    return str(path)


def test_toy_compiles(tmp_path):
    built = build(model_file(tmp_path), preset="tiny", mesh=Mesh.build(2))
    assert [c["kind"] for c in built.manifest["schedule"]] == ["all_reduce"]


def test_heads_that_do_not_divide():
    with pytest.raises(PlacementError) as e:
        build("llama", preset="smollm2-135m", mesh=Mesh.build(2))
    msg = str(e.value)
    for part in ("layers.0.self_attn", "group attn (2 ranks)", "dim 1 (size 9)",
                 "does not split over 2 ranks", "hint", "--attn-tp 1"):
        assert part in msg, (part, msg)


def test_parameter_that_does_not_divide():
    hf = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 130,
          "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 4}
    with pytest.raises(PlacementError) as e:
        build("llama", config=hf, mesh=Mesh.build(4))
    msg = str(e.value)
    for part in ("layers.0.mlp.gate_up_proj.weight", "dim 0 (size 260)", "group dense",
                 "4 ranks", "hint"):
        assert part in msg, (part, msg)


def test_op_without_rule_inside_annotated_module(tmp_path):
    path = model_file(tmp_path, inner="torch.cumsum(self.up(x), dim=0)")
    with pytest.raises(PlacementError, match=r"no sharding rule for op cumsum .* in block\.mlp"
                                             r".*annotated module block\.mlp.*hint"):
        build(path, preset="tiny", mesh=Mesh.build(2))
    # Outside any annotated module the same op simply runs replicated.
    plain = model_file(tmp_path, mlp="", inner="torch.cumsum(self.up(x), dim=0)")
    assert build(plain, preset="tiny", mesh=Mesh.build(2)).manifest["schedule"] == []


def test_conflicting_annotations(tmp_path):
    path = model_file(tmp_path, mlp=R_TO_P + ', params={"up.weight": Shard(0)})',
                      block=R_TO_P + ', params={"mlp.up.weight": Replicate()})')
    with pytest.raises(PlacementError, match=r"conflicting annotations for parameter "
                                             r"block\.mlp\.up\.weight: R from block and "
                                             r"S\(0\) from block\.mlp; hint"):
        build(path, preset="tiny", mesh=Mesh.build(2))


def test_pin_that_forces_communication(tmp_path):
    path = model_file(tmp_path, mlp=R_TO_P + ', params={"down.weight": Shard(0)})')
    with pytest.raises(PlacementError, match=r"cannot split block\.mlp over group dense "
                                             r"\(2 ranks\) without communication.*hint"):
        build(path, preset="tiny", mesh=Mesh.build(2))


def test_mesh_errors():
    with pytest.raises(ValueError, match="attn-tp=2 must be 1 or the world size 4"):
        Mesh.build(4, attn_tp=2)
    with pytest.raises(ValueError, match="either tensor parallel.*or expert parallel"):
        Mesh(world_size=2, attn_tp=2, dense_tp=2, moe_tp=2, moe_ep=2)


def test_cli_reports_one_line(tmp_path, capsys):
    rc = main(["build", "llama", "--preset", "smollm2-135m", "--tp", "2",
               "-o", str(tmp_path / "x.tsprog")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot split layers.0.self_attn")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.tsprog").exists()
    rc = main(["build", "models/nope.py", "--tp", "2", "-o", str(tmp_path / "y.tsprog")])
    assert rc == 2 and "model file models/nope.py not found" in capsys.readouterr().err


