"""Tiny model files for the pass tests, each a few lines around one compiler path, and the
oracle they share: the compiled program on W gloo CPU ranks against the single-device model
(same dummy weights), for every parity toy in one launch per world size.

Every toy is embed [T, 16] R -> one annotated module (or two) -> residual add -> LM head,
so the module's placements decide which collectives appear. Legend: T tokens, H = 4 heads,
D = 8 per head, I = 16 gate/up width.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.kernels import build_metadata
from tscompile.runtime import load_model
from tscompile.runtime.distributed import StepsJob, run_steps

SEED = 3
# T = 7, odd: a view that kept a global size on a split dim cannot silently regroup rows.
TOKENS = [3, 1, 4, 1, 5, 9, 2]
ATOL = 1e-5                             # fp32; the sums over 2 or 4 ranks reorder adds

HEADER = '''
from dataclasses import dataclass

import torch
from torch import nn

from tscompile.annotations import Partial, Replicate, Shard, placement
from tscompile.kernels import silu_and_mul


@dataclass(frozen=True)
class Cfg:
    vocab_size: int = 32


PRESETS = {"tiny": Cfg()}
CONFIG = Cfg
'''

MODEL = '''

class Toy(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        {children}
        self.head = nn.Linear(16, 32, bias=False)

    def forward(self, input_ids, positions, meta):
        x = self.embed(input_ids)                      # [T, 16] R
        {body}
        return self.head(x[meta.logits_indices])


MODEL = Toy
'''


def source(modules: str, children: str, body: str) -> str:
    return HEADER + modules + MODEL.format(children=children, body=body)


def heads(view: str = "self.proj(x).view(-1, 4, 8)", move: str = "h.permute(0, 2, 1)") -> str:
    """Heads split by the search: proj column parallel -> `view` [T, H, D] S(1) -> `move`
    [T, D, H] S(2) -> the sum over (split) heads is a partial sum -> out -> P."""
    return source(f'''
@placement(inputs=Replicate(), outputs=Partial())
class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32, bias=False)      # [H*D, 16]
        self.out = nn.Linear(8, 16, bias=False)        # [16, D]

    def forward(self, x):
        h = {view}                                     # [T, H, D]
        h = {move}                                     # [T, D, H]
        return self.out(h.sum(-1))                     # [T, D] -> [T, 16]
''', "self.heads = Heads()", "x = x + self.heads(x)")


def mlp(up_bias: bool, down_bias: bool) -> str:
    """up (column parallel) -> relu -> down (row parallel) -> P, with or without biases."""
    return source(f'''
@placement(inputs=Replicate(), outputs=Partial())
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32, bias={up_bias})
        self.down = nn.Linear(32, 16, bias={down_bias})

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))
''', "self.mlp = Mlp()", "x = x + self.mlp(x)")


# R -> S(1)x2 outside, then silu_and_mul's [gate ; up] rule inside: each rank needs its
# share of the gate half and of the up half (two pieces), then S(1) -> R all-gather.
CHUNKED_SLICE = source('''
@placement(inputs=Shard(1, 2), outputs=Shard(1))
class GatedAct(nn.Module):
    def forward(self, h):                              # [T, 2I] -> [T, I]
        return silu_and_mul(h)
''', "self.up = nn.Linear(16, 32, bias=False)\n        self.act = GatedAct()",
    "x = x + self.act(self.up(x))")

# S(1) -> S(2) between two annotated modules: heads split out of the first, head_dim split
# into the second (an all-to-all), whose reshape then merges [T, D, H] with D split.
ALL_TO_ALL = source('''
@placement(inputs=Replicate(), outputs=Shard(1))
class SplitHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32, bias=False)

    def forward(self, x):
        return self.proj(x).view(-1, 4, 8)             # [T, H, D] S(1)


@placement(inputs=Shard(2), outputs=Partial())
class MergeDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(32, 16, bias=False)

    def forward(self, h):                              # [T, H, D] S(2)
        return self.out(h.transpose(1, 2).reshape(-1, 32))   # [T, D*H] S(1) -> P
''', "self.split = SplitHeads()\n        self.merge = MergeDims()",
    "x = x + self.merge(self.split(x))")

# x arrives split on its last (contracted) dim, so only a row-parallel linear can take it;
# its bias is added on rank 0 only.
SPLIT_INPUT = source('''
@placement(inputs=Shard(1), outputs=Partial())
class Row(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=True)

    def forward(self, x):
        return self.proj(x)
''', "self.row = Row()", "x = x + self.row(x)")

# The toys `parity` runs at each world size: name -> model source.
PARITY = {
    "permute_function": heads(move="torch.permute(h, (0, 2, 1))"),
    "permute_method": heads(move="h.permute(0, 2, 1)"),
    "reshape_function": heads(view="torch.reshape(self.proj(x), (-1, 4, 8))",
                              move="h.transpose(1, 2)"),
    "chunked_slice": CHUNKED_SLICE,
    "all_to_all": ALL_TO_ALL,
    "bias_column": mlp(up_bias=True, down_bias=False),
    "bias_row": mlp(up_bias=True, down_bias=True),
    "bias_row_input": SPLIT_INPUT,
}


def write(folder: Path, name: str, text: str) -> str:
    path = Path(folder) / f"{name}.py"
    path.write_text(text)
    return str(path)


def compile_toy(folder: Path, name: str, text: str, world: int):
    return build(write(folder, name, text), preset="tiny", mesh=Mesh.build(world))


def _eager(path: str) -> torch.Tensor:
    net, _ = load_model(path, preset="tiny", dummy_weights=True, seed=SEED)
    t = len(TOKENS)                     # no attention: the metadata only picks the rows
    meta = build_metadata([t], [t], [[0, 1]], 4, all_logits=True)
    with torch.no_grad():
        return net(torch.tensor(TOKENS), torch.arange(t), meta)


def _launch(jobs: list[StepsJob]) -> list[torch.Tensor | str]:
    """Rank 0's logits per job. One launch for all; if it fails, one launch per job, so
    each error lands on the toy that caused it (only a broken compiler pays for that)."""
    try:
        return [steps[0] for steps in run_steps(jobs)]
    except RuntimeError:
        pass
    out: list[torch.Tensor | str] = []
    for job in jobs:
        try:
            out.append(run_steps([job])[0][0])
        except RuntimeError as e:
            out.append(str(e)[-2000:])
    return out


@functools.cache
def parity(world: int) -> dict[str, float | str]:
    """toy -> max |compiled - single-device| over its logits on `world` ranks, or the
    error (build or run) as text."""
    result: dict[str, float | str] = {}
    with tempfile.TemporaryDirectory(prefix=f"toys_w{world}_") as tmp:
        jobs, refs = {}, {}
        for name, text in PARITY.items():
            try:
                built = compile_toy(Path(tmp), name, text, world)
            except Exception as e:          # a compiler error is this toy's result
                result[name] = f"build failed: {type(e).__name__}: {e}"
                continue
            prog = built.save(Path(tmp) / f"{name}.tsprog")
            jobs[name] = StepsJob(str(prog), [[(0, TOKENS)]], dummy_seed=SEED, num_blocks=8)
            refs[name] = _eager(str(Path(tmp) / f"{name}.py"))
        for name, got in zip(jobs, _launch(list(jobs.values()))):
            if isinstance(got, str) or got.shape != refs[name].shape:
                result[name] = got if isinstance(got, str) else f"logits {list(got.shape)}"
            else:
                result[name] = float((got - refs[name]).abs().max())
    return result


def assert_parity(world: int, name: str) -> None:
    err = parity(world)[name]
    assert not isinstance(err, str), f"{name} at tp {world}: {err}"
    assert err < ATOL, f"{name} at tp {world}: max |compiled - single device| = {err:.3g}"
