"""Graph -> graph compiler passes over torch.fx graphs (issue 3). Empty for now."""

if __name__ != "tscompile.passes":
    # The repository root is on sys.path and something ran `import passes` (transformers
    # probes for a package of that name). A second copy would re-register the custom ops
    # and invalidate the first, so refuse loudly instead.
    raise ImportError(
        f"{__file__} is the package tscompile.passes and cannot be imported as "
        f"{__name__!r}: the repository root is on sys.path. Use the installed commands "
        "(`pytest`, `tscompile`), not `python -m ...` from the repository root.")
