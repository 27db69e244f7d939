"""Author-facing placement vocabulary (`Replicate()`, `Shard(dim)`, `Partial()`, `@placement`).

Empty until the compiler lands (issue 3); the package exists so the layout of DESIGN.md holds.
"""

