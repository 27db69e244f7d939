"""The engine loop on one rank (a compiled tiny Llama, dummy weights): batched greedy
outputs equal each request run alone on the offline reference path, also through prefix
hits, chunked prefill and preemption under a tiny KV pool; aborts free KV; bad requests get
error outputs and the engine keeps going."""
from __future__ import annotations

import pytest

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.runtime import load_model
from tscompile.runtime.cuda_graphs import (
    MAX_PREFILL_SEQS, Bucket, StepGraphs, bucket_sizes, plan_bucket, prefill_bucket_sizes,
)
from tscompile.runtime.step_io import StepInputs
from tscompile.kernels import build_metadata
from tscompile.runtime.engine import Engine, EngineConfig
from tscompile.runtime.offline import PagedRunner, generate
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import AddRequest, SamplingParams

SEED = 3


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    return build("llama", preset="tiny", mesh=Mesh.build(1)).save(
        tmp_path_factory.mktemp("e") / "llama.tsprog")


@pytest.fixture(scope="module")
def alone():
    model, _ = load_model("llama", preset="tiny", dummy_weights=True, seed=SEED)

    def run(prompt, n):
        runner = PagedRunner(model, page_size=4, num_blocks=64)
        return generate(runner, list(prompt), greedy(n))
    return run


def engine(prog, **kw) -> Engine:
    cfg = EngineConfig(**{"page_size": 4, "max_num_seqs": 4, "max_num_batched_tokens": 16,
                          "kv_cache_tokens": 256, **kw})
    program = RankProgram(prog, 0, dummy_seed=SEED)
    return Engine(program, cfg, vocab_size=256, max_position_embeddings=512)


def run_all(eng: Engine, reqs: list[AddRequest]) -> dict[str, list]:
    out: dict[str, list] = {r.rid: [] for r in reqs}
    for r in reqs:
        assert eng.add(r) is None
    for _ in range(1000):
        if not eng.has_work:
            break
        for o in eng.step():
            out.setdefault(o.rid, []).append(o)
    assert not eng.has_work
    return out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


PROMPTS = [list(range(3, 3 + k)) + [40 + k] * (k % 3) for k in (5, 9, 13, 17, 22, 30)]


@pytest.mark.parametrize("kv_tokens", [256, 40])      # 40 tokens: preemption happens
def test_batched_greedy_equals_each_request_alone(prog, alone, kv_tokens):
    eng = engine(prog, kv_cache_tokens=kv_tokens)
    reqs = [AddRequest(f"r{i}", tuple(p), greedy(6 + i)) for i, p in enumerate(PROMPTS)]
    outs = run_all(eng, reqs)
    for r, p in zip(reqs, PROMPTS):
        tokens = [t for o in outs[r.rid] for t in o.token_ids]
        assert tokens == alone(p, r.params.max_tokens), r.rid
        assert outs[r.rid][-1].finish_reason == "length"
    stats = eng.stats()
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0
    if kv_tokens == 40:
        assert stats.preemptions > 0
    eng.sched.check_invariants()


def test_capped_mixed_steps_keep_outputs(prog, alone):
    """--max-tokens-with-decodes 5: long prompts prefill in small chunks next to decodes;
    every request's greedy tokens are still its tokens alone."""
    eng = engine(prog, max_tokens_with_decodes=5)
    reqs = [AddRequest(f"r{i}", tuple(p), greedy(5 + i)) for i, p in enumerate(PROMPTS)]
    outs = run_all(eng, reqs)
    for r, p in zip(reqs, PROMPTS):
        assert [t for o in outs[r.rid] for t in o.token_ids] == alone(p, r.params.max_tokens)


def test_prefix_hit_reports_cached_tokens_and_keeps_outputs(prog, alone):
    eng = engine(prog)
    shared = list(range(10, 30))
    first = run_all(eng, [AddRequest("a", tuple(shared + [1, 2]), greedy(3))])
    second = run_all(eng, [AddRequest("b", tuple(shared + [5, 6, 7]), greedy(3))])
    assert first["a"][-1].cached_tokens == 0
    assert second["b"][-1].cached_tokens == 20          # 5 full pages of 4
    assert [t for o in second["b"] for t in o.token_ids] == alone(shared + [5, 6, 7], 3)


