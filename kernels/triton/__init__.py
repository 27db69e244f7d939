"""Triton implementations of the kernel ops, registered as backend "triton" (Hopper first).

On a GPU they are selected ahead of `reference` where their requirements hold; on the CPU
they run only under the Triton interpreter (TRITON_INTERPRET=1, small shapes: the tests).
Importing this package registers whatever its modules define; without the `triton` package
nothing is registered and `reference` serves every op.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

AVAILABLE = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MODULES = ("norm", "rope", "activation", "paged", "gqa", "mla", "moe", "fp8")


def requirements(dtypes, shape_check=None):
    """What every Triton implementation needs: a CUDA device of sm_80 or newer (or the CPU
    under the interpreter), one of `dtypes`, and its own shape check."""
    from tscompile.kernels.registry import Requirements
    return Requirements(devices=frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"}),
                        dtypes=frozenset(dtypes), min_arch=None if INTERPRET else (8, 0),
                        shape_check=shape_check)


def _interpreter_index_shim() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array) into a Python int with
    int(array), which NumPy >= 2.4 refuses, so `range(start, end)` with run-time bounds
    fails under TRITON_INTERPRET=1. Take the one element explicitly (CPU tests only)."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_index_shim", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._index_shim = True


if AVAILABLE and INTERPRET:
    _interpreter_index_shim()

if AVAILABLE:
    for _name in MODULES:
        if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
            importlib.import_module(f"{__name__}.{_name}")
