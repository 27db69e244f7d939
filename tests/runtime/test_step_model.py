"""The decode-floor planner: given a step-time model, every step that carries decodes is
predicted to meet 1 / floor (the highest floor among its decodes), and prefill gets the
remainder (one more prefill token would cross the floor, or no prefill was waiting, or a
token budget bound it). The model's fit over-predicts every profiled step; the engine with a
floor keeps its greedy outputs; bad models and floors are errors naming the problem."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tscompile.runtime._scheduler import Scheduler
from tscompile.runtime.step_model import (
    Sample, StepTimeModel, features, fit, profile_shapes, synthetic_step,
)

from tscompile.runtime.protocol import AddRequest

from .test_engine import PROMPTS, alone, engine, greedy, prog, run_all  # noqa: F401

PS = 16
# An H200-like Qwen3-8B step: 7 ms base, KV reads, 1.6e-5 s per prefill token.
MODEL = StepTimeModel(base=7e-3, per_decode=2e-5, per_kv_token=2.5e-9, prefill_base=3e-4,
                      per_prefill_token=1.6e-5, per_prefill_attn=4e-10)


def make(floor: float = 70.0, model: StepTimeModel | None = MODEL, budget: int = 4096,
         seqs: int = 32, cap: int = 0, buckets: tuple[int, ...] = ()) -> Scheduler:
    return Scheduler(num_blocks=50000, page_size=PS, max_num_seqs=seqs,
                     max_num_batched_tokens=budget, max_model_len=65536,
                     max_tokens_with_decodes=cap, decode_floor_tps=floor,
                     step_model=None if model is None else model.to_dict(),
                     prefill_buckets=list(buckets))


def plan_shape(p) -> tuple[list[int], list[tuple[int, int]]]:
    nd = p["num_decodes"]
    q, lens = p["query_lens"].tolist(), p["seq_lens"].tolist()
    return lens[:nd], [(n - c, c) for c, n in zip(q[nd:], lens[nd:])]


class Workload:
    """Requests with random (unshared: no prefix hits) prompts, and what of each prompt the
    plans have scheduled so far."""

    def __init__(self, s: Scheduler, default: float, seed: int):
        self.s, self.default, self.rng = s, default, random.Random(seed)
        self.prompt: dict[int, int] = {}
        self.done: dict[int, int] = {}
        self.floor: dict[int, float] = {}

    def add(self, floor: float | None = None, n: int | None = None, out: int | None = None):
        rid = len(self.prompt)
        n = n or self.rng.randint(200, 20000)
        f = self.rng.choice([0.0, 0.0, 50.0, 200.0]) if floor is None else floor
        toks = np.array([self.rng.randrange(1000) for _ in range(n)], np.int32)
        self.s.add_request(rid, toks, out or self.rng.randint(5, 60), decode_floor_tps=f)
        self.prompt[rid], self.done[rid], self.floor[rid] = n, 0, f

    def step(self) -> tuple[int, int]:
        """Plan, check, update: returns (1 if the step carried decodes and prefill, 1 if
        the check that prefill got the rest applied)."""
        s = self.s
        p = s.plan(0.0)
        if not s.plan_pending:
            return 0, 0
        dec, chunks = plan_shape(p)
        ids = p["req_ids"].tolist()
        for rid, (_, c) in zip(ids[len(dec):], chunks):
            self.done[rid] += c
        predicted = MODEL.predict(dec, chunks)
        checked = 0
        if dec:
            floor = max(self.floor[r] or self.default for r in ids[: len(dec)])
            assert p["floor_tps"] == pytest.approx(floor)
            if floor:
                assert p["predicted_s"] == pytest.approx(predicted, rel=1e-9)
                # Prefill never pushes a step past the floor (the decodes alone may), but
                # for the liveness minimum: one chunk of at most 16 tokens.
                assert (not chunks or predicted <= 1 / floor + 1e-12
                        or (len(chunks) == 1 and chunks[0][1] <= 16))
                # The rest goes to prefill: the next prompt token in line would cross it,
                # unless the token budget bound the step or nothing could be prefilled.
                st_ = s.stats()
                line = [r for r in sorted(self.prompt) if self.done[r] < self.prompt[r]
                        and (s.state_of(r) == "prefilling" or st_["running"] < 32)]
                if line and p["input_ids"].shape[0] < 4096:
                    more = chunks + [(self.done[line[0]], 1)]
                    assert MODEL.predict(dec, more) > 1 / floor - 1e-12
                    checked = 1
        s.update(np.full(p["num_sample"], 7, np.int32), 0.0)
        s.check_invariants()
        return int(bool(dec and chunks)), checked


def test_every_planned_step_meets_the_floor_and_prefill_gets_the_rest():
    w = Workload(make(floor=70.0), 70.0, seed=0)
    mixed = checked = 0
    for i in range(400):
        if i % 7 == 0:
            w.add()
        m, c = w.step()
        mixed, checked = mixed + m, checked + c
    assert mixed > 20 and checked > 20


BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def padded_overruns(buckets: tuple[int, ...], steps: int = 400) -> tuple[int, int, int]:
    """(floor-limited mixed steps, those whose prefill padded to its graph bucket is
    predicted past the floor (the liveness minimum aside), those ending on a bucket)."""
    w = Workload(make(floor=70.0, buckets=buckets), 70.0, seed=3)
    mixed = over = on_bucket = 0
    for i in range(steps):
        if i % 5 == 0:
            w.add(floor=70.0)
        p = w.s.plan(0.0)
        if not w.s.plan_pending:
            continue
        dec, chunks = plan_shape(p)
        for rid, (_, c) in zip(p["req_ids"].tolist()[len(dec):], chunks):
            w.done[rid] += c
        if dec and chunks:
            mixed += 1
            total = sum(c for _, c in chunks)
            pad = next((b for b in BUCKETS if b >= total), total) - total
            pred = MODEL.predict(dec, chunks) + MODEL.per_prefill_token * pad
            over += pred > 1 / 70.0 + 1e-12 and not (len(chunks) == 1 and total <= 16)
            on_bucket += total in BUCKETS
        w.s.update(np.full(p["num_sample"], 7, np.int32), 0.0)
        w.s.check_invariants()
    return mixed, over, on_bucket


def test_floor_steps_fit_with_their_graph_padding():
    """With the step graphs' prefill buckets, a floor-limited step's prefill padded to its
    bucket still fits the floor (the chunk ends on a bucket when the padding would not);
    without them the same workload's padded steps cross it."""
    mixed, over, on_bucket = padded_overruns(BUCKETS)
    assert mixed > 50 and over == 0 and on_bucket > 10
    mixed, over, _ = padded_overruns(())
    assert mixed > 50 and over > 10


