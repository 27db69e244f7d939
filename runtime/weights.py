"""Weights: Hugging Face safetensors checkpoints (one file, or shards with an index).

What it is: reading tensors by checkpoint key (lazily, through `safe_open`, so a sharded
loader can later read only its slices) and copying them into a model through its
`CHECKPOINT_MAP` (`models/checkpoint.py`). What it is not: sharding (the compiler's plan
decides slices; this file is the single-device path), dummy weights
(runtime/dummy_weights.py) or pickle loading (never).
"""
from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tscompile.models.checkpoint import loadable_tensors, resolve

log = logging.getLogger("tscompile.weights")


class Checkpoint:
    """Keys -> tensors over `model.safetensors` or `model.safetensors.index.json` shards."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.dir} does not exist")
        self._stack = ExitStack()
        self._files: dict[str, object] = {}
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self._where: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            return
        found = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if len(found) != 1:
            what = ", ".join(found) if found else "no .safetensors file"
            raise FileNotFoundError(f"{self.dir} needs model.safetensors or "
                                    f"model.safetensors.index.json; found {what}")
        self._where = {k: found[0] for k in self._open(found[0]).keys()}

    def _open(self, name: str):
        if name not in self._files:
            path = self.dir / name
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint shard {path} named by the index is missing")
            self._files[name] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._files[name]

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The stored dtype as safetensors names it ("BF16", "F32", "F8_E4M3", ...)."""
        return self._open(self._where[key]).get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self._open(self._where[key]).get_tensor(key)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def load_checkpoint(model: nn.Module, directory: str | Path) -> None:
    """Fill every parameter and persistent buffer of `model` from an HF checkpoint folder.
    Fails naming the first missing key or the tensor whose shape disagrees."""
    pieces = resolve(model, type(model).CHECKPOINT_MAP)
    tensors = loadable_tensors(model)
    with Checkpoint(directory) as ckpt:
        missing = [p.ckpt for p in pieces if p.ckpt not in ckpt]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise KeyError(f"checkpoint {directory} is missing tensor {missing[0]!r}{more}, "
                           f"needed by parameter "
                           f"{next(p.param for p in pieces if p.ckpt == missing[0])}")
        for p in pieces:
            shape = ckpt.shape(p.ckpt)
            if shape != p.shape:
                raise ValueError(f"checkpoint tensor {p.ckpt!r} has shape {list(shape)} but "
                                 f"parameter {p.param}{_fmt_index(p.index)} expects "
                                 f"{list(p.shape)}")
            dst = tensors[p.param]
            dst[p.index].copy_(ckpt.get(p.ckpt).to(dst.dtype))
        used = {p.ckpt for p in pieces}
        unused = [k for k in ckpt.keys() if k not in used]
    if unused:
        log.info("checkpoint %s: %d tensors not used by %s (e.g. %s)", directory, len(unused),
                 type(model).__name__, unused[0])


def _fmt_index(index: tuple) -> str:
    if all(isinstance(i, slice) and i == slice(None) for i in index):
        return ""
    parts = [str(i) if isinstance(i, int) else
             (":" if i == slice(None) else f"{i.start}:{i.stop}") for i in index]
    return "[" + ", ".join(parts) + "]"
