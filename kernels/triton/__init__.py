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

MODULES = ("norm", "rope", "activation", "gqa", "mla", "moe")

if AVAILABLE:
    for _name in MODULES:
        if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
            importlib.import_module(f"{__name__}.{_name}")
