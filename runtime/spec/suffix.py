"""Suffix decoding: model-free drafts from the longest suffix match in three token indexes.

What it is: the SuffixDecoding-style drafter (Oliaro et al. 2024) for coding agents, which
re-emit what they have seen. Three tiers, each a `SuffixAutomaton` (suffix_automaton.py
says why an automaton and not a depth-bounded trie):

    request  the request's prompt + its output so far (extended per accepted token)
    session  the earlier turns' outputs of the same session id (what a chat template may
             drop from later prompts, e.g. reasoning; survives a truncated history)
    global   a bounded index of recent finished outputs, LRU by tokens (`global_tokens`)

What it is not: the verifier, the scheduler's bookkeeping or the draft-length policy
(policy.py). Nothing here knows about the model.

The proposal rule (`SuffixRequest.propose(k)`):
  1. Match: in each tier, the longest suffix of the context that occurs there with at least
     one token after it (request tier: an earlier occurrence, not the tail itself; session
     and global: the last `max_match` context tokens streamed through the automaton).
     The tier with the longest match wins; ties go to request, then session, then global.
  2. Weak match, no draft: a match shorter than `min_match` tokens proposes nothing.
  3. Walk: the match's occurrences (up to `max_occurrences` found by a DFS of the
     suffix-link tree, so not the most recent ones when capped; ordered newest first) vote on the
     next token; the most frequent continuation wins (ties: the most recent occurrence),
     the occurrences that disagree drop out, repeat. The draft's score is the product of
     the winners' vote shares (an estimate of the draft's probability); the walk stops when
     it falls below `min_prob`, when no occurrence continues, or at
     `floor(match_factor * match length)` tokens (a short match earns a short draft:
     SuffixDecoding's adaptive speculation length).
  The walk never looks at k except to stop, so `propose(k)` is a prefix of `propose(k + 1)`.
"""
from __future__ import annotations

import bisect
from collections import Counter, OrderedDict
from dataclasses import dataclass

from tscompile.runtime.spec.suffix_automaton import SuffixAutomaton


@dataclass(frozen=True, slots=True)
class SuffixConfig:
    min_match: int = 2             # matches shorter than this propose nothing
    max_match: int = 64            # context tail streamed into the session/global indexes
    max_occurrences: int = 64      # occurrences that vote on a continuation
    min_prob: float = 0.1          # stop when the draft's estimated probability drops below
    match_factor: float = 1.0      # draft length <= match_factor * match length
    global_tokens: int = 1 << 20   # global index bound (live tokens); 0 disables the tier
    max_sessions: int = 4096       # sessions kept, least recently used dropped first

    def __post_init__(self):
        if self.min_match < 1 or self.max_match < self.min_match:
            raise ValueError(f"SuffixConfig: need 1 <= min_match <= max_match, got "
                             f"min_match={self.min_match} max_match={self.max_match}")
        if self.max_occurrences < 1 or not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"SuffixConfig: max_occurrences={self.max_occurrences} must be "
                             f">= 1 and min_prob={self.min_prob} in [0, 1]")
        if self.match_factor <= 0 or self.global_tokens < 0 or self.max_sessions < 1:
            raise ValueError(f"SuffixConfig: match_factor={self.match_factor} must be > 0, "
                             f"global_tokens={self.global_tokens} >= 0, "
                             f"max_sessions={self.max_sessions} >= 1")


class SegmentIndex:
    """An automaton over segments (one per turn or output) joined by unique negative
    separators, so no match spans two segments and a segment's end stops a walk.
    `dead(pos)` says whether the segment holding pos was evicted (the global index)."""

    def __init__(self):
        self.sam = SuffixAutomaton()
        self.starts: list[int] = []       # segment start positions, ascending
        self.keys: list[object] = []      # the segment key at each start
        self._sep = -1

    def add(self, key: object, tokens: list[int]) -> int:
        if self.starts:                   # close the previous segment
            self.sam.append(self._sep)
            self._sep -= 1
        start = len(self.sam)
        self.starts.append(start)
        self.keys.append(key)
        self.sam.extend(tokens)
        return start

    def key_at(self, pos: int) -> object:
        return self.keys[bisect.bisect_right(self.starts, pos) - 1]


class GlobalIndex:
    """Recent outputs of all requests, at most `limit` live tokens, least recently used
    segment evicted first (used = added, or drafted from). An automaton cannot delete, so
    evicted segments stay in it as dead text, filtered out of every match, and the
    automaton is rebuilt from the live segments once dead tokens outnumber live ones:
    each rebuild costs O(live) and follows >= live evicted tokens, so O(1) amortised per
    token, and the automaton never holds more than 2 * limit tokens (plus separators)."""

    def __init__(self, limit: int):
        self.limit = limit
        # key -> (start position in the index, tokens), least recently used first
        self.live: OrderedDict[object, tuple[int, list[int]]] = OrderedDict()
        self.live_tokens = 0
        self.dead_tokens = 0
        self.index = SegmentIndex()

    def add(self, key: object, tokens: list[int]) -> None:
        if self.limit == 0 or not tokens:
            return
        tokens = list(tokens[-self.limit:])
        self._drop(key)
        self.live[key] = (self.index.add(key, tokens), tokens)
        self.live_tokens += len(tokens)
        while self.live_tokens > self.limit:
            self._drop(next(iter(self.live)))
        if self.dead_tokens > self.live_tokens:
            self._rebuild()

    def _drop(self, key: object) -> None:
        if key in self.live:
            n = len(self.live.pop(key)[1])
            self.live_tokens -= n
            self.dead_tokens += n

    def _rebuild(self) -> None:
        segments = list(self.live.items())
        self.index = SegmentIndex()
        self.live.clear()
        for key, (_, tokens) in segments:
            self.live[key] = (self.index.add(key, tokens), tokens)
        self.dead_tokens = 0

    def alive(self, pos: int) -> bool:
        key = self.index.key_at(pos)
        seg = self.live.get(key)
        return seg is not None and seg[0] <= pos < seg[0] + len(seg[1])

    def touch(self, pos: int) -> None:
        key = self.index.key_at(pos)
        if key in self.live:
            self.live.move_to_end(key)


