"""BatchSampler: penalties against a per-row reference, seeded draws independent of batch
composition and slot, raw logprobs, slot reuse, and argument validation."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from tscompile.runtime.offline import sample_one
from tscompile.runtime.protocol import SamplingParams
from tscompile.runtime.sampler import BatchSampler

V = 64


def _ref_penalise(row: torch.Tensor, params: SamplingParams, prompt: list[int],
                  output: list[int]) -> torch.Tensor:
    """The straightforward per-token reference (vLLM order: repetition, frequency,
    presence), in fp32 like the sampler."""
    x = row.float().clone()
    counts = Counter(output)
    seen = set(prompt) | set(output)
    p = torch.tensor(params.repetition_penalty, dtype=torch.float32)
    f = torch.tensor(params.frequency_penalty, dtype=torch.float32)
    pr = torch.tensor(params.presence_penalty, dtype=torch.float32)
    for v in range(x.shape[0]):
        if v in seen:
            x[v] = x[v] / p if x[v] > 0 else x[v] * p
        c = counts.get(v, 0)
        x[v] = x[v] - f * c
        x[v] = x[v] - pr * (1.0 if c > 0 else 0.0)
    return x


def _step(sampler, logits, slots, steps):
    return sampler.sample(logits, torch.tensor(slots), torch.tensor(steps))


def test_greedy_is_argmax_and_input_untouched():
    s = BatchSampler(8, V)
    for slot in range(4):
        s.admit(slot, SamplingParams(temperature=0.0), [1, 2, 3])
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(4, V).to(dtype)
        before = logits.clone()
        out = _step(s, logits, [3, 0, 2, 1], [0, 5, 1, 2])
        assert out.token_ids.dtype == torch.int64
        assert torch.equal(out.token_ids, logits.float().argmax(-1))
        assert torch.equal(logits, before)
        assert out.logprobs is None and out.token_logprobs() == [None] * 4
    assert not s.penalty_state_allocated


def test_all_greedy_steps_skip_the_sample_op_and_match_it(monkeypatch):
    """A step whose rows are all temperature 0 takes the argmax of the penalised logits
    without calling the sample op; one random row sends the whole step through the op,
    whose greedy rows agree with that argmax."""
    import tscompile.runtime.sampler as sampler_mod

    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    samplers = [BatchSampler(8, V), BatchSampler(8, V)]
    for s in samplers:
        for slot in range(3):
            s.admit(slot, greedy, [1, 2, 3, 4 + slot])
    samplers[1].admit(5, SamplingParams(temperature=0.8, seed=7), [9])
    logits = torch.randn(3, V)
    calls = []
    real = sampler_mod._SAMPLE
    monkeypatch.setattr(sampler_mod, "_SAMPLE", lambda *a: calls.append(1) or real(*a))
    fast = _step(samplers[0], logits, [2, 0, 1], [0, 1, 2]).token_ids
    assert not calls
    mixed = _step(samplers[1], torch.cat([logits, torch.randn(1, V)]), [2, 0, 1, 5],
                  [0, 1, 2, 0])
    assert calls and torch.equal(mixed.token_ids[:3], fast)
    want = torch.stack([_ref_penalise(logits[i], greedy, [1, 2, 3, 4 + slot], [])
                        for i, slot in enumerate([2, 0, 1])]).argmax(-1)
    assert torch.equal(fast, want)


def test_penalties_match_reference_and_counts_update():
    s = BatchSampler(6, V)
    cases = {  # slot -> (params, prompt)
        0: (SamplingParams(temperature=0.0, presence_penalty=1.5), [3, 3, 7]),
        2: (SamplingParams(temperature=0.0, frequency_penalty=0.7), [1]),
        3: (SamplingParams(temperature=0.0, repetition_penalty=1.8), [5, 9, 9, 60]),
        4: (SamplingParams(temperature=0.0, repetition_penalty=0.6, frequency_penalty=-0.5,
                           presence_penalty=0.3), [0, 63, 10]),
        5: (SamplingParams(temperature=0.0), [2, 4]),   # no penalty, batched with them
    }
    for slot, (params, prompt) in cases.items():
        s.admit(slot, params, prompt)
    assert s.penalty_state_allocated
    slots = sorted(cases)
    outputs = {slot: [] for slot in slots}
    g = torch.Generator().manual_seed(1)
    changed = 0
    for step in range(12):
        # Few distinct strong candidates so penalties change the argmax and tokens repeat.
        logits = torch.randn(len(slots), V, generator=g) * 3
        logits[:, :8] += 6
        ref = torch.stack([_ref_penalise(logits[r], cases[slot][0], cases[slot][1],
                                         outputs[slot]) for r, slot in enumerate(slots)])
        got = s.apply_penalties(logits, torch.tensor(slots))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        out = _step(s, logits, slots, [step] * len(slots))
        assert torch.equal(out.token_ids, ref.argmax(-1))
        changed += int((out.token_ids != logits.argmax(-1)).sum())
        for r, slot in enumerate(slots):
            outputs[slot].append(int(out.token_ids[r]))
    # The penalties actually bit (greedy picked a token other than the raw argmax), and
    # tokens repeated, so counts above 1 were exercised.
    assert changed > 0
    assert any(len(set(o)) < len(o) for o in outputs.values())
    for slot in slots[:-1]:
        counts = torch.bincount(torch.tensor(outputs[slot]), minlength=V).int()
        assert torch.equal(s._counts[slot], counts)


def test_penalised_rows_in_random_row_order():
    # Rows need not be in slot order; penalty state follows the slot, not the row.
    s = BatchSampler(4, V)
    pa = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    pb = SamplingParams(temperature=0.0, repetition_penalty=3.0)
    s.admit(1, pa, [0])
    s.admit(3, pb, [1, 2])
    logits = torch.randn(2, V)
    s.sample(logits, torch.tensor([3, 1]), torch.tensor([0, 0]))
    a_tok = int(logits[1].argmax())
    b_tok = int(_ref_penalise(logits[0], pb, [1, 2], []).argmax())
    x = torch.randn(2, V)
    got = s.apply_penalties(x, torch.tensor([1, 3]))
    torch.testing.assert_close(got[0], _ref_penalise(x[0], pa, [0], [a_tok]), rtol=0, atol=0)
    torch.testing.assert_close(got[1], _ref_penalise(x[1], pb, [1, 2], [b_tok]), rtol=0, atol=0)


def _run(sampler, slot, logits_seq, others=()):
    """Run one request through len(logits_seq) steps in `slot`; `others` are
    (slot, logits_seq) rows batched with it (placed before it). Returns its tokens."""
    toks = []
    for t, row in enumerate(logits_seq):
        rows = [o_logits[t] for _, o_logits in others] + [row]
        slots = [o_slot for o_slot, _ in others] + [slot]
        out = _step(sampler, torch.stack(rows), slots, [t] * len(rows))
        toks.append(int(out.token_ids[-1]))
    return toks


@pytest.mark.parametrize("penalised", [False, True])
def test_seeded_request_same_alone_and_batched(penalised):
    extra = dict(frequency_penalty=0.8, repetition_penalty=1.3) if penalised else {}
    params = SamplingParams(temperature=1.3, top_p=0.95, top_k=40, min_p=0.01, seed=1234,
                            **extra)
    prompt = [5, 6, 7]
    steps = 24
    g = torch.Generator().manual_seed(7)
    mine = [torch.randn(V, generator=g) for _ in range(steps)]

    alone = BatchSampler(8, V)
    assert alone.admit(0, params, prompt) == 1234
    ref = _run(alone, 0, mine)

    batched = BatchSampler(8, V)
    others = []
    for slot, p in ((0, SamplingParams(temperature=0.9, seed=99, presence_penalty=1.0)),
                    (2, SamplingParams(temperature=0.0, repetition_penalty=2.0)),
                    (7, SamplingParams(temperature=1.0))):   # unseeded
        batched.admit(slot, p, [1, 2, 3])
        others.append((slot, [torch.randn(V, generator=g) for _ in range(steps)]))
    batched.admit(5, params, prompt)
    assert _run(batched, 5, mine, others) == ref

    # A different seed gives different tokens (the draw is random, not greedy).
    other = BatchSampler(8, V)
    other.admit(0, SamplingParams(**{**_fields(params), "seed": 4321}), prompt)
    assert _run(other, 0, mine) != ref


def _fields(p: SamplingParams) -> dict:
    return {name: getattr(p, name) for name in p.__slots__}


def test_matches_offline_sample_one():
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5)
    s = BatchSampler(2, V)
    s.admit(1, params, [0])
    for t in range(10):
        row = torch.randn(V)
        got = int(_step(s, row[None], [1], [t]).token_ids[0])
        assert got == sample_one(row, params, t)


def test_seeds_fresh_reproducible_and_readmission():
    s = BatchSampler(4, V, rng_seed=0)
    a = s.admit(0, SamplingParams(), [1])
    b = s.admit(1, SamplingParams(), [1])
    assert a != b and 0 <= a < 2**63
    assert BatchSampler(4, V, rng_seed=0).admit(3, SamplingParams(), [1]) == a
    # Seeds beyond int64 keep their low 64 bits.
    assert s.admit(2, SamplingParams(seed=2**64 + 3), [1]) == 3
    assert s.admit(3, SamplingParams(seed=2**64 - 1), [1]) == -1

    # Preempt and re-admit with the returned seed and the tokens so far: the rest of the
    # stream (and the penalty state) is as if it had never left.
    params = SamplingParams(temperature=1.0, presence_penalty=2.0, frequency_penalty=2.0)
    g = torch.Generator().manual_seed(3)
    seq = [torch.randn(V, generator=g) for _ in range(10)]
    full = BatchSampler(4, V)
    seed = full.admit(2, params, [9])
    ref = _run(full, 2, seq)
    resumed = BatchSampler(4, V)
    assert resumed.admit(0, params, [9], seed=seed) == seed
    first = _run(resumed, 0, seq[:4])
    resumed.release(0)
    resumed.admit(3, params, [9], output_ids=first, seed=seed)
    rest = [int(_step(resumed, row[None], [3], [4 + t]).token_ids[0])
            for t, row in enumerate(seq[4:])]
    assert first + rest == ref


def test_logprobs_are_raw_and_top_sorted():
    s = BatchSampler(6, V)
    s.admit(0, SamplingParams(temperature=0.7, seed=1, logprobs=True, top_logprobs=5,
                              repetition_penalty=2.0), [1, 2, 3])
    s.admit(1, SamplingParams(temperature=0.0), [1])                  # no logprobs
    s.admit(4, SamplingParams(temperature=0.0, logprobs=True), [1])   # chosen token only
    s.admit(5, SamplingParams(temperature=1.0, logprobs=True, top_logprobs=2), [1])
    slots = [5, 1, 0, 4]
    logits = torch.randn(4, V, dtype=torch.bfloat16)
    out = _step(s, logits, slots, [0, 0, 0, 0])
    raw = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    tl = out.token_logprobs()
    assert tl[1] is None
    for r, k in ((0, 2), (2, 5), (3, 0)):
        entry = tl[r]
        assert entry.token_id == int(out.token_ids[r])
        assert entry.logprob == pytest.approx(float(raw[r, entry.token_id]), abs=1e-6)
        assert len(entry.top) == k
        assert [t for t, _ in entry.top] == raw[r].argsort(descending=True)[:k].tolist()
        lps = [lp for _, lp in entry.top]
        assert lps == sorted(lps, reverse=True)
        for t, lp in entry.top:
            assert lp == pytest.approx(float(raw[r, t]), abs=1e-6)
    # Once no active request wants logprobs, none are computed.
    for slot in (0, 4, 5):
        s.release(slot)
    assert _step(s, logits[:1], [1], [1]).logprobs is None


def test_release_resets_slot():
    s = BatchSampler(2, V)
    old = SamplingParams(temperature=0.0, frequency_penalty=2.0, repetition_penalty=5.0)
    s.admit(0, old, list(range(32)))
    s.admit(1, SamplingParams(temperature=0.0), [0])
    for t in range(5):
        _step(s, torch.randn(2, V), [0, 1], [t, t])
    s.release(0)
    assert not s.penalty_state_allocated        # last penalised request gone
    assert not s.is_active(0) and s.is_active(1)

    new = SamplingParams(temperature=0.0, presence_penalty=1.0)
    s.admit(0, new, [40])
    x = torch.randn(2, V)
    got = s.apply_penalties(x, torch.tensor([0, 1]))
    torch.testing.assert_close(got[0], _ref_penalise(x[0], new, [40], []), rtol=0, atol=0)
    assert torch.equal(got[1], x[1])            # neutral row untouched

    # Same with the penalty state kept alive by another penalised request in between.
    s2 = BatchSampler(2, V)
    s2.admit(0, old, list(range(32)))
    s2.admit(1, SamplingParams(temperature=0.0, presence_penalty=0.5), [0])
    for t in range(5):
        _step(s2, torch.randn(2, V), [0, 1], [t, t])
    s2.release(0)
    assert s2.penalty_state_allocated
    s2.admit(0, new, [40])
    got = s2.apply_penalties(x, torch.tensor([0]))
    torch.testing.assert_close(got[0], _ref_penalise(x[0], new, [40], []), rtol=0, atol=0)
    # A plain request reusing a penalised slot sees raw logits.
    s2.release(0)
    s2.admit(0, SamplingParams(temperature=0.0), [1])
    assert torch.equal(s2.apply_penalties(x, torch.tensor([0]))[0], x[0])


def test_validation_errors():
    s = BatchSampler(4, V)
    p = SamplingParams()
    with pytest.raises(ValueError, match="out of range"):
        s.admit(4, p, [1])
    with pytest.raises(ValueError, match="out of range"):
        s.admit(-1, p, [1])
    with pytest.raises(TypeError):
        s.admit(1.0, p, [1])
    with pytest.raises(TypeError):
        s.admit(0, {"temperature": 1.0}, [1])
    with pytest.raises(ValueError, match="token ids"):
        s.admit(0, SamplingParams(presence_penalty=1.0), [V])
    assert not s.is_active(0) and not s.penalty_state_allocated   # nothing half-admitted
    with pytest.raises(ValueError, match="not admitted"):
        s.release(0)
    s.admit(0, p, [1])
    s.admit(1, p, [1])
    with pytest.raises(ValueError, match="already admitted"):
        s.admit(0, p, [1])

    logits = torch.randn(2, V)
    ok_slots, ok_steps = torch.tensor([0, 1]), torch.tensor([0, 0])
    s.sample(logits, ok_slots, ok_steps)
    bad = [
        ((torch.randn(2, V + 1), ok_slots, ok_steps), "vocab_size"),
        ((torch.randn(V), ok_slots[:1], ok_steps[:1]), "2-D"),
        ((torch.randint(0, 5, (2, V)), ok_slots, ok_steps), "floating"),
        ((logits, torch.tensor([0]), ok_steps), "slots must be"),
        ((logits, ok_slots, torch.tensor([0, 0, 0])), "step_index must be"),
        ((logits, torch.tensor([0.0, 1.0]), ok_steps), "integer"),
        ((logits, torch.tensor([0, 4]), ok_steps), r"slots must be in \[0, 4\)"),
        ((logits, torch.tensor([0, 2]), ok_steps), r"not admitted: \[2\]"),
        ((logits, torch.tensor([1, 1]), ok_steps), "repeat"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            s.sample(*args)
    with pytest.raises(ValueError):
        BatchSampler(0, V)
    with pytest.raises(ValueError):
        BatchSampler(4, 0)


def test_logit_bias_is_added_to_its_rows_only():
    """+100 forces a token, -100 bans the argmax, a row without a bias is untouched, and the
    bias leaves with its request; logprobs stay the raw model's."""
    torch.manual_seed(3)
    logits = torch.randn(3, V)
    top = int(logits[1].argmax())
    s = BatchSampler(4, V)
    s.admit(0, SamplingParams(temperature=0.0, logit_bias=((7, 100.0),)), [1])
    s.admit(2, SamplingParams(temperature=0.0, logit_bias=((top, -100.0),), logprobs=True),
            [1])
    s.admit(3, SamplingParams(temperature=0.0), [1])
    got = _step(s, logits, [0, 2, 3], [0, 0, 0])
    want_row1 = logits[1].clone()
    want_row1[top] -= 100
    assert got.token_ids.tolist() == [7, int(want_row1.argmax()), int(logits[2].argmax())]
    raw = torch.log_softmax(logits[1], -1)
    assert torch.allclose(got.logprobs[1], raw[got.token_ids[1]])
    s.release(0)
    s.admit(0, SamplingParams(temperature=0.0), [1])
    assert _step(s, logits[:1], [0], [0]).token_ids.tolist() == [int(logits[0].argmax())]


def test_logit_bias_is_validated():
    with pytest.raises(ValueError, match="values must be in \\[-100, 100\\]"):
        SamplingParams(logit_bias=((1, 101.0),))
    with pytest.raises(ValueError, match="at most 1024 entries"):
        SamplingParams(logit_bias=tuple((i, 1.0) for i in range(1025)))
    with pytest.raises(ValueError, match="token 3 is given twice"):
        SamplingParams(logit_bias=((3, 1.0), (3, 2.0)))
    with pytest.raises(ValueError, match="token id 64 outside the vocabulary"):
        BatchSampler(2, V).admit(0, SamplingParams(logit_bias=((64, 1.0),)), [1])
