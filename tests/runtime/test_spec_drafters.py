"""Model-free drafters (runtime/spec/) against brute-force oracles (the acceptance
benchmark's teacher forcing: tests/benchmarks/test_spec_acceptance.py)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from tscompile.runtime.spec import (AdaptiveDraftLength, LinearStepCost, NgramDrafter,
                                    SuffixAutomaton, SuffixConfig, SuffixDrafter)


def sequences(seed: int, count: int = 40):
    """Random sequences over small alphabets (many repeats) and repetitive ones (a pattern
    re-emitted with edits, like an agent re-printing a file)."""
    rng = random.Random(seed)
    for _ in range(count):
        n, sigma = rng.randint(1, 60), rng.choice([2, 3, 5, 20])
        yield [rng.randrange(sigma) for _ in range(n)]
    for _ in range(count):
        base = [rng.randrange(50) for _ in range(rng.randint(3, 15))]
        seq = []
        for _ in range(rng.randint(2, 5)):
            chunk = list(base)
            if rng.random() < 0.5:
                chunk[rng.randrange(len(chunk))] = rng.randrange(50)
            seq += chunk + [rng.randrange(50) for _ in range(rng.randint(0, 3))]
        yield seq


# ---- oracles -------------------------------------------------------------------------

def occurs_ending_at(text: list[int], pat: list[int], e: int) -> bool:
    return e + 1 >= len(pat) and text[e + 1 - len(pat):e + 1] == pat


def brute_repeat_suffix(text: list[int]) -> tuple[int, list[int]]:
    """Longest suffix that also ends at an earlier position e <= n - 2, and those e."""
    n = len(text)
    for length in range(n - 1, 0, -1):
        ends = [e for e in range(n - 1) if occurs_ending_at(text, text[n - length:], e)]
        if ends:
            return length, ends
    return 0, []


def brute_match_tail(text: list[int], query: list[int]) -> int:
    for length in range(len(query), 0, -1):
        pat = query[len(query) - length:]
        if any(text[i:i + length] == pat for i in range(len(text) - length + 1)):
            return length
    return 0


def brute_walk(text: list[int], length: int, ends: list[int], k: int,
               cfg: SuffixConfig) -> list[int]:
    """The documented walk: occurrences vote, most frequent wins (ties: most recent)."""
    occ = sorted((e for e in ends if e + 1 < len(text) and text[e + 1] >= 0), reverse=True)
    if length < cfg.min_match or not occ:
        return []
    draft, prob = [], 1.0
    while len(draft) < min(k, int(cfg.match_factor * length)):
        j = len(draft) + 1
        nxt = [text[e + j] for e in occ if e + j < len(text) and text[e + j] >= 0]
        if not nxt:
            break
        votes = Counter(nxt)
        best = max(votes.values())
        token = next(t for t in nxt if votes[t] == best)        # most recent of the best
        prob *= best / len(occ)
        if prob < cfg.min_prob:
            break
        draft.append(token)
        occ = [e for e in occ if e + j < len(text) and text[e + j] == token]
    return draft


def brute_ngram(text: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    n = len(text)
    for g in range(max_n, min_n - 1, -1):
        if n < g:
            continue
        for e in range(n - 2, g - 2, -1):              # most recent earlier occurrence
            if text[e + 1 - g:e + 1] == text[n - g:]:
                return text[e + 1:e + 1 + k]
    return []


# ---- suffix automaton ----------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_automaton_matches_brute_force(seed):
    rng = random.Random(seed)
    for seq in sequences(seed):
        sam = SuffixAutomaton(seq)
        state, length = sam.longest_repeat_suffix()
        want_len, want_ends = brute_repeat_suffix(seq)
        assert length == want_len, seq
        if length:
            assert sorted(sam.end_positions(state, 10 ** 6)) == \
                sorted(want_ends + [len(seq) - 1]), seq
        query = [rng.randrange(5) for _ in range(rng.randint(0, 12))] + seq[-rng.randint(0, 6):]
        state, length = sam.match_tail(query)
        assert length == brute_match_tail(seq, query), (seq, query)
        if length:
            pat = query[len(query) - length:]
            assert sorted(sam.end_positions(state, 10 ** 6)) == \
                [e for e in range(len(seq)) if occurs_ending_at(seq, pat, e)]


def test_automaton_incremental_equals_fresh_build():
    for seq in sequences(2, 20):
        inc = SuffixAutomaton()
        cut = 0
        rng = random.Random(len(seq))
        while cut < len(seq):
            step = rng.randint(1, 7)
            inc.extend(seq[cut:cut + step])
            cut += step
        fresh = SuffixAutomaton(seq)
        assert (inc.len, inc.link, inc.next, inc.pos, inc.own) == \
            (fresh.len, fresh.link, fresh.next, fresh.pos, fresh.own)
        assert len(inc.len) <= max(2 * len(seq), 2)    # the O(n) size bound


# ---- suffix drafter ------------------------------------------------------------------

ALL_OCC = SuffixConfig(max_occurrences=10 ** 6, global_tokens=0)


@pytest.mark.parametrize("cfg", [ALL_OCC, SuffixConfig(max_occurrences=10 ** 6, min_match=1,
                                                       min_prob=0.0, match_factor=3.0,
                                                       global_tokens=0)])
def test_suffix_request_tier_matches_oracle(cfg):
    drafter = SuffixDrafter(cfg)
    for seq in sequences(3):
        req = drafter.start("r", seq[:1])
        for i in range(1, len(seq) + 1):
            text = seq[:i]
            length, ends = brute_repeat_suffix(text)
            for k in (1, 4, 7):
                assert req.propose(k) == brute_walk(text, length, ends, k, cfg), (text, k)
            if i < len(seq):
                req.extend([seq[i]])                  # incremental, token by token
        fresh = drafter.start("f", seq)
        assert fresh.propose(7) == req.propose(7)     # incremental == fresh build


def test_suffix_prefers_longer_match_then_request_tier():
    drafter = SuffixDrafter(ALL_OCC)
    first = drafter.start("t0", [9, 9], session_id="s")
    first.extend([1, 2, 3, 4, 5, 6])                  # the session's earlier output
    drafter.finish(first)
    # the request only knows "3 4 7" (match 2), the session knows "2 3 4 5 6" (match 3)
    req = drafter.start("t1", [3, 4, 7, 0, 2, 3, 4], session_id="s")
    assert req.propose(4) == [5, 6]
    # equal match lengths: the request tier wins
    req = drafter.start("t2", [3, 4, 8, 0, 3, 4], session_id="s")
    assert req.propose(4) == [8, 0]


def test_session_isolation_and_global_index():
    for global_tokens in (0, 1000):
        drafter = SuffixDrafter(SuffixConfig(global_tokens=global_tokens))
        a = drafter.start("a0", [1], session_id="A")
        a.extend([10, 11, 12, 13, 14, 15])
        drafter.finish(a)
        same = drafter.start("a1", [2, 10, 11, 12], session_id="A")
        other = drafter.start("b0", [2, 10, 11, 12], session_id="B")
        assert same.propose(3) == [13, 14, 15]
        assert other.propose(3) == ([13, 14, 15] if global_tokens else [])


def test_global_index_bound_and_eviction():
    limit = 50
    drafter = SuffixDrafter(SuffixConfig(global_tokens=limit))
    rng = random.Random(4)
    for i in range(200):
        req = drafter.start(i, [])
        req.extend([1000 + i] + [rng.randrange(30) for _ in range(rng.randint(1, 20))])
        drafter.finish(req)
        g = drafter.global_index
        assert g.live_tokens <= limit
        assert len(g.index.sam) <= 2 * limit + len(g.index.starts)
    # request 0's unique token was evicted long ago: a tail ending in it finds nothing
    assert drafter.start("q", [5, 1000]).propose(4) == []
    # the newest output is still there and drafts on
    req = drafter.start("new", [])
    req.extend([2000, 7, 8, 9])
    drafter.finish(req)
    assert drafter.start("q", [2000, 7]).propose(4) == [8, 9]


# ---- n-gram drafter ------------------------------------------------------------------

@pytest.mark.parametrize("max_n,min_n", [(4, 2), (3, 1)])
def test_ngram_matches_oracle_incrementally(max_n, min_n):
    for seq in sequences(5):
        d = NgramDrafter(seq[:1], max_n=max_n, min_n=min_n)
        for i in range(1, len(seq) + 1):
            for k in (1, 3, 7):
                assert d.propose(k) == brute_ngram(seq[:i], k, max_n, min_n), (seq[:i], k)
            if i < len(seq):
                d.extend([seq[i]])
        assert NgramDrafter(seq, max_n, min_n).propose(7) == d.propose(7)


# ---- adaptive draft length -----------------------------------------------------------

def test_policy_turns_off_under_zero_acceptance_and_up_under_high():
    cost = LinearStepCost(1.0, 0.05)
    low = AdaptiveDraftLength(cost, k_max=7)
    for _ in range(100):
        low.update(low.choose() or low.probe_k, 0)     # shadow drafts at K = 0
    assert low.choose() == 0
    for _ in range(100):                               # the regime changes: it recovers
        k = low.choose() or low.probe_k
        low.update(k, k)
    assert low.choose() == 7
    with pytest.raises(ValueError, match="accepted"):
        low.update(2, 3)


def test_policy_follows_cost_model():
    cheap = AdaptiveDraftLength(LinearStepCost(1.0, 0.01))
    dear = AdaptiveDraftLength(LinearStepCost(1.0, 1.0))   # a compute-bound batch
    for p in (cheap, dear):
        for _ in range(50):
            p.update(4, 2)                                 # alpha ~ 2/3
    assert cheap.choose() >= 4 and dear.choose() == 0