@pytest.mark.parametrize("bad", [[0, 16], [32, 16], [16, 16]])
def test_bad_prefill_buckets_are_named(bad):
    with pytest.raises(ValueError, match="prefill_buckets must be ascending positive"):
        make(buckets=tuple(bad))


def test_per_request_floors_without_a_default_floor():
    """No server-wide floor: only steps carrying a request with its own floor are sized."""
    w = Workload(make(floor=0.0), 0.0, seed=1)
    w.add(floor=0.0, n=500, out=50)
    w.step()
    w.add(floor=0.0, n=8000, out=5)
    p = w.s.plan(0.0)
    assert p["floor_tps"] == 0.0 and p["input_ids"].shape[0] == 4096   # budget-bound
    w.done[1] += 4095
    w.s.update(np.full(p["num_sample"], 7, np.int32), 0.0)
    w.add(floor=200.0, n=300, out=50)
    checked = 0
    for i in range(300):
        if i % 11 == 0:
            w.add()
        checked += w.step()[1]
    assert checked > 10


def test_without_a_floor_the_token_budgets_hold():
    s = make(floor=0.0, model=None, budget=512, cap=300)
    s.add_request(0, np.arange(100, dtype=np.int32), 20)
    p = s.plan(0.0)
    s.update(np.full(p["num_sample"], 7, np.int32), 0.0)
    s.add_request(1, np.arange(5000, dtype=np.int32), 5)
    p = s.plan(0.0)
    assert p["query_lens"].tolist() == [1, 299] and p["predicted_s"] == 0.0


