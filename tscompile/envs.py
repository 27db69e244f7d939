"""Every environment variable tscompile reads, in one typed table (STYLE.md §9).

Read a value with `envs.TSCOMPILE_KERNELS.get()`; nothing else in the tree calls
`os.environ` for a `TSCOMPILE_*` name, so this file is the complete list.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EnvVar(Generic[T]):
    name: str
    default: T
    parse: Callable[[str], T]
    help: str

    def raw(self) -> str:
        """The unparsed value ("" when unset): a cheap cache key for callers of get()."""
        return os.environ.get(self.name, "")

    def get(self) -> T:
        raw = os.environ.get(self.name)
        if raw is None or raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError as e:
            raise ValueError(f"environment variable {self.name}={raw!r} is invalid: {e}") from None


def _parse_dirs(raw: str) -> tuple[str, ...]:
    """"dir1:dir2" (os.pathsep) -> ("dir1", "dir2"); empty items are dropped."""
    return tuple(d for d in raw.split(os.pathsep) if d)


def _parse_kernel_overrides(raw: str) -> dict[str, str]:
    """"rms_norm=reference,gqa_decode=triton" or "*=reference" -> {op: backend}."""
    out: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        op, sep, backend = item.partition("=")
        if not sep or not op.strip() or not backend.strip():
            raise ValueError(f"expected OP=BACKEND items separated by commas, got {item!r}")
        out[op.strip()] = backend.strip()
    return out


TSCOMPILE_KERNELS = EnvVar(
    "TSCOMPILE_KERNELS", {}, _parse_kernel_overrides,
    "Force kernel backends: 'op=backend,...'; '*=reference' forces every op. A forced backend "
    "whose requirements do not hold is an error, never a silent fallback.",
)
TSCOMPILE_DUMP = EnvVar(
    "TSCOMPILE_DUMP", "", str, "Directory to dump the graph after every compiler pass.",
)
TSCOMPILE_LOG_KERNELS = EnvVar(
    "TSCOMPILE_LOG_KERNELS", False, lambda s: s.lower() in ("1", "true", "yes"),
    "Log each kernel selection at INFO level (it is always recorded in the run metadata).",
)

TSCOMPILE_CUDA_CACHE = EnvVar(
    "TSCOMPILE_CUDA_CACHE", "", str,
    "Directory of the compiled CUDA kernels (default ~/.cache/tscompile/cuda).",
)

TSCOMPILE_MODEL_PATH = EnvVar(
    "TSCOMPILE_MODEL_PATH", (), _parse_dirs,
    "Directories (':'-separated) of model files searched by config.json's model_type, after "
    "--model-path (models/__init__.py).",
)

TSCOMPILE_NO_KERNEL_FUSION = EnvVar(
    "TSCOMPILE_NO_KERNEL_FUSION", False, lambda s: s.lower() in ("1", "true", "yes"),
    "Build without the per-rank kernel fusions (passes fuse_kernels and pack_linears), to "
    "measure what they save; the all-reduce fusions stay.",
)

ALL: tuple[EnvVar, ...] = (TSCOMPILE_KERNELS, TSCOMPILE_DUMP, TSCOMPILE_LOG_KERNELS,
                           TSCOMPILE_CUDA_CACHE, TSCOMPILE_MODEL_PATH,
                           TSCOMPILE_NO_KERNEL_FUSION)
