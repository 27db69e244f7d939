"""Speculative decoding with the model-free drafters (issue 18, items 1-3 on the CPU).

* The C++ control plane: a decode with a draft becomes a verify row (after the plain
  decodes, q_len 1 + k, every position sampled); drafts are clipped to the token budget,
  max_tokens and max_model_len; `update_verified` takes the accepted drafts plus the bonus
  token, checks that the accepted ones are the planned drafts, finishes on a stop id or
  max_tokens mid-draft and rolls the sequence back to what it kept, giving the rejected
  drafts' blocks back. Hypothesis drives random event sequences with random drafts and
  random acceptance and checks the block invariants after every event and no leak after.
* Verification: with deterministic drafts, accepting a draft iff the counter-based draw at
  its position equals it is rejection sampling (accept d with probability p(d), else a draw
  from p restricted to x != d): chi-square tests on a fixed distribution.
* End to end through the engine on SmolLM2-135M's real weights: greedy output with each
  drafter is token-identical to without (and drafts were accepted, so the test cannot pass
  vacuously); a seeded temperature > 0 request gives the same text with and without; a
  request whose max_tokens or stop id falls mid-draft stops exactly there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.runtime._scheduler import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Scheduler
from tscompile.runtime.engine import Engine, EngineConfig, accepted_length
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import AddRequest, SamplingParams
from tscompile.runtime.sampler import BatchSampler
from tscompile.runtime.step_io import broadcast_step, follow_steps, set_control_group

PS = 4


def make(num_blocks=32, max_num_seqs=4, budget=16, max_model_len=64, ttl=0.0, cap=0):
    return Scheduler(num_blocks=num_blocks, page_size=PS, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget, max_model_len=max_model_len,
                     session_ttl=ttl, max_tokens_with_decodes=cap)


def to_decoding(s, rid, prompt, max_tokens=20, stop=(), first=9):
    """Add a request and run its prefill: it is decoding with one output token."""
    s.add_request(rid, np.asarray(prompt, np.int32), max_tokens, list(stop))
    while True:
        p = s.plan()
        s.update(np.full(p["num_sample"], first, np.int32))
        if s.state_of(rid) == "decoding":
            return


def drafts(s, **per_id):
    ids = [int(k[1:]) for k in per_id]
    toks = [t for v in per_id.values() for t in v]
    s.set_drafts(np.array(ids, np.uint64), np.array([len(v) for v in per_id.values()],
                                                     np.int32), np.array(toks, np.int32))


# ------------------------------------------------------------------ the scheduler

def test_a_draft_makes_a_verify_row_after_the_plain_decodes_and_rolls_back():
    s = make()
    s.add_request(1, np.arange(10, 17, dtype=np.int32), 20)   # 7 prompt tokens
    s.add_request(2, np.arange(30, 35, dtype=np.int32), 20)   # 5
    s.plan()
    s.update(np.array([9, 9], np.int32))          # both decoding: 8 and 6 tokens
    used = s.stats()["blocks_in_use"]
    drafts(s, r1=[4, 5, 6, 7, 8])
    p = s.plan()
    assert p["num_decodes"] == 1 and p["num_verify"] == 1
    assert p["req_ids"].tolist() == [2, 1]        # the plain decode first
    assert p["query_lens"].tolist() == [1, 6] and p["spec_lens"].tolist() == [0, 5]
    assert p["input_ids"][1:].tolist() == [9, 4, 5, 6, 7, 8]
    assert p["positions"][1:].tolist() == list(range(7, 13))
    assert p["seq_lens"].tolist() == [6, 13] and p["num_logits"] == 7
    assert s.stats()["blocks_in_use"] == used + 2  # positions 8..12 need two more pages
    # request 2 draws 3; request 1 accepts 4 and 5, then draws 1 where 6 was drafted
    codes, kept = s.update_verified(np.array([3, 4, 5, 1], np.int32),
                                    np.array([1, 3], np.int32))
    assert codes.tolist() == [0, 0] and kept.tolist() == [1, 3]
    s.check_invariants()                          # 11 tokens: 3 pages, the 4th went back
    assert s.stats()["blocks_in_use"] == used + 1
    st_ = s.stats()
    assert (st_["spec_verify_rows"], st_["spec_draft_tokens"],
            st_["spec_accepted_tokens"]) == (1, 5, 2)
    p = s.plan()                                  # no draft: both plain decodes again
    assert p["num_verify"] == 0 and p["num_decodes"] == 2
    assert p["input_ids"].tolist() == [1, 3] and p["positions"].tolist() == [10, 6]
    s.update(np.array([2, 2], np.int32))
    s.check_invariants()


def test_drafts_are_clipped_to_max_tokens_the_context_and_the_budget():
    s = make(budget=6, max_model_len=16)
    to_decoding(s, 1, range(10, 14), max_tokens=4)   # 1 output: a verify row may add 3
    drafts(s, r1=[1, 2, 3, 4, 5, 6])
    p = s.plan()
    assert p["spec_lens"].tolist() == [2]            # 1 + 2 more outputs = max_tokens 4 - 1
    codes, kept = s.update_verified(np.array([1, 2, 7], np.int32), np.array([3], np.int32))
    assert codes.tolist() == [FINISH_LENGTH] and kept.tolist() == [3]
    s.check_invariants()
    assert s.stats()["blocks_in_use"] == 0
    to_decoding(s, 2, range(20, 32), max_tokens=30)  # 12 + 1 tokens of max_model_len 16
    drafts(s, r2=[1, 2, 3, 4, 5])
    assert s.plan()["spec_lens"].tolist() == [2]     # positions 12..14: 16 tokens after
    s.update_verified(np.array([5], np.int32), np.array([1], np.int32))
    to_decoding(s, 3, range(40, 44))
    drafts(s, r2=[1, 2, 3, 4, 5, 6], r3=[1, 2, 3, 4, 5, 6])
    p = s.plan()                                     # budget 6: 2 decodes + 4 drafts
    assert p["query_lens"].sum() <= 6 and p["spec_lens"].sum() == 4
    s.update_verified(np.full(2, 5, np.int32), np.ones(2, np.int32))
    s.check_invariants()


def test_a_stop_id_mid_draft_finishes_there_and_drops_the_rest():
    s = make()
    to_decoding(s, 1, range(10, 15), stop=[7])
    drafts(s, r1=[4, 7, 5, 6])
    s.plan()
    codes, kept = s.update_verified(np.array([4, 7, 5, 6, 1], np.int32),
                                    np.array([5], np.int32))
    assert codes.tolist() == [FINISH_STOP] and kept.tolist() == [2]
    s.check_invariants()
    assert s.stats()["blocks_in_use"] == 0 and s.stats()["generated_tokens"] == 3


def test_illegal_verify_events_are_rejected():
    s = make()
    to_decoding(s, 1, range(10, 15))
    with pytest.raises(KeyError, match="request 5 is not live"):
        drafts(s, r5=[1])
    with pytest.raises(ValueError, match="negative token"):
        drafts(s, r1=[-1])
    drafts(s, r1=[4, 5])
    s.plan()
    with pytest.raises(RuntimeError, match="set_drafts\\(\\) while a plan awaits"):
        drafts(s, r1=[4])
    with pytest.raises(ValueError, match="has 2 drafts, so 1..3 tokens, got 4"):
        s.update_verified(np.array([4, 5, 6, 7], np.int32), np.array([4], np.int32))
    with pytest.raises(ValueError, match="accepts token 6 where its draft had 5"):
        s.update_verified(np.array([4, 6, 1], np.int32), np.array([3], np.int32))
    with pytest.raises(ValueError, match="counts sum to 2"):
        s.update_verified(np.array([4, 5, 1], np.int32), np.array([2], np.int32))
    s.check_invariants()                                  # nothing changed
    codes, kept = s.update_verified(np.array([4, 5, 1], np.int32), np.array([3], np.int32))
    assert kept.tolist() == [3]
    s.check_invariants()


def test_a_verify_row_that_does_not_fit_falls_back_to_a_plain_decode():
    s = make(num_blocks=3)                                # 12 slots
    to_decoding(s, 1, range(10, 17))                      # 8 tokens: 2 blocks
    drafts(s, r1=list(range(1, 9)))                       # 16 tokens would need 4 blocks
    p = s.plan()
    assert p["spec_lens"].tolist() == [0] and p["query_lens"].tolist() == [1]
    assert not p["preempted_ids"].size
    s.update(np.array([3], np.int32))
    s.check_invariants()


STEPS = st.tuples(st.just("step"), st.integers(0, 1 << 30), st.integers(0, 8),
                  st.integers(1, 6))
events = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 30), st.integers(1, 20)),
    STEPS, STEPS, STEPS,
    st.tuples(st.just("abort"), st.integers(0, 40)),
    st.tuples(st.just("fail"), st.integers(0, 40), st.integers(0, 8), st.just(1)),
    st.tuples(st.just("tick"), st.floats(0, 5)),
), max_size=60)


def one_sequence(events, num_blocks, ttl, cap):
    """Every step drafts for every live request (the scheduler ignores those not
    decoding), accepts a random prefix of each verify row's drafts and draws a bonus that
    is sometimes the stop id 7."""
    s = make(num_blocks=num_blocks, ttl=ttl, cap=cap, budget=12, max_model_len=48)
    prefixes = [list(range(100 + 10 * k, 100 + 10 * k + 13)) for k in range(4)]
    live: set[int] = set()
    next_id, now = 0, 0.0
    for ev in events:
        kind = ev[0]
        if kind == "add":
            _, pre, extra, max_tokens = ev
            prompt = (prefixes[pre][: max(1, extra % 13)] + list(range(extra)))[:40]
            s.add_request(next_id, np.array(prompt, np.int32), max_tokens, [7],
                          "s" if pre % 2 else "", now)
            live.add(next_id)
            next_id += 1
        elif kind in ("step", "fail"):
            for n in range(ev[3]):
                live = step(s, kind, np.random.default_rng(ev[1] + n), ev[2], live, now)
        elif kind == "abort" and live:
            rid = sorted(live)[ev[1] % len(live)]
            s.abort(rid, FINISH_ABORT, now)
            live.discard(rid)
        elif kind == "tick":
            now += ev[1]
        s.check_invariants()
    for n in range(len(events)):             # run what is left a while, drafting
        if not live:
            break
        live = step(s, "step", np.random.default_rng(n), 6, live, now)
    for rid in sorted(live):
        s.abort(rid, FINISH_ABORT, now)
    s.check_invariants()
    st_ = s.stats()
    assert st_["running"] == st_["waiting"] == st_["blocks_in_use"] == 0
    assert st_["blocks_free"] + st_["blocks_cached"] == num_blocks
    assert st_["spec_accepted_tokens"] <= st_["spec_draft_tokens"]
    return st_


def step(s, kind, rng, max_draft, live, now):
    """One plan with random drafts for the live requests, then a random acceptance per
    verify row (or a failed forward); returns the requests still live."""
    if live:                     # drafts for verify rows of failed steps too
        ids = sorted(live)
        lens = rng.integers(0, max_draft + 1, len(ids))
        toks = rng.integers(0, 9, int(lens.sum()))
        toks[(toks == 7) & (rng.random(toks.shape) < 0.8)] = 8      # fewer stop ids drafted
        s.set_drafts(np.array(ids, np.uint64), lens.astype(np.int32), toks.astype(np.int32))
    p = s.plan(now)
    if not s.plan_pending:
        return live
    assert len(p["input_ids"]) == p["query_lens"].sum() <= 12
    nd, nv = p["num_decodes"], p["num_verify"]
    assert (p["query_lens"][:nd] == 1).all() and (p["spec_lens"][:nd] == 0).all()
    assert (p["query_lens"][nd:nd + nv] == p["spec_lens"][nd:nd + nv] + 1).all()
    assert (p["spec_lens"][nd:nd + nv] > 0).all() and (p["spec_lens"][nd + nv:] == 0).all()
    assert p["num_logits"] == p["num_sample"] + p["spec_lens"].sum()
    if kind == "fail":
        failed = set(s.fail_pending(now).tolist())
        assert failed <= set(p["req_ids"].tolist())
        live = live - failed
        s.check_invariants()
        return live
    toks, counts = [], []
    qsl = np.concatenate([[0], np.cumsum(p["query_lens"])])
    for i in np.flatnonzero(p["sample"] == 1):
        k = int(p["spec_lens"][i])
        a = int(rng.integers(0, k + 1))
        toks += p["input_ids"][qsl[i] + 1:qsl[i] + 1 + a].tolist()
        toks.append(int(rng.integers(0, 16)))          # 7 (the stop id) sometimes
        counts.append(a + 1)
    codes, kept = s.update_verified(np.array(toks, np.int32), np.array(counts, np.int32),
                                    now)
    assert ((kept >= 1) & (kept <= np.array(counts))).all()
    done = {int(rid) for rid, c in zip(p["req_ids"][p["sample"] == 1], codes) if c}
    s.check_invariants()
    return live - done


def test_random_speculative_sequences_keep_every_block_accounted_for(record_property):
    seen = {"n": 0, "verify": 0, "accepted": 0}

    @settings(max_examples=600, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(events=events, num_blocks=st.integers(6, 30), ttl=st.sampled_from([0.0, 2.0]),
           cap=st.sampled_from([0, 3, 7]))
    def run(events, num_blocks, ttl, cap):
        seen["n"] += 1
        st_ = one_sequence(events, num_blocks, ttl, cap)
        seen["verify"] += st_["spec_verify_rows"]
        seen["accepted"] += st_["spec_accepted_tokens"]
    run()
    record_property("requests", seen["n"])
    record_property("verify_rows", seen["verify"])
    assert seen["n"] >= 500 and seen["verify"] > 300 and seen["accepted"] > 150


# ------------------------------------------------------------------ verification

def test_accepted_length_is_the_longest_matching_prefix():
    assert accepted_length(np.array([4, 5, 6, 1]), np.array([4, 5, 6])) == 3
    assert accepted_length(np.array([4, 9, 6, 1]), np.array([4, 5, 6])) == 1
    assert accepted_length(np.array([9, 5, 6, 1]), np.array([4, 5, 6])) == 0
    assert accepted_length(np.array([2]), np.array([], np.int64)) == 0


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson's statistic against the 0.1% critical value (df <= 7: 24.3)."""
    n = counts.sum()
    keep = probs > 0
    stat = (((counts - n * probs) ** 2)[keep] / (n * probs[keep])).sum()
    assert counts[~keep].sum() == 0
    return stat < 24.3 and keep.sum() - 1 <= 7


