"""The C++ control plane through its bindings: hypothesis drives random event sequences
(adds with shared prefixes, plan/update steps with random tokens, aborts, time passing,
memory pressure) and after every event checks the invariants: every block is free, cached
or owned, refcounts equal live handles, table rows match; after everything ends nothing
leaks. Illegal events raise named errors. Plus targeted tests of the policy."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tscompile.runtime._scheduler import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Scheduler

PS = 4


def make(num_blocks=24, max_num_seqs=4, budget=12, max_model_len=48, ttl=0.0, cap=0):
    return Scheduler(num_blocks=num_blocks, page_size=PS, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget, max_model_len=max_model_len,
                     session_ttl=ttl, max_tokens_with_decodes=cap)


def drain(s, now=0.0, token=5, limit=500):
    """Step until no work; returns the sampled-row finish codes seen per request id."""
    done = {}
    for _ in range(limit):
        p = s.plan(now)
        if not s.plan_pending:
            if not s.has_work:
                return done
            continue
        codes = s.update(np.full(p["num_sample"], token, np.int32), now)
        rows = p["req_ids"][p["sample"] == 1]
        for rid, c in zip(rows, codes):
            if c:
                done[int(rid)] = int(c)
        s.check_invariants()
    raise AssertionError("did not drain")


events = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 30), st.integers(1, 6),
              st.booleans()),
    st.tuples(st.just("step"), st.integers(0, 50)),
    st.tuples(st.just("abort"), st.integers(0, 40)),
    st.tuples(st.just("tick"), st.floats(0, 5)),
    st.tuples(st.just("fail"), st.integers(0, 40)),      # a step whose forward raised
), max_size=60)
SEQUENCES_CI, SEQUENCES_NIGHTLY = 1_000, 10_000


def test_random_event_sequences_keep_every_block_accounted_for(record_property):
    """1,000 random event sequences in CI; the nightly run below takes 10,000."""
    check_random_sequences(SEQUENCES_CI, record_property)


@pytest.mark.slow
def test_random_event_sequences_nightly(record_property):
    check_random_sequences(SEQUENCES_NIGHTLY, record_property)


def check_random_sequences(n: int, record_property) -> None:
    import time
    t0 = time.monotonic()
    seen = {"n": 0}

    @settings(max_examples=n, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(events=events, num_blocks=st.integers(6, 30), ttl=st.sampled_from([0.0, 2.0]),
           cap=st.sampled_from([0, 2, 7]))
    def run(events, num_blocks, ttl, cap):
        seen["n"] += 1
        one_sequence(events, num_blocks, ttl, cap)
    run()
    for key, value in (("requests", seen["n"]), ("failures", 0),
                       ("seconds", round(time.monotonic() - t0, 1))):
        record_property(key, value)          # "requests": event sequences here
    assert seen["n"] >= n * 0.9     # hypothesis ran (nearly) all it was asked for


def one_sequence(events, num_blocks, ttl, cap):
    s = make(num_blocks=num_blocks, ttl=ttl, cap=cap)
    prefixes = [list(range(100 + 10 * k, 100 + 10 * k + 13)) for k in range(4)]
    live: set[int] = set()
    next_id, now = 0, 0.0
    for ev in events:
        kind = ev[0]
        if kind == "add":
            _, pre, extra, max_tokens, session = ev
            prompt = prefixes[pre][: max(1, extra % 13)] + list(range(extra))
            prompt = prompt[: 40]
            s.add_request(next_id, np.array(prompt, np.int32), max_tokens, [7],
                          "s" if session else "", now)
            live.add(next_id)
            next_id += 1
        elif kind == "step":
            p = s.plan(now)
            if s.plan_pending:
                toks = (np.arange(p["num_sample"]) + ev[1]) % 9     # 7 stops sometimes
                codes = s.update(toks.astype(np.int32), now)
                for rid, c in zip(p["req_ids"][p["sample"] == 1], codes):
                    if c:
                        live.discard(int(rid))
                assert (p["query_lens"][: p["num_decodes"]] == 1).all()
                assert len(p["input_ids"]) == p["query_lens"].sum() <= 12
        elif kind == "fail":
            p = s.plan(now)
            if s.plan_pending:
                cached_before = s.stats()["blocks_cached"]
                if live and ev[1] % 3 == 0:              # one aborted while the step ran
                    rid = sorted(live)[ev[1] % len(live)]
                    s.abort(rid, FINISH_ABORT, now)
                    live.discard(rid)
                failed = set(s.fail_pending(now).tolist())
                assert failed <= set(p["req_ids"].tolist())
                assert not s.plan_pending
                live -= failed
                # pages registered by earlier steps may return to the cache; none is new
                for rid in failed:
                    with pytest.raises(KeyError):
                        s.state_of(rid)
                assert s.stats()["blocks_cached"] >= cached_before
        elif kind == "abort" and live:
            rid = sorted(live)[ev[1] % len(live)]
            s.abort(rid, FINISH_ABORT, now)
            live.discard(rid)
        elif kind == "tick":
            now += ev[1]
        s.check_invariants()
    for rid in sorted(live):
        s.abort(rid, FINISH_ABORT, now)
    s.check_invariants()
    st_ = s.stats()
    assert st_["running"] == st_["waiting"] == st_["blocks_in_use"] == 0
    assert st_["blocks_free"] + st_["blocks_cached"] == num_blocks


def test_illegal_events_are_rejected():
    s = make()
    s.add_request(1, np.arange(5, dtype=np.int32), 2)
    with pytest.raises(ValueError, match="already exists"):
        s.add_request(1, np.arange(5, dtype=np.int32), 2)
    with pytest.raises(ValueError, match="prompt is empty"):
        s.add_request(2, np.array([], np.int32), 2)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        s.add_request(2, np.arange(3, dtype=np.int32), 0)
    with pytest.raises(ValueError, match="leaves no room under max_model_len 48"):
        s.add_request(2, np.arange(48, dtype=np.int32), 1)
    with pytest.raises(RuntimeError, match="update\\(\\) without a pending plan"):
        s.update(np.array([1], np.int32))
    with pytest.raises(RuntimeError, match="fail_pending\\(\\) without a pending plan"):
        s.fail_pending()
    p = s.plan()
    with pytest.raises(RuntimeError, match="plan\\(\\) while the previous plan"):
        s.plan()
    with pytest.raises(ValueError, match="got 2 tokens for 1 sample rows"):
        s.update(np.array([1, 2], np.int32))
    with pytest.raises(ValueError, match="negative token"):
        s.update(np.array([-1], np.int32))
    s.update(np.array([3], np.int32))
    with pytest.raises(KeyError, match="request 9 is not live"):
        s.abort(9)
    with pytest.raises(ValueError, match="finish reason code"):
        s.abort(1, 0)
    assert p["num_sample"] == 1
    s.check_invariants()


def test_finish_reasons_and_decode_first_mixed_steps():
    s = make(budget=8)
    s.add_request(1, np.arange(3, dtype=np.int32), 5, [7])
    s.add_request(2, np.arange(20, dtype=np.int32), 2)
    p = s.plan()
    assert list(p["query_lens"]) == [3, 5]                    # budget 8: a chunk of 2
    s.update(np.array([4], np.int32))
    p = s.plan()                                              # 1 decode first, then chunk
    assert p["num_decodes"] == 1 and list(p["query_lens"]) == [1, 7]
    assert list(p["req_ids"]) == [1, 2]
    codes = s.update(np.array([7], np.int32))                 # stop token
    assert list(codes) == [FINISH_STOP]
    done = drain(s)
    assert done == {2: FINISH_LENGTH}


def test_prefix_cache_shares_full_pages_and_reports_cached_tokens():
    s = make()
    s.add_request(1, np.arange(11, dtype=np.int32), 1)
    drain(s)
    s.add_request(2, np.arange(13, dtype=np.int32), 1)        # shares pages 0 and 1
    p = s.plan()
    assert list(p["admitted_cached"]) == [8] and list(p["query_lens"]) == [5]
    s.update(np.array([1], np.int32))
    s.add_request(3, np.arange(8, dtype=np.int32), 1)         # whole prompt cached:
    p = s.plan()                                              # recompute the last token's page
    assert list(p["admitted_cached"]) == [4] and list(p["query_lens"]) == [4]
    s.update(np.array([1], np.int32))
    s.check_invariants()
    assert s.stats()["prefix_hit_tokens"] == 12


def test_session_pin_survives_pressure_that_evicts_without_it():
    def second_turn_cached(session: str) -> int:
        s = make(num_blocks=10, ttl=30.0)
        s.add_request(1, np.arange(16, dtype=np.int32), 1, session=session)
        drain(s, now=0.0)                        # 4 cached pages of the agent's history
        for rid in (2, 3):                       # other users: 6 blocks each, 10 in all
            s.add_request(rid, np.arange(100 * rid, 100 * rid + 20, dtype=np.int32), 1)
            drain(s, now=1.0, token=9)
        s.add_request(4, np.arange(17, dtype=np.int32), 1, session=session)
        p = s.plan(2.0)
        s.update(np.ones(p["num_sample"], np.int32), 2.0)
        s.check_invariants()
        return int(p["admitted_cached"][0])
    assert second_turn_cached("agent-1") == 16
    assert second_turn_cached("") == 0


def test_preemption_recomputes_and_keeps_accounting():
    s = make(num_blocks=6, budget=16, max_num_seqs=4)
    for rid in range(3):
        s.add_request(rid, np.arange(rid * 20, rid * 20 + 7, dtype=np.int32), 10)
    preempted = set()
    for _ in range(200):
        p = s.plan()
        preempted |= set(int(x) for x in p["preempted_ids"])
        if not s.plan_pending:
            if not s.has_work:
                break
            continue
        s.update(np.full(p["num_sample"], 3, np.int32))
        s.check_invariants()
    assert preempted and s.stats()["preemptions"] >= 1
    assert s.stats()["blocks_in_use"] == 0 and not s.has_work


def test_block_table_is_a_live_view():
    s = make()
    table = s.block_table
    s.add_request(1, np.arange(9, dtype=np.int32), 1)
    p = s.plan()
    slot = int(p["slots"][0])
    assert list(table[slot, :3]) == [int(x) // PS for x in p["slot_mapping"][::4]]
    s.update(np.array([1], np.int32))


def test_steps_with_decodes_take_at_most_max_tokens_with_decodes():
    """With the cap, a step that carries decodes stops its prefill chunks at cap tokens in
    all; a step without decodes still takes the whole budget; the long prompt still gets
    through, and nothing else changes."""
    s = make(budget=16, cap=6, max_model_len=48)
    s.add_request(0, np.arange(1, 4, dtype=np.int32), 20, [], "", 0.0)
    p = s.plan(0.0)
    assert p["query_lens"].tolist() == [3]                 # no decodes yet: plain prefill
    s.update(np.full(p["num_sample"], 5, np.int32), 0.0)
    s.add_request(1, np.arange(10, 40, dtype=np.int32), 4, [], "", 0.0)
    sizes = []
    while True:
        p = s.plan(0.0)
        assert p["num_decodes"] >= 1 and p["query_lens"].sum() <= 6
        sizes.append(p["query_lens"].tolist())
        s.update(np.full(p["num_sample"], 5, np.int32), 0.0)
        if len(sizes) > 3 and all(q == 1 for q in p["query_lens"]):
            break
    assert sizes[:6] == [[1, 5]] * 6                      # 30 prompt tokens in chunks of 5
    s.check_invariants()
    alone = make(budget=16, cap=6)
    alone.add_request(2, np.arange(10, 40, dtype=np.int32), 4, [], "", 0.0)
    assert alone.plan(0.0)["query_lens"].tolist() == [16]
    with pytest.raises(ValueError, match="max_tokens_with_decodes must be in"):
        make(budget=8, cap=9)


def test_a_failed_step_registers_none_of_its_pages():
    """fail_pending finishes the plan's requests without counting the chunk as computed:
    its pages never reach the prefix cache; pages of earlier, successful steps do."""
    prompt = np.arange(200, 220, dtype=np.int32)          # 20 tokens, 5 pages
    s = make(budget=12)
    s.add_request(1, prompt, 3)
    s.plan()                                              # tokens 0..11
    assert s.fail_pending().tolist() == [1]
    s.check_invariants()
    assert s.stats()["blocks_cached"] == 0 and not s.has_work
    s.add_request(2, prompt, 3)
    assert s.plan()["admitted_cached"].tolist() == [0]    # a miss: nothing was poisoned
    s.update(np.zeros(0, np.int32))                       # tokens 0..11 are computed now
    s.plan()                                              # tokens 12..19 fail
    assert s.fail_pending().tolist() == [2]
    s.add_request(3, prompt, 3)
    assert s.plan()["admitted_cached"].tolist() == [12]   # the 3 pages of the good step
    s.check_invariants()
