"""Checkpoint name maps: where each model parameter comes from in a Hugging Face checkpoint.

A model class carries `CHECKPOINT_MAP`, a tuple of `Rule`s (a class-level table, STYLE.md §4).
Patterns use `{L}` for a layer index, `{E}` for an expert index and `{*}` for "the rest of
the name". A parameter may be assembled from several checkpoint tensors:

* `{E}` in the checkpoint pattern stacks one tensor per expert along the parameter's dim 0
  (`experts.w13[e]` <- `mlp.experts.{e}.gate_proj.weight` ...);
* `part=(dim, index, count)` places the tensor as chunk `index` of `count` equal chunks
  along `dim` (the fused `gate_up_proj` = [gate ; up]).

Rules sharing a parameter pattern all contribute; the first pattern that matches a parameter
name wins, so specific rules come before the catch-all `Rule("{*}", "model.{*}")`.
`resolve()` turns a model and its map into `Piece`s: (parameter, destination index,
checkpoint key). The loader reads pieces; `plan_pieces()` turns them into the sharding
plan's explicit regions (`tscompile.plan.CheckpointPiece`), which `runtime/shards.py` slices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from tscompile.plan import CheckpointPiece


@dataclass(frozen=True, slots=True)
class Rule:
    param: str
    ckpt: str
    part: tuple[int, int, int] | None = None  # (dim, index, count)


@dataclass(frozen=True, slots=True)
class Piece:
    param: str                         # model parameter (or persistent buffer) name
    index: tuple[int | slice, ...]     # where in the parameter this checkpoint tensor goes
    shape: tuple[int, ...]             # expected checkpoint tensor shape
    ckpt: str                          # checkpoint key


def _regex(pattern: str) -> re.Pattern[str]:
    out = re.escape(pattern)
    out = out.replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{\*\}", r"(?P<rest>.+)")
    return re.compile(out + "$")


def loadable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters plus persistent buffers (e.g. a router's correction bias), shared weights
    (tied embeddings) listed once under their first name."""
    out = dict(model.named_parameters())
    non_persistent = {f"{prefix}.{name}" if prefix else name
                      for prefix, mod in model.named_modules()
                      for name in mod._non_persistent_buffers_set}
    for name, buf in model.named_buffers():
        if name not in non_persistent:
            out[name] = buf
    return out


def resolve(model: nn.Module, rules: tuple[Rule, ...]) -> list[Piece]:
    pieces: list[Piece] = []
    for name, tensor in loadable_tensors(model).items():
        group: list[Rule] = []
        match = None
        for rule in rules:
            m = _regex(rule.param).match(name)
            if m and (not group or rule.param == group[0].param):
                group.append(rule)
                match = match or m
        if not group:
            raise KeyError(f"parameter {name} has no rule in {type(model).__name__}.CHECKPOINT_MAP")
        fields = {k: v for k, v in match.groupdict().items() if v is not None}
        for rule in group:
            pieces.extend(_pieces(name, tuple(tensor.shape), rule, fields))
    return pieces


def _pieces(name: str, shape: tuple[int, ...], rule: Rule, fields: dict[str, str]) -> list[Piece]:
    experts = "{E}" in rule.ckpt
    inner = shape[1:] if experts else shape
    index: list[int | slice] = [slice(None)] * len(inner)
    if rule.part is not None:
        dim, i, count = rule.part
        if inner[dim] % count:
            raise ValueError(f"{name}: dim {dim} of size {inner[dim]} does not split into {count}")
        step = inner[dim] // count
        index[dim] = slice(i * step, (i + 1) * step)
        inner = inner[:dim] + (step,) + inner[dim + 1:]
    key = rule.ckpt.replace("{L}", fields.get("L", "{L}")).replace("{*}", fields.get("rest", ""))
    if not experts:
        return [Piece(name, tuple(index), inner, key)]
    return [Piece(name, (e, *index), inner, key.replace("{E}", str(e))) for e in range(shape[0])]


def fused_gate_up(param: str, ckpt: str) -> tuple[Rule, Rule]:
    """`{param}.gate_up_proj.weight` = [`{ckpt}.gate_proj.weight` ; `{ckpt}.up_proj.weight`]."""
    return (Rule(f"{param}.gate_up_proj.weight", f"{ckpt}.gate_proj.weight", part=(0, 0, 2)),
            Rule(f"{param}.gate_up_proj.weight", f"{ckpt}.up_proj.weight", part=(0, 1, 2)))


def stacked_experts(param: str, ckpt: str) -> tuple[Rule, Rule, Rule]:
    """MoE expert weights `{param}.w13[e]` = [gate_e ; up_e] and `{param}.w2[e]` = down_e,
    from one checkpoint tensor per expert `{ckpt}.experts.{E}.{gate,up,down}_proj.weight`."""
    return (Rule(f"{param}.w13", f"{ckpt}.experts.{{E}}.gate_proj.weight", part=(0, 0, 2)),
            Rule(f"{param}.w13", f"{ckpt}.experts.{{E}}.up_proj.weight", part=(0, 1, 2)),
            Rule(f"{param}.w2", f"{ckpt}.experts.{{E}}.down_proj.weight"))


def plan_pieces(pieces: list[Piece],
                shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[CheckpointPiece, ...]]:
    """`resolve()`'s pieces as the sharding plan's `CheckpointPiece`s, grouped by parameter
    (in `pieces` order): every index entry becomes an explicit (start, stop) over the
    parameter's global shape `shapes[param]`, so the plan can be sliced without knowing
    the rule that made it; an int entry (a stacked expert) becomes (i, i + 1) and is listed
    in `squeeze` because the checkpoint tensor has no such dim."""
    out: dict[str, list[CheckpointPiece]] = {}
    for p in pieces:
        if p.param not in shapes:
            raise KeyError(f"plan_pieces: no shape given for parameter {p.param} "
                           f"(piece {p.ckpt!r}); pass shapes for every resolved parameter")
        shape = tuple(shapes[p.param])
        if len(p.index) != len(shape):
            raise ValueError(f"plan_pieces: piece {p.ckpt!r} indexes {len(p.index)} dims of "
                             f"parameter {p.param} with shape {list(shape)}")
        region: list[tuple[int, int]] = []
        squeeze: list[int] = []
        for d, (i, size) in enumerate(zip(p.index, shape)):
            if isinstance(i, int):
                region.append((i, i + 1))
                squeeze.append(d)
            else:
                start, stop, step = i.indices(size)
                if step != 1:
                    raise ValueError(f"plan_pieces: piece {p.ckpt!r} of {p.param} uses a "
                                     f"strided index on dim {d}; regions must be contiguous")
                region.append((start, stop))
        # The region must agree with the checkpoint shape resolve() expects, or the plan
        # and the single-device loader would disagree about the same tensor.
        spans = tuple(b - a for d, (a, b) in enumerate(region) if d not in squeeze)
        if spans != tuple(p.shape):
            raise ValueError(f"plan_pieces: piece {p.ckpt!r} of {p.param} spans {list(spans)} "
                             f"but its checkpoint shape is {list(p.shape)}")
        out.setdefault(p.param, []).append(
            CheckpointPiece(p.ckpt, tuple(region), tuple(squeeze)))
    return {k: tuple(v) for k, v in out.items()}
