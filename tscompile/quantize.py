"""`tscompile quantize DIR --fp8-block -o OUT`: a block-scaled FP8 checkpoint from a
bf16/fp32 Hugging Face safetensors one, in the format DeepSeek-V3 and Qwen3-FP8 ship.

Every 2-D `<module>.weight` of a linear layer becomes float8_e4m3fn with
`<module>.weight_scale_inv` float32 [ceil(N/bn), ceil(K/bk)] (each block's amax mapped to
e4m3's 448: kernels/fp8.py); config.json gets the `quantization_config`. Kept as stored, and
listed in `modules_to_not_convert` when 2-D: embeddings, the LM head, MoE routers
(`mlp.gate`), experts (`.experts.`, unless `--experts`: the program then dequantizes them
at load, as it has no FP8 MoE kernel yet), and `--keep` names.
Norms and biases (1-D) are never quantized. Other files (tokenizer, generation config) are
copied. What it is not: calibration (FP8 block scaling needs none) or INT4 (issue 19).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from tscompile.kernels.fp8 import quantize_fp8_block
from tscompile.quant import SCALE_SUFFIX, Fp8Block
from tscompile.runtime.weights import Checkpoint


def _kept(module: str, quant: Fp8Block, experts: bool) -> bool:
    last = module.rsplit(".", 1)[-1]
    return ("embed" in last or last in ("wte", "wpe") or module.endswith("mlp.gate")
            or (not experts and ".experts." in f".{module}.") or quant.keeps(module))


def quantize_checkpoint(src: str | Path, out: str | Path, *,
                        block: Sequence[int] = (128, 128), keep: Sequence[str] = (),
                        experts: bool = False) -> Path:
    """Write the FP8 block-scaled copy of checkpoint `src` to folder `out` (one
    model.safetensors); returns `out`. `experts`: the routed experts' weights too (as
    DeepSeek-V3 ships them; the program dequantizes them while loading)."""
    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config']}); "
                         f"hint: quantize the bf16/fp32 checkpoint")
    quant = Fp8Block(tuple(block), tuple(keep))
    tensors: dict[str, torch.Tensor] = {}
    not_converted: list[str] = []
    with Checkpoint(src) as ckpt:
        for key in ckpt.keys():
            t = ckpt.get(key)
            module = key.removesuffix(".weight")
            if not key.endswith(".weight") or t.ndim != 2 or not t.is_floating_point():
                tensors[key] = t
            elif _kept(module, quant, experts):
                tensors[key] = t
                not_converted.append(module)
            else:
                tensors[key], tensors[key + SCALE_SUFFIX] = quantize_fp8_block(t, quant.block)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    config["quantization_config"] = Fp8Block(quant.block, tuple(
        sorted(set(not_converted) | set(keep)))).to_hf()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