def test_verification_at_temperature_one_samples_the_target_distribution():
    """Position 0 has target p0 and the deterministic draft d; position 1 has p1. Over
    4000 seeds: the first emitted token follows p0; drafts are accepted with probability
    p0(d); after a rejection the token follows p0 restricted to x != d, renormalised; after
    an acceptance the bonus token follows p1."""
    v, d, n = 6, 2, 4000
    l0 = torch.tensor([1.0, 0.2, 1.5, -0.5, 0.7, 0.0])
    l1 = torch.tensor([0.1, 1.2, -1.0, 0.4, 0.9, 0.3])
    p0, p1 = l0.softmax(0).double().numpy(), l1.softmax(0).double().numpy()
    sampler = BatchSampler(n, v)
    params = SamplingParams(temperature=1.0)
    for slot in range(n):
        sampler.admit(slot, params, [0], seed=1000 + slot)
    slots = torch.arange(n).repeat_interleave(2)
    steps = torch.tensor([0, 1]).repeat(n)
    logits = torch.stack([l0, l1]).repeat(n, 1)
    draws = sampler.sample(logits, slots, steps, repeats=True).token_ids.numpy().reshape(n, 2)
    first, acc = [], []
    after_reject, bonus = [], []
    for row in draws:
        a = accepted_length(row, np.array([d]))
        emitted = row[:a + 1]
        first.append(emitted[0])
        acc.append(a)
        (bonus if a else after_reject).append(emitted[-1])
    assert chi_square_ok(np.bincount(first, minlength=v), p0)
    rate = np.mean(acc)
    assert abs(rate - p0[d]) < 4 * np.sqrt(p0[d] * (1 - p0[d]) / n)
    residual = p0.copy()
    residual[d] = 0
    assert chi_square_ok(np.bincount(after_reject, minlength=v), residual / residual.sum())
    assert chi_square_ok(np.bincount(bonus, minlength=v), p1)


