"""The redistribution table, row by row, on a toy model whose annotated modules ask for
sharded inputs and outputs (not what decoder layers do): the compiled program inserts the
expected collective for each row and still computes the single-device result on 2 ranks."""
from __future__ import annotations

import torch

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.kernels import build_metadata
from tscompile.models import load_model_file
from tscompile.runtime.distributed import StepsJob, run_steps
from tscompile.runtime.dummy_weights import init_dummy_weights

TOY = '''
from dataclasses import dataclass

from torch import nn

from tscompile.annotations import Partial, Replicate, Shard, placement


@dataclass(frozen=True)
class Cfg:
    vocab_size: int = 32


PRESETS = {"tiny": Cfg()}
CONFIG = Cfg


@placement(inputs=Shard(1), outputs=Partial())          # row-parallel: wants x split
class RowLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        return self.proj(x)


@placement(inputs=Replicate(), outputs=Shard(1))        # column-parallel: returns x split
class ColumnLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        return self.proj(x)


class Toy(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.a, self.b, self.c = RowLinear(), RowLinear(), ColumnLinear()
        self.head = nn.Linear(16, 32, bias=False)

    def forward(self, input_ids, positions, meta):
        x = self.embed(input_ids)             # R
        y = self.b(self.a(x))                 # R -> S(1) slice; P -> S(1) reduce-scatter
        x = x + y                             # P -> R all-reduce
        x = x + self.c(x)                     # S(1) -> R all-gather
        return self.head(x[meta.logits_indices])


MODEL = Toy
'''


def test_every_table_row_inserts_its_collective_and_keeps_the_numbers(tmp_path):
    path = tmp_path / "toy.py"
    path.write_text(TOY)
    built = build(str(path), preset="tiny", mesh=Mesh.build(2))
    rows = [(c["kind"], c["from"], c["to"], c["scope"]) for c in built.manifest["schedule"]]
    assert rows == [("slice", "R", "S(1)", "a"), ("reduce_scatter", "P", "S(1)", "b"),
                    ("all_reduce", "P", "R", ""), ("all_gather", "S(1)", "R", "")]
    prog = built.save(tmp_path / "toy.tsprog")

    module = load_model_file(str(path))
    toy = module.MODEL(module.CONFIG()).eval()
    init_dummy_weights(toy, seed=2)
    tokens = [3, 1, 4, 1, 5, 9, 2]
    meta = build_metadata([len(tokens)], [len(tokens)], [[0, 1]], 4, all_logits=True)
    with torch.no_grad():
        want = toy(torch.tensor(tokens), torch.arange(len(tokens)), meta)
    [[got]] = run_steps([StepsJob(str(prog), [[(0, tokens)]], dummy_seed=2)])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