def test_abort_frees_kv_and_errors_do_not_stop_the_engine(prog):
    eng = engine(prog)
    assert eng.add(AddRequest("x", (1, 2, 3), greedy(50))) is None
    eng.step()
    eng.step()
    assert eng.stats().kv_blocks_used > 0
    out = eng.abort("x")
    assert out.finish_reason == "abort" and eng.abort("x") is None     # benign race
    assert eng.stats().kv_blocks_used == 0 and not eng.has_work
    bad = eng.add(AddRequest("y", (1, 999), greedy(2)))
    assert bad.finish_reason == "error" and "999 outside the vocabulary" in bad.error
    bad_stop = eng.add(AddRequest("y2", (1, 2), SamplingParams(max_tokens=2,
                                                                stop_token_ids=(256,))))
    assert "stop token id 256 outside the vocabulary [0, 256)" in bad_stop.error
    bad_bias = eng.add(AddRequest("y3", (1, 2), SamplingParams(max_tokens=2,
                                                                logit_bias=((300, 1.0),))))
    assert "logit_bias token id 300 outside the vocabulary" in bad_bias.error
    long = eng.add(AddRequest("z", tuple([1] * 600), greedy(2)))
    assert "does not fit max_model_len 512" in long.error
    assert eng.add(AddRequest("w", (1, 2), greedy(2))) is None
    assert "already running" in eng.add(AddRequest("w", (1, 2), greedy(2))).error
    outs = run_all(eng, [])
    assert not eng.has_work and outs["w"][-1].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_independent(prog):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    alone = run_all(engine(prog), [AddRequest("s", (5, 6, 7), params)])
    batch = run_all(engine(prog), [AddRequest("o1", (9, 9, 9, 9), greedy(5)),
                                   AddRequest("s", (5, 6, 7), params),
                                   AddRequest("o2", (1,), SamplingParams(max_tokens=3))])
    assert [o.token_ids for o in alone["s"]] == [o.token_ids for o in batch["s"]]


def test_logprobs_and_stop_tokens(prog):
    eng = engine(prog)
    probe = run_all(eng, [AddRequest("p", (4, 5, 6), greedy(4))])
    tokens = [o.token_ids[0] for o in probe["p"]]
    stop = tokens[2]
    params = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop,),
                            logprobs=True, top_logprobs=3)
    outs = run_all(eng, [AddRequest("q", (4, 5, 6), params)])["q"]
    assert len(outs) == tokens.index(stop) + 1 and outs[-1].finish_reason == "stop"
    lp = outs[0].logprobs[0]
    assert lp.token_id == outs[0].token_ids[0] and len(lp.top) == 3
    assert lp.top[0][0] == lp.token_id and lp.logprob <= 0


def test_bucket_sizes():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(3) == (1, 2, 3)
    assert bucket_sizes(40) == (1, 2, 4, 8, 16, 24, 32, 40)
    assert bucket_sizes(256)[-4:] == (160, 192, 224, 256)
    with pytest.raises(ValueError, match="batch size"):
        bucket_sizes(0)


def test_prefill_bucket_sizes_and_config():
    assert prefill_bucket_sizes(16) == (16,)
    assert prefill_bucket_sizes(100) == (16, 32, 64, 100)
    assert prefill_bucket_sizes(4096)[-3:] == (1024, 2048, 4096)
    assert EngineConfig(max_num_batched_tokens=512).prefill_buckets(8192) == (
        16, 32, 64, 128, 256, 512)
    assert EngineConfig(max_num_batched_tokens=8192).prefill_buckets(8192)[-1] == 4096
    assert EngineConfig(max_num_batched_tokens=512).prefill_buckets(100) == (16, 32, 64)
    assert EngineConfig(graph_prefill_tokens=(64, 8, 64)).prefill_buckets(512) == (8, 64)
    assert EngineConfig(graph_prefill_tokens=()).prefill_buckets(512) == ()
    with pytest.raises(ValueError, match="graph-prefill-buckets"):
        EngineConfig(graph_prefill_tokens=(0, 16))


