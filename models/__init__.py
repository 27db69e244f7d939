"""Model files and how to find them.

A model file is plain single-device PyTorch and exposes, at module level:
`CONFIG` (a frozen config dataclass with `from_hf(dict)`), `PRESETS` (name -> config),
`MODEL` (the nn.Module class, with `forward(input_ids [T], positions [T], meta)` returning
logits for `meta.logits_indices`, and a class-level `CHECKPOINT_MAP`), and `HF_MODEL_TYPES`
(the Hugging Face `model_type`s it can build from a `config.json`).

`load_model_file(spec)` takes a name (`llama`) or a path (`models/llama.py`, or any file of
the same shape outside this package); `build_config()` resolves a preset or a config.json.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BUILTIN = ("llama", "qwen3", "kimi_k25")


def load_model_file(spec: str | Path) -> ModuleType:
    spec_s = str(spec)
    if spec_s in BUILTIN:
        return importlib.import_module(f"tscompile.models.{spec_s}")
    path = Path(spec_s)
    if path.suffix == ".py" and path.is_file():
        # A path into this package resolves to the package module, so classes are shared.
        here = Path(__file__).resolve().parent
        if path.resolve().parent == here and path.stem in BUILTIN:
            return importlib.import_module(f"tscompile.models.{path.stem}")
        mod_spec = importlib.util.spec_from_file_location(f"tscompile_user_model_{path.stem}",
                                                          path)
        module = importlib.util.module_from_spec(mod_spec)
        # Registered before running it: dataclasses and pickling look classes up by module.
        sys.modules[mod_spec.name] = module
        try:
            mod_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[mod_spec.name]
            raise
        for attr in ("CONFIG", "PRESETS", "MODEL"):
            if not hasattr(module, attr):
                raise ValueError(f"model file {path} does not define {attr} "
                                 "(see tscompile.models for the model-file contract)")
        return module
    if path.suffix == ".py":
        raise FileNotFoundError(f"model file {path} not found")
    raise ValueError(f"unknown model {spec_s!r}: give a model file path or one of "
                     f"{', '.join(BUILTIN)}")


def model_file_for_hf(config: dict[str, Any]) -> ModuleType:
    model_type = config.get("model_type")
    for name in BUILTIN:
        module = load_model_file(name)
        if model_type in module.HF_MODEL_TYPES:
            return module
    known = sorted(t for n in BUILTIN for t in load_model_file(n).HF_MODEL_TYPES)
    raise ValueError(f"config.json has model_type {model_type!r}, which no model file builds; "
                     f"known: {', '.join(known)}")


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
        return module.CONFIG.from_hf(d)
    raise ValueError(f"{module.__name__} needs a preset ({', '.join(sorted(module.PRESETS))}) "
                     "or an HF config.json")
