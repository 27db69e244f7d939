"""Model files and how to find them.

A model file is plain single-device PyTorch and exposes, at module level:
`CONFIG` (a frozen config dataclass with `from_hf(dict)`), `PRESETS` (name -> config),
`MODEL` (the nn.Module class, with `forward(input_ids [T], positions [T], meta)` returning
logits for `meta.logits_indices`, and a class-level `CHECKPOINT_MAP`), and `HF_MODEL_TYPES`
(the Hugging Face `model_type`s it can build from a `config.json`).

`load_model_file(spec)` takes a name or a path: a built-in name (`llama`), the name of a
`tscompile.models` entry point, or a path (`models/llama.py`, or any file of the same shape
outside this package). `model_file_for_hf(config)` finds the file by `model_type` among, in
this order: the built-in files, every installed package's `tscompile.models` entry points
(each names a module, e.g. in its pyproject.toml:
`[project.entry-points."tscompile.models"] gpt_neox = "my_models.gpt_neox"`), and the `*.py`
files that assign `HF_MODEL_TYPES` in the search-path directories (`--model-path`, then
`TSCOMPILE_MODEL_PATH`). Two files claiming the type is an error naming both: a file given
explicitly by path or name is the only way to override another, built-ins included.
`build_config()` resolves a preset or a config.json, checking the file claims its model_type.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tscompile import envs

log = logging.getLogger(__name__)

BUILTIN = ("llama", "qwen3", "kimi_k25", "glm4_moe", "gpt_oss")
ENTRY_POINT_GROUP = "tscompile.models"
CONTRACT = ("CONFIG", "PRESETS", "MODEL")
HOW_TO_REGISTER = ("give the file as the model argument (tscompile build my_model.py "
                   "--config ...), put it in a --model-path / TSCOMPILE_MODEL_PATH directory, "
                   f"or register its module as a {ENTRY_POINT_GROUP!r} entry point; the file "
                   "declares HF_MODEL_TYPES = ('<model_type>',)")
# A search-path file is imported only if it assigns HF_MODEL_TYPES at top level, so helper
# modules beside the model files are never run.
_DECLARES_TYPES = re.compile(r"^HF_MODEL_TYPES\s*[:=]", re.M)


def _check_contract(module: ModuleType, where: str) -> ModuleType:
    for attr in CONTRACT:
        if not hasattr(module, attr):
            raise ValueError(f"model file {where} does not define {attr} "
                             "(see tscompile.models for the model-file contract)")
    return module


def _load_path(path: Path) -> ModuleType:
    # A path into this package resolves to the package module, so classes are shared.
    here = Path(__file__).resolve().parent
    if path.resolve().parent == here and path.stem in BUILTIN:
        return importlib.import_module(f"tscompile.models.{path.stem}")
    # One module name per file (same-named files in two folders do not collide).
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    mod_spec = importlib.util.spec_from_file_location(
        f"tscompile_user_model_{path.stem}_{digest}", path)
    module = importlib.util.module_from_spec(mod_spec)
    # Registered before running it: dataclasses and pickling look classes up by module.
    sys.modules[mod_spec.name] = module
    try:
        mod_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_spec.name]
        raise
    return _check_contract(module, str(path))


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _entry_point_origin(ep: importlib.metadata.EntryPoint) -> str:
    package = ep.dist           # the installed distribution that declares it
    source = f", from {package.name} {package.version}" if package is not None else ""
    return f"entry point {ep.name!r} ({ep.value}{source})"


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> ModuleType:
    module = ep.load()
    if not isinstance(module, ModuleType):
        raise ValueError(f"{_entry_point_origin(ep)} names a {type(module).__name__}, not a "
                         "module: its value must be a module path like 'my_models.gpt_neox'")
    return _check_contract(module, _entry_point_origin(ep))


def load_model_file(spec: str | Path) -> ModuleType:
    spec_s = str(spec)
    if spec_s in BUILTIN:
        return importlib.import_module(f"tscompile.models.{spec_s}")
    path = Path(spec_s)
    if path.suffix == ".py" and path.is_file():
        return _load_path(path)
    if path.suffix == ".py":
        raise FileNotFoundError(f"model file {path} not found")
    eps = _entry_points()
    if spec_s in eps:
        return _load_entry_point(eps[spec_s])
    names = ", ".join((*BUILTIN, *sorted(eps)))
    raise ValueError(f"unknown model {spec_s!r}: give a model file path or one of {names}")


def hf_model_type(config: dict[str, Any]) -> str | None:
    """config.json's model_type; a multimodal config's language model's, when it nests one."""
    inner = config.get("text_config") if "hidden_size" not in config else None
    if isinstance(inner, dict) and inner.get("model_type"):
        return inner["model_type"]
    return config.get("model_type")