def _step(query_lens, seq_lens, page=4, sample=None):
    tables = [list(range(-(-n // page))) for n in seq_lens]
    meta = build_metadata(query_lens, seq_lens, tables, page)
    if sample is not None:
        meta = type(meta)(meta.query_start_loc, meta.seq_lens, meta.block_tables,
                          meta.slot_mapping, meta.logits_indices[sample], meta.num_decodes)
    import torch
    t = sum(query_lens)
    return StepInputs(torch.arange(t) % 200, torch.zeros(t, dtype=torch.int64), meta)


def test_plan_bucket_picks_the_smallest_bucket_or_says_why_not():
    dec, pre = (1, 2, 4, 8), (16, 32, 64)
    assert plan_bucket(_step([1] * 3, [5, 9, 2]), dec, pre, 128) == (Bucket(4, 0), "")
    assert plan_bucket(_step([1, 1, 7], [5, 9, 20]), dec, pre, 128) == (Bucket(2, 16), "")
    assert plan_bucket(_step([1, 16], [5, 40]), dec, pre, 128) == (Bucket(1, 16), "")
    assert plan_bucket(_step([17], [17]), dec, pre, 128) == (Bucket(0, 32), "")
    b, why = plan_bucket(_step([1] * 9, [3] * 9), dec, pre, 128)
    assert b is None and "9 decodes > the largest decode bucket 8" in why
    b, why = plan_bucket(_step([1, 65], [2, 70]), dec, pre, 128)
    assert b is None and "65 prefill tokens > the largest prefill bucket 64" in why
    b, why = plan_bucket(_step([1, 3], [2, 70]), dec, (), 128)
    assert b is None and "decode graphs only" in why
    b, why = plan_bucket(_step([1, 5], [2, 700]), dec, pre, 128)
    assert b is None and "wider than the graphs' 128" in why
    # Eight chunks fill the slots exactly (32 tokens, no padding chunk); with padding they
    # need a ninth slot.
    full = [4] * MAX_PREFILL_SEQS
    assert plan_bucket(_step(full, [9] * MAX_PREFILL_SEQS), dec, pre, 128)[0] == Bucket(0, 32)
    b, why = plan_bucket(_step([3] + full[1:], [9] * MAX_PREFILL_SEQS), dec, pre, 128)
    assert b is None and "chunk slots" in why


def test_mixed_bucket_layout_pads_into_the_scratch_block():
    """The static buffers of a mixed step: decodes, padding decodes, the chunks, one padding
    chunk of the remaining tokens and empty sequences; padding reads and writes only the
    scratch block; the sampled rows map back to the step's sequences."""
    import torch

    calls = []

    def forward(ids, pos, meta):
        calls.append((ids.clone(), pos.clone(), meta))
        return torch.arange(meta.num_seqs, dtype=torch.float32)[:, None].repeat(1, 3)

    g = StepGraphs(forward, max_batch=4, max_blocks=32, page_size=4, scratch_block=99,
                   device="cpu", sizes=(2, 4), prefill_sizes=(8, 16), capture=False)
    # 1 decode (context 5), a 3-token chunk that samples (context 7), a 4-token chunk that
    # does not (context 10): 8 tokens, bucket (2 decodes, 8 prefill tokens).
    step = _step([1, 3, 4], [5, 7, 10], sample=[0, 1])
    assert g.bucket(step) == (Bucket(2, 8), "")
    logits = g(step)
    ids, pos, m = calls[-1]
    s = 2 + MAX_PREFILL_SEQS
    assert m.num_decodes == 2 and m.num_seqs == s and ids.numel() == 10
    assert m.query_start_loc.tolist() == [0, 1, 2, 5, 9, 10] + [10] * (s - 5)
    assert m.seq_lens.tolist() == [5, 1, 7, 10, 1] + [0] * (s - 5)
    assert m.block_tables[1, 0] == 99 and (m.block_tables[4, :1] == 99).all()
    assert m.block_tables[0, :2].tolist() == step.meta.block_tables[0, :2].tolist()
    assert m.block_tables[3, :3].tolist() == step.meta.block_tables[2, :3].tolist()
    # Padding tokens (the decode row 1 and the chunk's last token) write the scratch block.
    assert m.slot_mapping[1] == 99 * 4 and m.slot_mapping[9] // 4 == 99
    assert m.slot_mapping[[0, 2, 3, 4, 5, 6, 7, 8]].tolist() == step.meta.slot_mapping.tolist()
    assert ids[[0, 2, 3, 4, 5, 6, 7, 8]].tolist() == step.input_ids.tolist()
    assert m.logits_indices[:5].tolist() == [0, 1, 4, 8, 9]
    # Sampled: the decode (bucket row 0) and the first chunk (bucket row 2).
    assert logits[:, 0].tolist() == [0.0, 2.0]
    assert g.replays == 1


def test_verify_bucket_returns_every_draft_position():
    """A speculative step (a plain decode, then two verify rows of 1 + 2 and 1 + 3 tokens
    whose every position is a logits row) replays a verify bucket: logits for every bucket
    token, the step's rows picked by token position; without verify buckets it is refused,
    naming why."""
    import torch

    from tscompile.kernels import AttentionMetadata

    def forward(ids, pos, meta):
        assert meta.logits_indices.numel() == ids.numel()      # every token a logits row
        return ids.float()[meta.logits_indices][:, None].repeat(1, 3)

    g = StepGraphs(forward, max_batch=4, max_blocks=32, page_size=4, scratch_block=99,
                   device="cpu", sizes=(2, 4), prefill_sizes=(8, 16), verify_tokens=8,
                   capture=False)
    base = _step([1, 3, 4], [5, 7, 10])
    m = base.meta
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])             # all 8 tokens sampled
    step = StepInputs(torch.arange(100, 108), base.positions,
                      AttentionMetadata(m.query_start_loc, m.seq_lens, m.block_tables,
                                        m.slot_mapping, rows, m.num_decodes))
    b, why = g.bucket(step)
    assert b == Bucket(2, 8, all_logits=True, chunk_slots=MAX_PREFILL_SEQS) and not why
    logits = g(step)
    # Bucket tokens: decode 0, a padding decode, then the verify rows' 7 tokens: the step's
    # rows come back in order, the padding decode skipped.
    assert logits[:, 0].tolist() == [float(x) for x in range(100, 108)]
    assert g.verify_replays == 1 and g.replays == 1
    plain = StepGraphs(forward, max_batch=4, max_blocks=32, page_size=4, scratch_block=99,
                       device="cpu", sizes=(2, 4), prefill_sizes=(8, 16), capture=False)
    b, why = plain.bucket(step)
    assert b is None and "verify rows" in why


@pytest.mark.parametrize("kv_tokens", [256, 40])
def test_padded_mixed_buckets_keep_outputs(prog, alone, kv_tokens):
    """The mixed-step graph path without a GPU: every step, chunked prefills next to decodes
    and prefills alone included, runs padded into a (decodes, prefill tokens) bucket on the
    static buffers; the tokens equal each request alone, nothing runs eagerly, and the
    scheduler's pool ends empty (padding touched only the scratch block)."""
    eng = engine(prog, kv_cache_tokens=kv_tokens)
    eng.graphs = StepGraphs(eng.program, max_batch=4, max_blocks=512 // 4, page_size=4,
                            scratch_block=eng.num_blocks, device="cpu", sizes=(1, 2, 4),
                            prefill_sizes=(4, 8, 16), capture=False)
    reqs = [AddRequest(f"r{i}", tuple(p), greedy(6 + i)) for i, p in enumerate(PROMPTS)]
    outs = run_all(eng, reqs)
    for r, p in zip(reqs, PROMPTS):
        assert [t for o in outs[r.rid] for t in o.token_ids] == alone(p, r.params.max_tokens)
    assert eng.eager_steps == 0 and eng.graphs.replays == eng.steps_run > 0
    assert eng.stats().kv_blocks_used == 0
    eng.sched.check_invariants()


def test_idle_steps_of_every_bucket_run_and_touch_only_the_scratch_block(prog):
    """What capture runs, without a GPU: every bucket filled as a step of padding only (no
    real token) runs the real program; the pool's blocks are untouched, the scratch block
    is written, and the logits buffer holds a row per bucket sequence."""
    import torch

    eng = engine(prog)
    g = StepGraphs(eng.program, max_batch=4, max_blocks=512 // 4, page_size=4,
                   scratch_block=eng.num_blocks, device="cpu", sizes=(1, 4),
                   prefill_sizes=(4, 16), capture=False)
    for c in eng.program.caches:
        c.zero_()
    for b in g.buckets:
        g._fill_idle(b)
        out = g._run(b)
        assert out.shape[0] == b.num_seqs and torch.isfinite(out).all(), b
    cache = eng.program.caches[0]
    assert cache[:, : eng.num_blocks].abs().sum() == 0 and cache[:, eng.num_blocks].abs().sum() > 0
    assert len(g.buckets) == 2 + 3 * 2


@pytest.mark.parametrize("kv_tokens", [256, 40])
def test_padded_decode_buckets_touch_only_the_scratch_block(prog, alone, kv_tokens):
    """The CUDA-graph input path without a GPU: decode steps of 1-3 sequences run padded to
    a bucket of 4 or 8 on the static buffers; padding reads and writes only the scratch block
    beyond the scheduler's pool, so the tokens equal each request alone."""
    eng = engine(prog, kv_cache_tokens=kv_tokens)
    eng.graphs = StepGraphs(eng.program, max_batch=8, max_blocks=512 // 4, page_size=4,
                            scratch_block=eng.num_blocks, device="cpu", sizes=(4, 8),
                            capture=False)
    assert eng.program.caches[0].shape[1] == eng.num_blocks + 1      # [2, NB + 1, PS, ...]
    reqs = [AddRequest(f"r{i}", tuple(p), greedy(6 + i)) for i, p in enumerate(PROMPTS[:3])]
    outs = run_all(eng, reqs)
    for r, p in zip(reqs, PROMPTS):
        assert [t for o in outs[r.rid] for t in o.token_ids] == alone(p, r.params.max_tokens)
    assert eng.graphs.replays > 0
    assert eng.program.caches[0][:, eng.num_blocks].abs().sum() > 0   # padding wrote there
    assert eng.stats().kv_blocks_used == 0


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("eager", [True, False])
def test_engine_on_cuda_with_triton_kernels_matches_cpu(prog, alone, eager):
    """The same compiled program on a GPU (fp32, Triton kernels selected by the registry)
    gives the CPU reference path's greedy tokens, batched: eagerly, and with decode steps
    replayed from CUDA graphs (buckets 1, 2, 4: 4 requests finishing at different steps)."""
    import torch

    from tscompile.kernels import REGISTRY

    cfg = EngineConfig(page_size=16, max_num_seqs=4, max_num_batched_tokens=64,
                       kv_cache_tokens=1024, enforce_eager=eager)
    eng = Engine(RankProgram(prog, 0, dummy_seed=SEED, device="cuda"), cfg, vocab_size=256,
                 max_position_embeddings=512, device="cuda")
    assert (eng.graphs is None) == eager
    reqs = [AddRequest(f"g{i}", tuple(p), greedy(8 + 2 * i)) for i, p in enumerate(PROMPTS[:4])]
    outs = run_all(eng, reqs)
    torch.cuda.synchronize()
    for r, p in zip(reqs, PROMPTS):
        assert [t for o in outs[r.rid] for t in o.token_ids] == alone(p, r.params.max_tokens)
    if not eager:
        assert sorted(b.decodes for b in eng.graphs.graphs if not b.prefill) == [1, 2, 4]
        assert eng.graphs.replays >= 8
        # Mixed and prefill buckets (decodes 0, 1, 2, 4 x prefill 16, 32, 64): every step
        # of this run, chunked prompts included, replayed a graph.
        assert sorted({b.prefill for b in eng.graphs.graphs}) == [0, 16, 32, 64]
        assert eng.eager_steps == 0 and eng.stats().eager_steps == 0
    else:
        assert eng.eager_steps == eng.steps_run > 0
    used = {key.split("@")[0]: backend for key, backend in REGISTRY.selections().items()
            if "@cuda" in key}
    assert used.get("gqa_decode") == "triton" and used.get("rms_norm") == "triton", used


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_kv_pool_sized_from_free_memory_after_a_profiled_step(prog, alone):
    """No --kv-cache-tokens on CUDA: a profile step of max_num_batched_tokens measures the
    activation peak, the pool takes the given fraction of what is left, and the temporary
    profile caches are gone (only the pool plus the scratch block remain bound)."""
    import torch

    torch.cuda.empty_cache()              # the profile step empties the cache too
    free = torch.cuda.mem_get_info()[0]
    cfg = EngineConfig(page_size=16, max_num_seqs=4, max_num_batched_tokens=256,
                       kv_memory_fraction=0.02)
    eng = Engine(RankProgram(prog, 0, dummy_seed=SEED, device="cuda"), cfg, vocab_size=256,
                 max_position_embeddings=512, device="cuda")
    per_block = sum(c[:, :1].numel() * c.element_size() for c in eng.program.caches)
    assert 0 < eng.num_blocks * per_block <= 0.02 * free
    assert all(c.shape[1] == eng.num_blocks + 1 for c in eng.program.caches)
    out = run_all(eng, [AddRequest("p", tuple(PROMPTS[2]), greedy(6))])["p"]
    assert [t for o in out for t in o.token_ids] == alone(PROMPTS[2], 6)


def test_direct_ops_and_custom_ops_give_the_same_program_results(prog):
    """The runtime runs the generated program on the kernels' plain bodies
    (`direct_ops()`); through the `torch.ops.tscompile` custom ops (tracing, export) the
    same steps give bit-identical logits and caches."""
    import torch

    from tscompile.kernels import build_metadata

    runs = []
    for custom in (False, True):
        p = RankProgram(prog, 0, dummy_seed=SEED)
        p.bind_kv_caches(16, 4, dtype=torch.float32, device="cpu")
        if custom:
            p._program = p._program_cls(0, p.tensors)           # ops=torch.ops.tscompile
            assert p._program.ops is torch.ops.tscompile
        prompt = PROMPTS[3]
        meta = build_metadata([len(prompt)], [len(prompt)], [[0, 1, 2, 3, 4, 5]], 4)
        first = p(torch.tensor(prompt), torch.arange(len(prompt)), meta)
        meta = build_metadata([1], [len(prompt) + 1], [[0, 1, 2, 3, 4, 5]], 4)
        second = p(first.argmax(-1), torch.tensor([len(prompt)]), meta)
        runs.append((first, second, [c.clone() for c in p.caches]))
    (a1, a2, ca), (b1, b2, cb) = runs
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert all(torch.equal(x, y) for x, y in zip(ca, cb))


@pytest.mark.parametrize("argv,match", [
    (["--max-graph-batch", "64", "--max-num-seqs", "32"], r"--max-graph-batch must be in \[1, "),
    (["--max-graph-batch", "0"], r"--max-graph-batch must be in"),
    (["--kv-memory-fraction", "1.5"], r"--kv-memory-fraction must be in \(0, 1\)"),
    (["--session-ttl", "-1"], "--session-ttl must be >= 0"),
    (["--shutdown-grace", "-1"], "--shutdown-grace must be >= 0"),
    (["--max-tokens-with-decodes", "600"], r"--max-tokens-with-decodes must be in \[1, "),
    (["--device", "cuda"], "no CUDA device") if not __import__("torch").cuda.is_available()
    else (["--page-size", "0"], "must be positive"),
])
def test_tsrun_flags_are_validated_with_the_flag_named(argv, match):
    from tscompile.runtime.cli import parse

    with pytest.raises(ValueError, match=match):
        parse(["prog.tsprog", "--dummy-weights", *argv])


def test_fp8_kv_cache_engine_equals_the_offline_path_on_an_fp8_cache(prog):
    """--kv-cache-dtype fp8: the pool is e4m3; batched greedy tokens (with chunked prefill
    and preemption) equal each request alone on the offline reference path whose cache is
    e4m3 too."""
    import torch

    model, _ = load_model("llama", preset="tiny", dummy_weights=True, seed=SEED)
    eng = engine(prog, kv_cache_dtype="fp8", kv_cache_tokens=40)
    assert all(c.dtype == torch.float8_e4m3fn for c in eng.program.caches)
    reqs = [AddRequest(f"r{i}", tuple(p), greedy(6 + i)) for i, p in enumerate(PROMPTS[:4])]
    outs = run_all(eng, reqs)
    for r, p in zip(reqs, PROMPTS):
        runner = PagedRunner(model, page_size=4, num_blocks=64, dtype=torch.float8_e4m3fn)
        want = generate(runner, list(p), greedy(r.params.max_tokens))
        assert [t for o in outs[r.rid] for t in o.token_ids] == want, r.rid
    assert eng.stats().preemptions > 0
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of"):
        EngineConfig(kv_cache_dtype="int4")


def test_a_failed_forward_leaves_nothing_in_the_prefix_cache(prog, alone, monkeypatch):
    """The failed chunk's pages were never written: a later request with the same prompt
    must miss the cache and get the reference tokens (it used to hit 16 poisoned tokens)."""
    import tscompile.runtime.engine as engine_mod
    calls = {"n": 0}
    real = engine_mod.run_step

    def first_fails(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected forward failure")
        return real(*args, **kw)
    monkeypatch.setattr(engine_mod, "run_step", first_fails)
    eng = engine(prog)                                   # page 4, 16 tokens per step
    prompt = list(range(20, 40))                         # 20 tokens: the first chunk is 16
    failed = run_all(eng, [AddRequest("bad", tuple(prompt), greedy(4))])["bad"]
    assert [o.finish_reason for o in failed] == ["error"]
    assert "injected forward failure" in failed[0].error
    assert eng.stats().kv_blocks_used == 0
    eng.sched.check_invariants()
    again = run_all(eng, [AddRequest("good", tuple(prompt), greedy(4))])["good"]
    assert again[-1].cached_tokens == 0
    assert [t for o in again for t in o.token_ids] == alone(prompt, 4)
    assert calls["n"] > 1


def test_a_failed_step_fails_only_its_requests(prog, alone, monkeypatch):
    """A request admitted after the failure, and pages registered before it, are intact."""
    import tscompile.runtime.engine as engine_mod
    real, state = engine_mod.run_step, {"armed": False}

    def maybe_fail(*args, **kw):
        if state["armed"]:
            state["armed"] = False
            raise RuntimeError("injected")
        return real(*args, **kw)
    monkeypatch.setattr(engine_mod, "run_step", maybe_fail)
    eng = engine(prog)
    prompt = list(range(50, 70))
    assert eng.add(AddRequest("a", tuple(prompt), greedy(6))) is None
    eng.step()                                          # the first 16 tokens: 4 pages
    state["armed"] = True
    outs = eng.step()                                   # the last 4 prompt tokens fail
    assert [(o.rid, o.finish_reason) for o in outs] == [("a", "error")]
    b = run_all(eng, [AddRequest("b", tuple(prompt), greedy(6))])["b"]
    assert b[-1].cached_tokens == 16                    # the pages of the good step only
    assert [t for o in b for t in o.token_ids] == alone(prompt, 6)


def test_start_up_selects_and_logs_the_kernel_of_every_op(prog, monkeypatch, caplog):
    """Before any request, the warm-up step has selected both the decode and the prefill
    attention kernels, and the start-up log names each op's backend."""
    from tscompile.kernels import REGISTRY
    monkeypatch.setattr(REGISTRY, "_chosen", {})       # forget earlier tests' selections
    with caplog.at_level("INFO", logger="tscompile.runtime.kv_cache"):
        engine(prog)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels:"))
    for op in ("gqa_decode", "gqa_prefill", "rms_norm", "rope", "silu_and_mul"):
        assert f"{op}@cpu/float32=reference" in line, line


def test_offline_generation_refuses_what_it_cannot_apply():
    """The offline path takes the serving SamplingParams; a penalty or logprobs it would not
    apply is an error, not ignored."""
    model, _ = load_model("llama", preset="tiny", dummy_weights=True, seed=SEED)
    runner = PagedRunner(model, page_size=4, num_blocks=16)
    for bad in (dict(presence_penalty=0.5), dict(repetition_penalty=1.2),
                dict(logprobs=True), dict(logit_bias=((1, 5.0),))):
        with pytest.raises(ValueError, match=f"does not apply {next(iter(bad))}"):
            generate(runner, [1, 2, 3], SamplingParams(max_tokens=2, **bad))
    seeded = SamplingParams(max_tokens=5, temperature=1.0, seed=7)
    assert generate(runner, [1, 2, 3], seeded) == generate(runner, [1, 2, 3], seeded)
