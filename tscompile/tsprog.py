"""The `.tsprog` program format: a zip of

  manifest.json   format version, model (file, config), mesh, sharding plan per tensor
                  (checkpoint keys, dim, per-rank slices), KV-cache layout and bytes per
                  token, the collective schedule, pass timings, content hashes
  program.py      the generated SPMD program (codegen/)
  model.py        the model file it was compiled from (the runtime rebuilds derived
                  buffers such as RoPE tables from it)
  graph.json      the per-rank graph as data (nodes, per-rank shapes, placements): the
                  input of `tscompile export --onnx`
  dumps/NN_<pass>.txt   the graph after each pass, placements beside nodes

A .tsprog contains code: load it only from a source you trust. Weights are never inside.
Reading checks the format version and every file's SHA-256 against the manifest.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


class TsprogError(ValueError):
    pass


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Tsprog:
    path: Path
    manifest: dict[str, Any]
    files: dict[str, str]            # every file but the manifest, as text

    @property
    def program_source(self) -> str:
        return self.files["program.py"]

    @property
    def model_source(self) -> str:
        return self.files["model.py"]

    @property
    def world_size(self) -> int:
        return int(self.manifest["mesh"]["world_size"])


def write_tsprog(path: str | Path, manifest: dict[str, Any], files: dict[str, str]) -> Path:
    path = Path(path)
    manifest = dict(manifest, format_version=FORMAT_VERSION,
                    hashes={name: _sha(text.encode()) for name, text in sorted(files.items())})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest, indent=1, sort_keys=False))
        for name, text in sorted(files.items()):
            z.writestr(name, text)
    tmp.replace(path)                 # never leave a half-written program behind
    return path


def read_tsprog(path: str | Path) -> Tsprog:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .tsprog at {path}")
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise TsprogError(f"{path} is not a .tsprog (not a zip archive); build one with "
                          f"`tscompile build`") from None
    with z:
        names = set(z.namelist())
        if "manifest.json" not in names:
            raise TsprogError(f"{path} has no manifest.json; not a .tsprog")
        manifest = json.loads(z.read("manifest.json"))
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise TsprogError(f"{path} has .tsprog format version {version}; this tscompile "
                              f"reads version {FORMAT_VERSION}: rebuild it with `tscompile build`")
        hashes = manifest.get("hashes", {})
        files = {}
        for name, want in hashes.items():
            if name not in names:
                raise TsprogError(f"{path}: {name} is listed in the manifest but missing")
            data = z.read(name)
            if _sha(data) != want:
                raise TsprogError(f"{path}: {name} does not match its manifest hash (the file "
                                  f"was modified or corrupted); rebuild with `tscompile build`")
            files[name] = data.decode()
        extra = names - set(hashes) - {"manifest.json"}
        if extra:
            raise TsprogError(f"{path}: files not covered by the manifest hashes: "
                              f"{sorted(extra)[:3]}")
    for need in ("program.py", "model.py"):
        if need not in files:
            raise TsprogError(f"{path}: no {need}")
    return Tsprog(path, manifest, files)
