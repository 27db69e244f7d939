"""passes/verify.py checks the collectives against what propagation asked for
(stage.facts['redistributions']), not against insert_collectives' own tags: a pass that
drops a redistribution and relabels its consumer's `wants` to match leaves every edge
consistent and the tag count right, and must still be caught."""
from __future__ import annotations

import pytest

import tscompile.build
from tscompile.passes.ir import tensor_args
from tscompile.passes.verify import VerifyError

from . import toys


def with_after_propagate(monkeypatch, tamper) -> None:
    """Run `tamper(stage)` on the propagated stage inside every build."""
    def wrap(fn):
        def run(stage):
            out = fn(stage)
            tamper(out)
            return out
        return run
    monkeypatch.setattr(tscompile.build, "PASSES", tuple(
        (name, wrap(fn) if name == "propagate" else fn) for name, fn in tscompile.build.PASSES))


def test_schedule_is_exactly_what_propagation_asked_for(tmp_path):
    built = toys.compile_toy(tmp_path, "a2a", toys.ALL_TO_ALL, 2)
    asked = built.stage.facts["redistributions"]
    assert sorted(asked) == sorted((c["value"], c["from"], c["to"])
                                   for c in built.manifest["schedule"])
    assert [(f, t) for _, f, t in asked] == [("S(1)", "S(2)"), ("P", "R")]


@pytest.mark.parametrize("toy", ["all_to_all", "chunked_slice", "bias_column"])
def test_a_dropped_redistribution_is_caught(tmp_path, monkeypatch, toy):
    """Drop the last one asked for (at the residual add, outside every annotated module:
    no boundary marker is removed later, so every edge still looks consistent)."""
    def drop(stage):
        value, have, want = drop.lost = stage.facts["redistributions"][-1]
        for n in stage.gm.graph.nodes:       # its consumers now "want" what they get
            args = tensor_args(n)
            if "wants" in n.meta and any(a.name == value for a in args):
                n.meta["wants"] = tuple(a.meta["placement"] if a.name == value else w
                                        for a, w in zip(args, n.meta["wants"]))

    with_after_propagate(monkeypatch, drop)
    with pytest.raises(VerifyError) as e:
        toys.compile_toy(tmp_path, toy, toys.PARITY[toy], 2)
    assert f"missing [{drop.lost!r}], not asked for []" in str(e.value)


def test_a_collective_nobody_asked_for_is_caught(tmp_path, monkeypatch):
    def forget(stage):
        forget.extra = stage.facts["redistributions"][0]
        stage.facts["redistributions"] = stage.facts["redistributions"][1:]

    with_after_propagate(monkeypatch, forget)
    with pytest.raises(VerifyError) as e:
        toys.compile_toy(tmp_path, "a2a", toys.ALL_TO_ALL, 2)
    assert f"missing [], not asked for [{forget.extra!r}]" in str(e.value)