def test_sampler_refuses_repeated_rows_for_penalised_slots():
    sampler = BatchSampler(2, 8)
    sampler.admit(0, SamplingParams(temperature=1.0, presence_penalty=1.0), [1])
    with pytest.raises(ValueError, match="slots \\[0\\] have penalties or a grammar"):
        sampler.sample(torch.zeros(2, 8), torch.tensor([0, 0]), torch.tensor([0, 1]),
                       repeats=True)


# ------------------------------------------------------------------ the engine, SmolLM2

CODE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "def mul(a, b):\n    return a * b\n\n\n")


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_dir):
    from tscompile.tokenizer import Tokenizer
    prog = build("llama", preset="smollm2-135m", mesh=Mesh.build(1)).save(
        tmp_path_factory.mktemp("spec") / "smol.tsprog")
    program = RankProgram(prog, 0, weights=str(smollm2_dir))
    tok = Tokenizer(smollm2_dir)
    return program, tok


def smol_engine(smol, **kw) -> Engine:
    program, tok = smol
    cfg = EngineConfig(**{"page_size": 16, "max_num_seqs": 4, "max_num_batched_tokens": 256,
                          "kv_cache_tokens": 2048, "max_model_len": 512, **kw})
    return Engine(program, cfg, vocab_size=49152, max_position_embeddings=512,
                  eos_token_ids=tuple(tok.eos_token_ids))


