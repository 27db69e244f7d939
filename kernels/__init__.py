"""The kernel layer: public ops as `torch.library` custom ops (`torch.ops.tscompile.*`),
each with a `reference` backend in plain torch and a registry that picks a backend per
device, arch, dtype and shape (`kernels/registry.py`).

Importing this package registers every op. Op families, one file each:
norm (rms_norm, fused_add_rms_norm), rope, activation (silu_and_mul), gqa (paged GQA),
mla (paged MLA), moe (moe_route, moe_experts), sample. The paged KV layout: `paged.py`.
"""
from __future__ import annotations

if __name__ != "tscompile.kernels":
    # The repository root is on sys.path and something ran `import kernels` (transformers
    # probes for a package of that name). A second copy would re-register the custom ops
    # and invalidate the first, so refuse loudly instead.
    raise ImportError(
        f"{__file__} is the package tscompile.kernels and cannot be imported as "
        f"{__name__!r}: the repository root is on sys.path. Use the installed commands "
        "(`pytest`, `tscompile`), not `python -m ...` from the repository root.")

from .activation import silu_and_mul
from .gqa import gqa_attention, gqa_decode, gqa_prefill
from .moe import moe_experts, moe_route
from .norm import fused_add_rms_norm, rms_norm
from .paged import AttentionMetadata, build_metadata
from .registry import REGISTRY, Query
from .rope import rope, rope_cos_sin_cache
from .sample import sample

__all__ = [
    "AttentionMetadata", "REGISTRY", "Query", "build_metadata", "fused_add_rms_norm",
    "gqa_attention", "gqa_decode", "gqa_prefill", "moe_experts", "moe_route", "rms_norm",
    "rope", "rope_cos_sin_cache", "sample", "silu_and_mul",
]
