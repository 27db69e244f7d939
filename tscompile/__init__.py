"""tscompile: a compiler-backed LLM inference engine for agentic workloads.

The package is assembled from the repository's root folders (see pyproject.toml):
`tscompile.kernels` is `kernels/`, `tscompile.models` is `models/`, and so on.
"""
from __future__ import annotations

__version__ = "0.1.0"
