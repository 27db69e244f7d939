"""The kernel layer: public ops as `torch.library` custom ops (`torch.ops.tscompile.*`),
each with a `reference` backend in plain torch and a registry that picks a backend per
device, arch, dtype and shape (`kernels/registry.py`).

Importing this package registers every op. Op families, one file each:
norm (rms_norm, fused_add_rms_norm, layer_norm, fused_add_layer_norm), rope (rope,
rms_norm_rope), activation
(silu_and_mul), fp8 (fp8_block_linear: block-scaled FP8 weights), gqa (paged GQA),
mla (paged MLA), moe (moe_route, moe_experts), sample.
The paged KV layout: `paged.py`.
"""
from __future__ import annotations

# Absolute imports on purpose: with the repository root on sys.path, a probe such as
# transformers' `import kernels` runs this file under the name `kernels`; it must then alias
# the canonical modules, not load second copies that would re-register every custom op.
from tscompile.kernels.activation import silu_and_mul
from tscompile.kernels.collectives import (
    all_gather, all_reduce, all_reduce_add_layer_norm, all_reduce_add_rms_norm, all_to_all,
    reduce_scatter,
)
from tscompile.kernels.fp8 import fp8_block_linear
from tscompile.kernels.gqa import gqa_attention, gqa_decode, gqa_prefill
from tscompile.kernels.mla import mla_attention, mla_decode, mla_prefill
from tscompile.kernels.moe import moe_experts, moe_route
from tscompile.kernels.norm import fused_add_layer_norm, fused_add_rms_norm, layer_norm, rms_norm
from tscompile.kernels.paged import AttentionMetadata, build_metadata
from tscompile.kernels.registry import REGISTRY, Query, direct_ops
from tscompile.kernels.rope import rms_norm_rope, rope, rope_cos_sin_cache
from tscompile.kernels.sample import sample
from tscompile.kernels import triton as _triton_backends  # noqa: E402,F401  (registers "triton")
from tscompile.kernels import cuda as _cuda_backends  # noqa: E402,F401  (registers "cuda")

__all__ = [
    "AttentionMetadata", "REGISTRY", "Query", "all_gather", "all_reduce",
    "all_reduce_add_layer_norm", "all_reduce_add_rms_norm", "all_to_all", "build_metadata",
    "direct_ops", "fp8_block_linear", "fused_add_layer_norm", "fused_add_rms_norm",
    "layer_norm",
    "gqa_attention", "gqa_decode", "gqa_prefill", "mla_attention", "mla_decode", "mla_prefill",
    "moe_experts", "moe_route", "reduce_scatter", "rms_norm",
    "rms_norm_rope", "rope", "rope_cos_sin_cache", "sample", "silu_and_mul",
]