def run(eng: Engine, reqs: list[AddRequest]) -> dict[str, list]:
    outs: dict[str, list] = {r.rid: [] for r in reqs}
    for r in reqs:
        assert eng.add(r) is None
    for _ in range(2000):
        if not eng.has_work:
            break
        for o in eng.step():
            outs[o.rid].append(o)
        eng.sched.check_invariants()
    assert not eng.has_work and eng.stats().kv_blocks_used == 0
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def prompts(tok) -> list[tuple[int, ...]]:
    rewrite = CODE + "# the same functions again, unchanged:\n\n" + CODE[:40]
    return [tuple(tok.encode(rewrite)), tuple(tok.encode("One two three four. " * 6))]


@pytest.fixture(scope="module")
def plain(smol):
    """Each prompt's greedy tokens without speculation (and their engine)."""
    reqs = [AddRequest(f"r{i}", p, SamplingParams(max_tokens=40, temperature=0.0))
            for i, p in enumerate(prompts(smol[1]))]
    outs = run(smol_engine(smol), reqs)
    return {rid: tokens(o) for rid, o in outs.items()}


@pytest.mark.parametrize("method", ["suffix", "ngram"])
def test_greedy_with_each_drafter_is_token_identical_to_without(smol, plain, method):
    eng = smol_engine(smol, speculative=method, num_speculative_tokens=4)
    reqs = [AddRequest(f"r{i}", p, SamplingParams(max_tokens=40, temperature=0.0))
            for i, p in enumerate(prompts(smol[1]))]
    outs = run(eng, reqs)
    for rid, want in plain.items():
        assert tokens(outs[rid]) == want, rid
        last = outs[rid][-1]
        assert last.finish_reason in ("length", "stop") and last.spec_verify_steps > 0
        assert last.spec_accepted_tokens > 0            # drafts were accepted: not vacuous
    st_ = eng.stats()
    assert st_.spec_accepted_tokens > 0.3 * st_.spec_draft_tokens
    assert st_.steps < len(plain["r0"]) - 1             # fewer steps than tokens
    assert any(len(o.token_ids) > 1 for o in outs["r0"])