def test_decodes_past_the_floor_slow_prefill_to_the_minimum_but_never_starve_it():
    """A decode at 60K context costs more than 1/200 s alone: prefill beside it gets only
    kMinFloorPrefill (16) tokens a step, so a new prompt still progresses and finishes."""
    big = StepTimeModel(**{**MODEL.to_dict(), "per_kv_token": 3e-7})
    s = Scheduler(num_blocks=20000, page_size=PS, max_num_seqs=8, max_num_batched_tokens=4096,
                  max_model_len=65536, step_model=big.to_dict())
    s.add_request(0, np.arange(60000, dtype=np.int32) % 997, 40, decode_floor_tps=200)
    while s.state_of(0) != "decoding":
        p = s.plan(0.0)
        s.update(np.full(p["num_sample"], 7, np.int32), 0.0)
    s.add_request(9, np.arange(100, dtype=np.int32) + 2000, 3)      # no prefix hit
    rows = []
    for _ in range(12):
        p = s.plan(0.0)
        ids = p["req_ids"].tolist()
        assert ids[0] == 0 and p["predicted_s"] > 1 / 200
        if 9 in ids:
            rows.append(int(p["query_lens"][ids.index(9)]))
        s.update(np.full(p["num_sample"], 7, np.int32), 0.0)
    # Six 16-token chunks and the last 4, then its two decode steps; then it is done.
    assert rows == [16] * 6 + [4, 1, 1]
    assert s.state_of(0) == "decoding" and s.stats()["running"] == 1


@pytest.mark.parametrize("bad,match", [
    ({**MODEL.to_dict(), "per_decode": -1.0}, "must be >= 0"),
    ({k: v for k, v in MODEL.to_dict().items() if k != "base"}, "missing coefficient 'base'"),
    ({**MODEL.to_dict(), "speed": 1.0}, "unknown coefficient 'speed'"),
])
def test_bad_step_models_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        Scheduler(num_blocks=8, page_size=PS, max_num_seqs=2, max_num_batched_tokens=64,
                  max_model_len=256, step_model=bad)


def test_bad_floors_are_named():
    with pytest.raises(ValueError, match="must be >= 0"):
        make(floor=-1.0)
    s = make()
    with pytest.raises(ValueError, match="decode_floor_tps must be >= 0"):
        s.add_request(0, np.arange(10, dtype=np.int32), 5, decode_floor_tps=float("nan"))
    with pytest.raises(ValueError, match="step-time model: per_kv_token must be"):
        StepTimeModel(per_kv_token=float("inf"))
    with pytest.raises(ValueError, match="expected the keys"):
        StepTimeModel.from_dict({"base": 1.0})


def test_fit_recovers_the_model_and_over_predicts_every_sample():
    rng = np.random.default_rng(0)
    samples = []
    for dec, chunks in profile_shapes(32, 2048, 32768):
        t = MODEL.predict(dec, chunks) * float(rng.uniform(0.97, 1.03))
        samples.append(Sample(tuple(dec), tuple(chunks), t))
    m = fit(samples)
    for s in samples:
        assert m.predict(s.decode_context, s.chunks) >= s.seconds * (1 - 1e-9)
    for k in ("base", "per_prefill_token"):
        assert getattr(m, k) == pytest.approx(getattr(MODEL, k), rel=0.1)
    assert all(v >= 0 for v in m.to_dict().values())
    # A negative trend in the data gives a zero coefficient, never a negative one.
    flat = [Sample((100,) * d, (), 0.01 - 1e-5 * d) for d in (1, 2, 4, 8)]
    assert fit(flat).per_decode == 0.0