@dataclass(frozen=True, slots=True)
class Found:
    """A model file discovery found: how (for messages), the module and its claims."""
    origin: str
    module: ModuleType
    types: tuple[str, ...]


def _search_dirs(search_path: Sequence[str | Path]) -> list[tuple[Path, str]]:
    dirs = [(Path(d), "--model-path") for d in search_path]
    dirs += [(Path(d), envs.TSCOMPILE_MODEL_PATH.name) for d in envs.TSCOMPILE_MODEL_PATH.get()]
    for d, source in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"{source} entry {d} is not a directory")
    return dirs


def discover(search_path: Sequence[str | Path] = ()) -> tuple[list[Found], list[str]]:
    """Every model file that claims model types, and why each candidate that failed did.
    The same module reached twice (e.g. models/ on the search path) counts once."""
    found: list[Found] = []
    broken: list[str] = []

    def add(origin: str, load: Any) -> None:
        try:
            module = load()
            types = tuple(getattr(module, "HF_MODEL_TYPES", ()))
            if not types:
                raise ValueError("it declares no HF_MODEL_TYPES")
        except Exception as e:           # one broken package must not stop every build
            broken.append(f"{origin}: {type(e).__name__}: {e}")
            log.warning("skipping model file %s", broken[-1])
            return
        if all(f.module is not module for f in found):
            found.append(Found(origin, module, types))

    for name in BUILTIN:
        add(f"built-in {name} (tscompile.models.{name})", lambda n=name: load_model_file(n))
    for ep in _entry_points().values():
        add(_entry_point_origin(ep), lambda e=ep: _load_entry_point(e))
    for d, source in _search_dirs(search_path):
        for path in sorted(d.glob("*.py")):
            if not path.name.startswith("_") and _DECLARES_TYPES.search(path.read_text()):
                add(f"{path} (on {source})", lambda p=path: _load_path(p))
    return found, broken


def model_file_for_hf(config: dict[str, Any],
                      search_path: Sequence[str | Path] = ()) -> ModuleType:
    """The one model file whose HF_MODEL_TYPES has config.json's model_type."""
    model_type = hf_model_type(config)
    found, broken = discover(search_path)
    claims = [f for f in found if model_type in f.types]
    if len(claims) == 1:
        return claims[0].module
    if claims:
        raise ValueError(f"model_type {model_type!r} is claimed by {len(claims)} model files: "
                         f"{'; '.join(f.origin for f in claims)}; give the one to use as the "
                         "model argument (tscompile build FILE --config ...), or unregister "
                         "the others")
    known = sorted({t for f in found for t in f.types})
    failed = f"; not loaded: {'; '.join(broken)}" if broken else ""
    raise ValueError(f"config.json has model_type {model_type!r}, which no model file builds; "
                     f"known: {', '.join(known)}; to add one, {HOW_TO_REGISTER}{failed}")


def check_model_type(module: ModuleType, config: dict[str, Any]) -> None:
    """A model file builds only the model types it claims (a config without one passes)."""
    model_type = hf_model_type(config)
    types = tuple(getattr(module, "HF_MODEL_TYPES", ()))
    if model_type is None or model_type in types:
        return
    claims = f"claims {', '.join(map(repr, types))}" if types else "declares no HF_MODEL_TYPES"
    raise ValueError(f"config.json has model_type {model_type!r} but model file "
                     f"{module.__file__} {claims}; give that file a config.json of its type, "
                     f"or drop the model argument to find the file for {model_type!r}"
                     + ("" if types else f" (or add HF_MODEL_TYPES = ({model_type!r},) to it)"))


def read_hf_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    d = json.loads(path.read_text())
    # Multimodal checkpoints (e.g. Kimi K2.5) nest the language model's config.
    return d.get("text_config", d) if "hidden_size" not in d else d


def build_config(module: ModuleType, *, preset: str | None = None,
                 config: str | Path | dict[str, Any] | None = None):
    """A config from a preset name, an HF config.json (path or dict), or the file's `tiny`."""
    if preset is not None and config is not None:
        raise ValueError("give either a preset or a config, not both")
    if preset is not None:
        if preset not in module.PRESETS:
            raise ValueError(f"unknown preset {preset!r} for {module.__name__}; known presets: "
                             f"{', '.join(sorted(module.PRESETS))}")
        return module.PRESETS[preset]
    if config is not None:
        d = config if isinstance(config, dict) else read_hf_config(config)
        check_model_type(module, d)
        return module.CONFIG.from_hf(d)
    raise ValueError(f"{module.__name__} needs a preset ({', '.join(sorted(module.PRESETS))}) "
                     "or an HF config.json")