def test_seeded_sampling_gives_the_same_text_with_and_without_speculation(smol):
    p = prompts(smol[1])[0]
    params = SamplingParams(max_tokens=30, temperature=0.7, top_p=0.95, seed=7)
    base = run(smol_engine(smol), [AddRequest("s", p, params)])["s"]
    outs = run(smol_engine(smol, speculative="suffix", spec_adaptive=False),
               [AddRequest("s", p, params)])["s"]
    assert tokens(outs) == tokens(base)
    assert outs[-1].spec_accepted_tokens > 0


def test_max_tokens_and_stop_ids_mid_draft_stop_exactly_there(smol, plain):
    want = plain["r0"]
    p = prompts(smol[1])[0]
    eng = smol_engine(smol, speculative="ngram", num_speculative_tokens=6,
                      spec_adaptive=False)
    stop = want[9]
    first = want.index(stop)
    outs = run(eng, [AddRequest("len", p, SamplingParams(max_tokens=11, temperature=0.0)),
                     AddRequest("stop", p, SamplingParams(max_tokens=40, temperature=0.0,
                                                          stop_token_ids=(stop,)))])
    assert tokens(outs["len"]) == want[:11] and outs["len"][-1].finish_reason == "length"
    assert tokens(outs["stop"]) == want[:first + 1]
    assert outs["stop"][-1].finish_reason == "stop"
    assert eng.stats().spec_accepted_tokens > 0