def test_model_json_round_trip_and_cli(tmp_path):
    path = tmp_path / "m.json"
    MODEL.save(path, [Sample((5,), (), 0.01)])
    assert StepTimeModel.load(path) == MODEL
    assert json.loads(path.read_text())["samples"][0]["seconds"] == 0.01
    from tscompile.runtime.cli import parse
    cfg = parse(["p.tsprog", "--dummy-weights", "--decode-floor-tps", "70",
                 "--step-time-model", str(path)])
    assert cfg.engine.decode_floor_tps == 70.0 and cfg.engine.step_time_model == MODEL
    (tmp_path / "bad.json").write_text('{"base": 1}')
    with pytest.raises(SystemExit):
        parse(["p.tsprog", "--dummy-weights", "--step-time-model", str(tmp_path / "bad.json")])
    with pytest.raises(ValueError, match="--decode-floor-tps must be"):
        parse(["p.tsprog", "--dummy-weights", "--decode-floor-tps", "-3"])


def test_synthetic_profile_steps_fit_the_pool():
    step = synthetic_step([33, 40], [(0, 20), (17, 5)], 16, 64, 256)
    m = step.meta
    assert m.num_decodes == 2 and m.seq_lens.tolist() == [33, 40, 20, 22]
    assert step.positions.tolist()[:2] == [32, 39] and step.input_ids.numel() == 27
    assert features([33, 40], [(0, 20), (17, 5)]).tolist() == [
        1, 2, 73, 1, 25, 20 * 10 + 5 * (17 + 2.5)]
    with pytest.raises(ValueError, match="needs .* KV blocks"):
        synthetic_step([1000] * 8, [], 16, 64, 256)


def test_engine_with_a_floor_keeps_greedy_outputs_and_the_floor(prog, alone):  # noqa: F811
    """A floor that lets only a few prefill tokens beside decodes: outputs are unchanged,
    and every mixed step the engine ran was planned within the floor."""
    m = StepTimeModel(base=1e-3, per_decode=1e-4, per_kv_token=0.0, prefill_base=0.0,
                      per_prefill_token=2.5e-4, per_prefill_attn=0.0)
    # 6.5 ms a step: 22 - 0.4 * decodes prefill tokens beside the decodes (budget 64).
    eng = engine(prog, decode_floor_tps=1 / 6.5e-3, step_time_model=m,
                 max_num_batched_tokens=64)
    plans = []

    class Spy:                          # the engine's scheduler, its plans recorded
        def __init__(self, sched):
            self.sched = sched

        def __getattr__(self, name):
            return getattr(self.sched, name)

        def plan(self, now):
            p = self.sched.plan(now)
            plans.append((p["num_decodes"], p["query_lens"].tolist(), p["predicted_s"]))
            return p
    eng.sched = Spy(eng.sched)
    prompts = PROMPTS + [list(range(60, 100)), list(range(100, 150))]
    reqs = [AddRequest(f"f{i}", tuple(p), greedy(3 + 4 * i)) for i, p in enumerate(prompts)]
    outs = run_all(eng, reqs)
    for r, p in zip(reqs, prompts):
        assert [t for o in outs[r.rid] for t in o.token_ids] == alone(p, r.params.max_tokens)
    mixed = [(nd, q, t) for nd, q, t in plans if nd and len(q) > nd]
    assert mixed and all(sum(q[nd:]) <= 22 - 0.4 * nd for nd, q, _ in mixed)
    assert all(t <= 6.5e-3 + 1e-12 for _, _, t in mixed)
    assert any(sum(q[nd:]) >= 20 for nd, q, _ in mixed)          # the floor bound them
    # A request's own floor needs a model; without one it is an error output.
    eng2 = engine(prog)
    out = eng2.add(AddRequest("x", (1, 2, 3), greedy(2), decode_floor_tps=70.0))
    assert out is not None and "no step-time model" in out.error


def test_engine_profiles_a_model_on_start_up(prog):  # noqa: F811
    eng = engine(prog, decode_floor_tps=5.0)
    assert eng.step_model is not None and len(eng.step_samples) >= 4
    for s in eng.step_samples:
        assert eng.step_model.predict(s.decode_context, s.chunks) >= s.seconds * (1 - 1e-9)
    assert eng.steps_run == 0 and eng.eager_steps == 0

