"""fx graph -> readable SPMD `program.py` through jinja2 templates (issue 3). Empty for now."""

if __name__ != "tscompile.codegen":
    # The repository root is on sys.path and something ran `import codegen` (transformers
    # probes for a package of that name). A second copy would re-register the custom ops
    # and invalidate the first, so refuse loudly instead.
    raise ImportError(
        f"{__file__} is the package tscompile.codegen and cannot be imported as "
        f"{__name__!r}: the repository root is on sys.path. Use the installed commands "
        "(`pytest`, `tscompile`), not `python -m ...` from the repository root.")
