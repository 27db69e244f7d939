"""tsrun's side: weights, the paged KV pool, the execution loop and (later) the server.

`load_model()` is the single-device path used by `tscompile generate` and the tests:
build the model on the meta device, materialise it on the target device, then fill it from
an HF checkpoint or with deterministic dummy weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tscompile.models import build_config, load_model_file, model_file_for_hf, read_hf_config
from tscompile.runtime.dummy_weights import init_dummy_weights
from tscompile.runtime.weights import load_checkpoint


def materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Meta model -> uninitialised tensors on `device` in `dtype`, with derived buffers
    (RoPE tables) recomputed and tied weights re-tied."""
    model = model.to_empty(device=device).to(dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers()
    return model


def load_model(model: str | Path | None = None, *, preset: str | None = None,
               config: str | Path | dict[str, Any] | None = None,
               weights: str | Path | None = None, dummy_weights: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, config). `model` is a model file or name; with only `weights`, the folder's
    config.json picks the model file."""
    if (weights is None) == (not dummy_weights):
        raise ValueError("give exactly one of weights=DIR or dummy_weights=True")
    if preset is None and config is None and weights is not None:
        config = read_hf_config(weights)
    if model is None:
        if config is None:
            raise ValueError("give a model file or name, or a weights folder with config.json")
        d = config if isinstance(config, dict) else read_hf_config(config)
        module, config = model_file_for_hf(d), d
    else:
        module = load_model_file(model)
    cfg = build_config(module, preset=preset, config=config)
    with torch.device("meta"):
        net = module.MODEL(cfg)
    net = materialize(net, device, dtype).eval()
    if weights is not None:
        load_checkpoint(net, weights)
    else:
        init_dummy_weights(net, seed)
    return net, cfg
