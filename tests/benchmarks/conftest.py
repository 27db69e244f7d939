"""`benchmarks/` is a folder of the repository run as `python -m benchmarks.X` from the root,
not an installed package: put the root on sys.path for these tests (pytest's importlib mode
does not)."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
