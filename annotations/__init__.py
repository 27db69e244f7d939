"""Author-facing placement vocabulary (`Replicate()`, `Shard(dim)`, `Partial()`, `@placement`).

Empty until the compiler lands (issue 3); the package exists so the layout of DESIGN.md holds.
"""

if __name__ != "tscompile.annotations":
    # The repository root is on sys.path and something ran `import annotations` (transformers
    # probes for a package of that name). A second copy would re-register the custom ops
    # and invalidate the first, so refuse loudly instead.
    raise ImportError(
        f"{__file__} is the package tscompile.annotations and cannot be imported as "
        f"{__name__!r}: the repository root is on sys.path. Use the installed commands "
        "(`pytest`, `tscompile`), not `python -m ...` from the repository root.")