def test_logprobs_with_speculation_match_without(smol):
    p = prompts(smol[1])[1]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=2)
    base = run(smol_engine(smol), [AddRequest("l", p, params)])["l"]
    spec = run(smol_engine(smol, speculative="suffix", spec_adaptive=False),
               [AddRequest("l", p, params)])["l"]
    a = [x for o in base for x in o.logprobs]
    b = [x for o in spec for x in o.logprobs]
    assert [x.token_id for x in a] == [x.token_id for x in b] == tokens(base)
    assert np.allclose([x.logprob for x in a], [x.logprob for x in b], atol=1e-3)
    assert spec[-1].spec_accepted_tokens > 0


def test_speculation_flags_are_validated():
    with pytest.raises(ValueError, match="--speculative must be one of suffix, ngram"):
        EngineConfig(speculative="mtp")
    with pytest.raises(ValueError, match="--num-speculative-tokens must be in"):
        EngineConfig(speculative="suffix", num_speculative_tokens=0)
    from tscompile.runtime.cli import parse
    cfg = parse(["x.tsprog", "--dummy-weights", "--speculative", "ngram",
                 "--num-speculative-tokens", "3"])
    assert cfg.engine.speculative == "ngram" and cfg.engine.num_speculative_tokens == 3



@pytest.mark.parametrize("world", [1, 2])
def test_tsrun_speculative_greedy_chat_equals_the_plain_engine(world, smol, smollm2_dir,
                                                              tmp_path):
    """A live `tsrun --speculative suffix` (tp 1 and 2): the greedy chat text equals the
    engine's without speculation on the same tokens, and /metrics counts accepted drafts."""
    from .test_tsrun import Server

    program, tok = smol
    messages = [{"role": "user", "content": "Repeat this code exactly:\n\n" + CODE}]
    ids = tuple(tok.encode(tok.apply_chat_template(messages)))
    want = tokens(run(smol_engine(smol), [AddRequest("w", ids, SamplingParams(
        max_tokens=48, temperature=0.0))])["w"])
    eos = [i for i, t in enumerate(want) if t in tok.eos_token_ids]
    text = tok.decode(want[: eos[0]] if eos else want)
    prog = build("llama", preset="smollm2-135m", mesh=Mesh.build(world, attn_tp=1)).save(
        tmp_path / f"smol-tp{world}.tsprog")
    s = Server(prog, smollm2_dir, "--max-model-len", "1024", "--kv-cache-tokens", "4096",
               "--speculative", "suffix", "--num-speculative-tokens", "4")
    try:
        r = s.client.chat.completions.create(model=s.model, messages=messages, max_tokens=48,
                                             temperature=0)
        assert r.choices[0].message.content == text
        assert s.metric("tsrun_spec_accepted_tokens_total") > 0
        assert s.metric("tsrun_spec_draft_tokens_total") >= s.metric(
            "tsrun_spec_accepted_tokens_total")
        assert s.metric("tsrun_spec_verify_steps_total") > 0
    finally:
        assert s.stop() == 0

