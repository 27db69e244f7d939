"""Mutation check for the compiler paths of issue 14: each mutation below puts one known
bug back into a file of passes/ and names the tests that must then fail. A branch the
suite does not defend is a branch nobody knows works (STYLE.md 19).

    .venv/bin/python tests/passes/mutations.py             # all; exit 1 if one survives
    .venv/bin/python tests/passes/mutations.py c1 permute  # only those: a key, or part of a name
    .venv/bin/python tests/passes/mutations.py --show e    # and print why each test failed

The checkout is never edited. Every run (the unmutated baseline first, then each mutation)
imports `tscompile` from a shadow package in a temporary directory, put first on
PYTHONPATH: every subpackage a symlink into this checkout, `passes/` a copy with the patch
applied. So other work in the tree is unaffected and an interrupted run (Ctrl-C included)
leaves nothing to restore; the temporary directory goes with the `with` block.

Not a pytest module (no test_ prefix). A patch whose text no longer occurs exactly once
stops the run: update the mutation beside the code change that moved it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTEST = Path(sys.executable).parent / "pytest"
T = "tests/passes/"


@dataclass(frozen=True, slots=True)
class Mutation:
    key: str
    name: str
    file: str                              # under passes/
    patches: tuple[tuple[str, str], ...]   # (text that occurs exactly once, replacement)
    tests: tuple[str, ...]                 # pytest node ids, each of which must fail


MUTATIONS = (
    Mutation("a", "localize: literal view size on a split dim left undivided", "localize.py",
             (("sizes[p.dim] = s // world", "sizes[p.dim] = s"),),
             (T + "test_localize.py::test_literal_view_size_on_the_split_dim_is_divided",
              T + "test_localize.py::test_merge_of_a_split_dim_divides_its_literal")),
    Mutation("b", "linear rule: a row-parallel bias added on every rank", "rules/linear.py",
             (("found.append(Strategy(ins, P, once))", "found.append(Strategy(ins, P))"),),
             (T + "test_rules_linear.py::test_row_parallel_linear_adds_its_bias_on_rank0"
                  "[bias_row-mlp.down-2]",
              T + "test_rules_linear.py::test_row_parallel_bias_matches_single_device"
                  "[bias_row-2]")),
    Mutation("b2", "pointwise rule: P + R without counting R once", "rules/pointwise.py",
             (("out_list.append(Strategy(mask, P, tuple(i for i, m in enumerate(mask)",
               "out_list.append(Strategy(mask, P, () and tuple(i for i, m in enumerate(mask)"),),
             (T + "test_row_parallel_bias.py::test_partial_plus_replicate_matches_single_device"
                  "[2]",)),
    Mutation("b4", "propagate: a free parameter bound to P (a bias added on every rank)",
             "propagate.py",
             (("break                    # a parameter is whole or sliced, never P", "pass"),),
             (T + "test_row_parallel_bias.py::test_partial_plus_replicate_matches_single_device"
                  "[2]",)),
    Mutation("b3", "localize: a slice of one chunk keeps its global bounds", "localize.py",
             (("items[k] = slice(j * width, (j + 1) * width)", "pass"),),
             (T + "test_row_parallel_bias.py::test_compiled_matches_single_device[phi3-2]",)),
    Mutation("c1", "R -> S(d)x2: every piece taken from chunk 0", "collectives.py",
             (("(start, k * int(size) // dst.chunks))", "(start, 0))"),),
             (T + "test_collectives.py::test_chunked_slice_takes_each_ranks_share_of_every_chunk",
              T + "test_collectives.py::test_lowered_redistributions_match_single_device"
                  "[chunked_slice-2]")),
    Mutation("c2", "R -> S(d)x2: ranks in reverse order", "collectives.py",
             (("start = graph.call_function(operator.mul, (rank, part))",
               "start = graph.call_function(operator.mul, (graph.call_function(operator.sub, "
               "(world - 1, rank)), part))"),),
             (T + "test_collectives.py::test_chunked_slice_takes_each_ranks_share_of_every_chunk",
              T + "test_collectives.py::test_lowered_redistributions_match_single_device"
                  "[chunked_slice-2]")),
    Mutation("d", "S(a) -> S(b): all_to_all split and concat dims swapped", "collectives.py",
             (("(x, dst.dim, src.dim)", "(x, src.dim, dst.dim)"),),
             (T + "test_collectives.py::test_all_to_all_splits_the_wanted_dim_and_concatenates"
                  "_the_held_one",
              T + "test_collectives.py::test_lowered_redistributions_match_single_device"
                  "[all_to_all-2]")),
    Mutation("e", "view rule: torch.permute taken as a transpose (the old bug)",
             "rules/view.py",
             (('@rule("method:permute", "permute")', '@rule("method:permute")'),
              ('@rule("method:transpose", "transpose", "method:t")',
               '@rule("method:transpose", "transpose", "method:t", "permute")'),
              ('d0, d1 = (0, 1) if node.target == "t" else (_arg(node, 1, "dim0"), '
               '_arg(node, 2, "dim1"))',
               'd0, d1 = (node.args[1], node.args[2]) if len(node.args) > 2 else (0, 1)')),
             (T + "test_rules_view.py::test_permute_moves_the_shard_with_its_dim",
              T + "test_rules_view.py::test_every_permute_form_compiles_to_the_method_forms"
                  "_placements",
              T + "test_rules_view.py::test_permuted_heads_match_single_device"
                  "[permute_function-2]")),
    Mutation("f", "verify: counts insert_collectives' tags, not what propagation asked",
             "verify.py",
             (('    asked = Counter(stage.facts["redistributions"])',
               '    asked = Counter((c["value"], c["from"], c["to"]) for c in schedule)'),),
             (T + "test_verify.py::test_a_dropped_redistribution_is_caught",
              T + "test_verify.py::test_a_collective_nobody_asked_for_is_caught")),
)


def shadow(folder: Path, mutation: Mutation | None) -> Path:
    """A `tscompile` package under `folder` that is this checkout except for a copy of
    passes/ (patched by `mutation`)."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    pkg = folder / "tscompile"
    pkg.mkdir()
    for entry in (ROOT / dirs["tscompile"]).iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, rel in dirs.items():
        parts = name.split(".")
        if len(parts) != 2:                      # nested packages come with their parent
            continue
        if parts[1] == "passes":
            shutil.copytree(ROOT / rel, pkg / "passes",
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (pkg / parts[1]).symlink_to(ROOT / rel)
    for old, new in mutation.patches if mutation else ():
        path = pkg / "passes" / mutation.file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutation {mutation.key} ({mutation.name}): {old!r} occurs "
                             f"{text.count(old)} times in passes/{mutation.file}, not once; "
                             f"update the patch in {Path(__file__).name}")
        path.write_text(text.replace(old, new))
    return folder