class SuffixDrafter:
    """The shared part: the session indexes and the global index. One per engine;
    `start()` a `SuffixRequest` per request, `finish()` it when it ends."""

    def __init__(self, config: SuffixConfig = SuffixConfig()):
        self.config = config
        self.sessions: OrderedDict[object, SegmentIndex] = OrderedDict()
        self.global_index = GlobalIndex(config.global_tokens)

    def start(self, request_id: object, prompt: list[int],
              session_id: object | None = None) -> SuffixRequest:
        session = None
        if session_id is not None and session_id in self.sessions:
            session = self.sessions[session_id]
            self.sessions.move_to_end(session_id)
        return SuffixRequest(self, request_id, session_id, session, prompt)

    def finish(self, req: SuffixRequest) -> None:
        """The request's output joins its session's index and the global index."""
        out = req.output
        if not out:
            return
        if req.session_id is not None:
            session = self.sessions.get(req.session_id)
            if session is None:
                session = self.sessions[req.session_id] = SegmentIndex()
                while len(self.sessions) > self.config.max_sessions:
                    self.sessions.popitem(last=False)
            session.add(req.request_id, out)
        self.global_index.add(req.request_id, out)

    def end_session(self, session_id: object) -> None:
        self.sessions.pop(session_id, None)


class SuffixRequest:
    """One request's drafting state: its own automaton (prompt + output), the session index
    it was started with, and the global index."""

    def __init__(self, drafter: SuffixDrafter, request_id: object, session_id: object | None,
                 session: SegmentIndex | None, prompt: list[int]):
        self.drafter, self.config = drafter, drafter.config
        self.request_id, self.session_id, self.session = request_id, session_id, session
        self.prompt_len = len(prompt)
        self.sam = SuffixAutomaton(prompt)

    @property
    def output(self) -> list[int]:
        return self.sam.tokens[self.prompt_len:]

    def extend(self, tokens: list[int]) -> None:
        """Accepted (and bonus) tokens: amortised O(len(tokens))."""
        self.sam.extend(tokens)

    def _occurrences(self, sam: SuffixAutomaton, state: int,
                     keep=None) -> list[int]:
        n = len(sam.tokens)
        limit = self.config.max_occurrences
        ends = [e for e in sam.end_positions(state, 4 * limit)
                if e + 1 < n and sam.tokens[e + 1] >= 0 and (keep is None or keep(e))]
        return ends[:limit]

    def propose(self, k: int) -> list[int]:
        cfg = self.config
        if k <= 0 or not self.sam.tokens:
            return []
        # 1. match in each tier; (length, -priority) picks the longest, then the earliest tier
        best: tuple[int, int, SuffixAutomaton, list[int]] | None = None
        state, length = self.sam.longest_repeat_suffix()
        if length >= cfg.min_match:
            occ = self._occurrences(self.sam, state)
            if occ:
                best = (length, 0, self.sam, occ)
        tail = self.sam.tokens[-cfg.max_match:]
        gidx = self.drafter.global_index
        tiers = [(1, self.session, None), (2, gidx.index if gidx.live else None, gidx.alive)]
        for prio, index, keep in tiers:
            if index is None or (best is not None and best[0] >= len(tail)):
                continue
            state, length = index.sam.match_tail(tail)
            if length < cfg.min_match or (best is not None and length <= best[0]):
                continue
            occ = self._occurrences(index.sam, state, keep)
            if occ:
                best = (length, prio, index.sam, occ)
        if best is None:
            return []
        length, prio, sam, occ = best
        if prio == 2:
            gidx.touch(occ[0])
        # 3. walk: occurrences vote on each next token
        limit = min(k, int(cfg.match_factor * length))
        toks, draft, prob = sam.tokens, [], 1.0
        n = len(toks)
        while len(draft) < limit:
            j = len(draft) + 1
            votes: Counter[int] = Counter()
            first: dict[int, int] = {}
            for rank, e in enumerate(occ):
                if e + j < n and toks[e + j] >= 0:
                    t = toks[e + j]
                    votes[t] += 1
                    first.setdefault(t, rank)
            if not votes:
                break
            token = max(votes, key=lambda t: (votes[t], -first[t]))
            prob *= votes[token] / len(occ)
            if prob < cfg.min_prob:
                break
            draft.append(token)
            occ = [e for e in occ if e + j < n and toks[e + j] == token]
        return draft
