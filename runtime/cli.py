"""The `tsrun` command: serve a compiled `.tsprog` behind an OpenAI-compatible API.

Serving (scheduler, execution loop, HTTP server) is built by the runtime issue on top of the
reference path that exists today (`tscompile generate`). Until then this command refuses
with a clear message instead of pretending to serve.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsrun", description=__doc__.split("\n")[0])
    parser.add_argument("program", help="a .tsprog built by `tscompile build`")
    parser.parse_args(argv)
    print("tsrun: serving is not implemented yet (it needs the compiler's .tsprog and the "
          "runtime scheduler); run a model offline with `tscompile generate`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