# ------------------------------------------------------------------ two ranks

TINY_PROMPTS = [list(range(3, 20)) * 3, [5, 6, 7, 8] * 6, list(range(40, 50))]
TINY_CFG = dict(page_size=4, max_num_seqs=4, max_num_batched_tokens=32, kv_cache_tokens=512)


def tiny_outputs(eng: Engine) -> dict:
    reqs = [AddRequest(f"r{i}", tuple(p), SamplingParams(max_tokens=30, temperature=0.0))
            for i, p in enumerate(TINY_PROMPTS)]
    outs = run(eng, reqs)
    return {rid: tokens(o) for rid, o in outs.items()}


def _rank_main(rank: int, port: int, prog: str, out: Path) -> None:
    """One rank of a tp-2 tiny Llama (dummy weights): rank 0 serves the prompts with
    --speculative ngram; both ranks hold padded step graphs (capture=False) with verify
    buckets, so verify steps replay those (logits at every draft position) on both."""
    import torch.distributed as dist

    from tscompile.runtime.cuda_graphs import StepGraphs
    from tscompile.runtime.engine import forward_step
    from tscompile.runtime.kv_cache import bind_rank, kv_blocks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    set_control_group(dist.new_group(backend="gloo"))
    cfg = EngineConfig(**TINY_CFG, speculative="ngram", num_speculative_tokens=4)
    program = RankProgram(prog, rank, dummy_seed=3)
    blocks = kv_blocks(cfg, program, torch.float32, torch.device("cpu"), 512)

    def padded() -> StepGraphs:
        return StepGraphs(program, max_batch=4, max_blocks=512 // 4, page_size=4,
                          scratch_block=blocks, device="cpu", sizes=(2, 4),
                          prefill_sizes=(16, 32), verify_tokens=32, capture=False)
    if rank == 0:
        eng = Engine(program, cfg, vocab_size=256, max_position_embeddings=512,
                     num_blocks=blocks)
        eng.graphs = padded()
        result = {"tokens": tiny_outputs(eng), "eager": eng.graphs.eager_steps,
                  "replays": eng.graphs.replays, "verify": eng.graphs.verify_replays,
                  "accepted": eng.stats().spec_accepted_tokens}
        broadcast_step(None)
    else:
        bind_rank(program, cfg, blocks, 512, torch.float32, torch.device("cpu"))
        graphs = padded()
        follow_steps(lambda step: forward_step(program, graphs, step, torch.device("cpu")))
        result = {"eager": graphs.eager_steps, "replays": graphs.replays,
                  "verify": graphs.verify_replays}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_two_ranks_greedy_with_speculation_equals_one_rank_without(tmp_path):
    from tscompile.runtime.distributed import free_port

    prog = build("llama", preset="tiny", mesh=Mesh.build(2)).save(tmp_path / "tp2.tsprog")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), str(prog),
                               str(tmp_path)], stdout=logs[r], stderr=subprocess.STDOUT,
                              env=env) for r in range(2)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2))
    assert codes == [0, 0], text
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    one = build("llama", preset="tiny", mesh=Mesh.build(1)).save(tmp_path / "tp1.tsprog")
    want = tiny_outputs(Engine(RankProgram(one, 0, dummy_seed=3), EngineConfig(**TINY_CFG),
                               vocab_size=256, max_position_embeddings=512))
    assert got[0]["tokens"] == want
    assert got[0]["accepted"] > 0
    assert got[0]["eager"] == got[1]["eager"]              # the same path on both ranks
    assert got[0]["verify"] == got[1]["verify"] > 0        # verify steps replayed buckets
    assert got[0]["replays"] == got[1]["replays"] > got[0]["verify"]   # and plain steps


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
