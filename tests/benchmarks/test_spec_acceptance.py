"""The teacher-forcing loop of benchmarks/spec_acceptance.py on synthetic trajectories with
hand-derived answers (accepted draft tokens, steps, the first/later-turn split)."""
from __future__ import annotations

import pytest

from benchmarks.agentic.trajectories import Trajectory
from benchmarks.spec_acceptance import run_drafter, teacher_force
from tscompile.runtime.spec import NgramDrafter


def test_teacher_force_known_answer():
    prompt, target = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]
    t = teacher_force(NgramDrafter(prompt, max_n=4, min_n=1), target, ks=(1, 4))
    # K=4: p=0 no draft (6 never seen before), p=1 drafts 2 3 4 5 -> all 4 accepted, p=6 end
    assert (t[4].steps, t[4].accepted, t[4].proposed_steps) == (2, 4, 1)
    # K=1: p=0 none, then p=1, 3, 5 each accept 1 and take the bonus token
    assert (t[1].steps, t[1].accepted, t[1].proposed_steps) == (4, 3, 3)
    assert t[1].summary()["tokens_per_step"] == pytest.approx((3 + 4) / 4)


def test_run_drafter_splits_first_and_later_turns():
    traj = Trajectory("t", ({"role": "system", "content": "ab"},), ("xyz", "xyz"), ("q",))
    enc = lambda s: [ord(c) for c in s]
    res = run_drafter([traj], enc, lambda s, i, p: NgramDrafter(p, 4, 1), lambda st: None,
                      ks=(4,))
    # turn 0: "xyz" never seen -> x, y, z one plain step each; turn 1: the prompt ends in
    # "<|im_start|>assistant\n" as after turn 0's, so x y z < is drafted at p=0, x y z
    # accepted, and the bonus token is past the end: 1 step
    assert (res.first[4].steps, res.first[4].accepted) == (3, 0)
    assert (res.later[4].steps, res.later[4].accepted) == (1, 3)


def test_copy_bound_reads_the_target():
    from benchmarks.spec_acceptance import CopyBound
    t = teacher_force(CopyBound([1, 2, 3], [1, 2, 3, 9, 1, 2]), [1, 2, 3, 9, 1, 2], ks=(4,))
    # p=0: 1 2 3 copied (9 is new) + bonus 9; p=4: 1 2 copied, end: 2 steps, 5 accepted
    assert (t[4].steps, t[4].accepted) == (2, 5)