def run(mutation: Mutation | None, tests: tuple[str, ...], show: bool = False) -> set[str]:
    """The node ids among `tests` that failed (parametrized ids mapped to what was asked);
    `show`: print pytest's one-line reason for each failure."""
    with tempfile.TemporaryDirectory(prefix="tscompile_mutant_") as tmp:
        env = dict(os.environ, PYTHONPATH=str(shadow(Path(tmp), mutation)), COLUMNS="400")
        probe = subprocess.run([sys.executable, "-P", "-c", "import tscompile.passes as p; "
                                "print(p.__file__)"], env=env, cwd=ROOT, text=True,
                               capture_output=True, check=True).stdout
        if not probe.startswith(tmp):
            raise SystemExit(f"the shadow package is not the one imported ({probe.strip()})")
        out = subprocess.run([str(PYTEST), "-q", "-rfE", "-p", "no:cacheprovider", *tests],
                             env=env, cwd=ROOT, text=True, capture_output=True)
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.M))
    if show:
        for line in re.findall(r"^(?:FAILED|ERROR) .*", out.stdout, re.M):
            print("      " + line[:300])
    if out.returncode not in (0, 1):             # 2+: interrupted, usage or collection error
        raise SystemExit(f"pytest exited {out.returncode}:\n{out.stdout[-3000:]}{out.stderr}")
    return {t for t in tests if any(f == t or f.startswith(t + "[") for f in failed)}


def main(argv: list[str]) -> int:
    show = "--show" in argv
    argv = [a for a in argv if a != "--show"]
    chosen = [m for m in MUTATIONS
              if not argv or any(a == m.key or (len(a) > 2 and a in m.name) for a in argv)]
    every = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    if broken := run(None, every):
        print("the unmutated baseline already fails:", *sorted(broken), sep="\n  ")
        return 2
    print(f"baseline: {len(every)} test groups pass unmutated\n")
    rows = []
    for m in chosen:
        failed = run(m, m.tests, show)
        rows.append((m, len(failed), "killed" if failed else "SURVIVED"))
        print(f"{m.key:3} {m.name:68} {len(failed)}/{len(m.tests)} failed  {rows[-1][2]}",
              flush=True)
    survived = [m.key for m, _, verdict in rows if verdict != "killed"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations killed"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
