"""The roofline ceiling of the agentic benchmark (benchmarks/agentic/ceiling.py, issue 15
item 6): the formula on a dense toy card with hand-computed numbers, the MoE expert count,
the memory bound, the fractions of the ceiling (the floor never reached included), the
readers (presets, a .tsprog, workload files, roof JSONs), the sweep's summary block and the
Pareto plot's dashed ceiling. All on the CPU, no server."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from benchmarks.agentic import ceiling as CE
from benchmarks.agentic import client as C
from benchmarks.agentic import metrics as M
from benchmarks.agentic import plot as P
from benchmarks.agentic import sweep as S
from benchmarks.agentic.__main__ import main
from benchmarks.agentic.client import RequestRecord
from benchmarks.agentic.workload import Session, Turn
from tscompile.annotations import Mesh
from tscompile.build import build

PNG = b"\x89PNG\r\n\x1a\n"

# The dense toy: 1 GB of weights over 1 TB/s (1 ms a step), 1 KB of KV per token at a
# 100K-token context (0.1 ms per user), 1 PFLOP/s; prefill 1.05 GFLOP a token (2 x 0.5e9
# params + 1e3 FLOPs x a 5e4-token prefix), 100 uncached tokens per output token:
# t_pre = 100 x 1.05e9 / 1e15 = 0.105 ms per output token.
TOY = CE.ModelStats(name="toy", dense_step_bytes=1e9, kv_bytes_per_token=1e3,
                    decode_matmul_params=5e8, prefill_matmul_params=5e8,
                    attn_decode_flops_per_pos=1e3, attn_prefill_flops_per_pos=1e3,
                    weight_bytes_total=2e9)
WORK = CE.WorkloadStats(sessions=1, requests=1, output_tokens=10, uncached_tokens=1000,
                        ctx=1e5, uncached_per_output=100.0, prefix_mean=5e4)
ROOFS = CE.Roofs(bw=1e12, flops=1e15)
CARD = CE.Card(bw=1e12, flops=1e15, pool_tokens=None)


def test_dense_toy_against_hand_numbers():
    # F = 100: 1 + 0.1 N <= 10 ms -> N* = 90 exactly; decode flops 90 x 1.1e9 / 1e15 = 0.1 ms
    assert CE.prefill_flops_per_token(TOY, WORK) == pytest.approx(1.05e9)
    p = CE.at(TOY, WORK, CARD, 100.0)
    assert p["n_star"] == pytest.approx(90.0, rel=1e-9) and p["n_max"] == 90
    assert p["binds"] == "decode bytes" and p["step_ms"] == pytest.approx(10.0)
    assert p["prefill_ms_per_output"] == pytest.approx(0.105)
    # 90 tokens per 10 ms step plus 90 x 0.105 ms of prefill
    assert p["output_tpm_per_gpu"] == pytest.approx(60 * 90 / (0.010 + 90 * 0.105e-3))
    assert p["output_tpm_per_gpu"] == pytest.approx(277_634.96, rel=1e-6)
    # interleaved: 1 + N (0.1 + 0.105) <= 10 ms -> N = 9 / 0.205 = 43.90..., 60 F N
    assert p["interleaved_n"] == pytest.approx(9 / 0.205)
    assert p["interleaved_tpm_per_gpu"] == pytest.approx(60 * 100 * 9 / 0.205)
    assert p["interleaved_tpm_per_gpu"] < p["output_tpm_per_gpu"]
    # F = 500: (2 - 1) / 0.1 = 10 users
    assert CE.at(TOY, WORK, CARD, 500.0)["n_star"] == pytest.approx(10.0)
    # above F_max = 1 / 1.1 ms = 909.09 TPS/user even one user is too slow
    assert CE.max_tps_user(TOY, WORK, CARD) == pytest.approx(1 / 1.1e-3)
    one = CE.at(TOY, WORK, CARD, 1 / 1.1e-3)
    assert one["n_star"] == pytest.approx(1.0) and one["output_tpm_per_gpu"] > 0
    zero = CE.at(TOY, WORK, CARD, 1000.0)
    assert zero["output_tpm_per_gpu"] == 0 and zero["binds"].startswith("one user")
    # two GPUs of one model copy: twice the roofs, the TPM divided by 2
    two = CE.at(TOY, WORK, CE.Card(2e12, 2e15, None, gpus=2), 100.0)
    assert two["n_star"] == pytest.approx(190.0)          # 0.5 + 0.05 N <= 10 ms
    assert two["output_tpm_per_gpu"] == pytest.approx(
        60 * 190 / (0.010 + 190 * 0.0525e-3) / 2)


def test_decode_flops_bind_when_the_step_is_compute_bound():
    heavy = CE.ModelStats(**{**asdict(TOY), "decode_matmul_params": 5e11, "moe": ()})
    # per user 2 x 5e11 + 1e3 x 1e5 = 1.0001e12 FLOPs: 1.0001 ms over 1e15, more than bytes
    p = CE.at(heavy, WORK, CARD, 100.0)
    assert p["binds"] == "decode flops"
    assert p["n_star"] == pytest.approx(0.010 * 1e15 / 1.0001e12, rel=1e-9)


def test_curve_holds_the_floors_and_stops_at_fmax():
    pts = CE.curve(TOY, WORK, CARD, floors=(70.0, 1000.0), step=100.0)
    fs = [p["tps_user"] for p in pts]
    assert fs == sorted(fs) and 70.0 in fs and 1000.0 in fs
    assert fs[:2] == [70.0, 100.0] and 900.0 in fs
    assert any(f == pytest.approx(1 / 1.1e-3) for f in fs)
    tpm = [p["output_tpm_per_gpu"] for p in pts]
    assert all(a >= b for a, b in zip(tpm, tpm[1:]))       # falls as the floor rises
    assert tpm[-1] == 0.0 and tpm[-2] > 0
    # the default grid: every 10 TPS/user up to F_max = 909 (over 100 points at 5)
    fs = [p["tps_user"] for p in CE.curve(TOY, WORK, CARD)]
    assert len(fs) == 90 + 1 and fs[:2] == [10.0, 20.0]       # 70 and 200 on the grid


def test_moe_expert_count_and_touched_weights():
    assert CE.expected_experts(64, 6, 1) == pytest.approx(6.0)
    assert CE.expected_experts(64, 6, 2) == pytest.approx(64 * (1 - (58 / 64) ** 2))
    assert CE.expected_experts(64, 6, 2) == pytest.approx(11.4375)
    assert CE.expected_experts(64, 6, 0) == 0.0
    assert CE.expected_experts(64, 6, 1000) == pytest.approx(64.0)
    with pytest.raises(ValueError, match="top_k"):
        CE.expected_experts(8, 9, 1)
    # against sampling: N tokens, each k distinct experts of E uniformly
    rng = np.random.default_rng(0)
    e, k, n, trials = 64, 6, 8, 4000
    seen = [len({x for _ in range(n) for x in rng.choice(e, k, replace=False)})
            for _ in range(trials)]
    assert np.mean(seen) == pytest.approx(CE.expected_experts(e, k, n), rel=0.01)
    moe = CE.ModelStats(**{**asdict(TOY), "moe": (CE.MoELayers(26, 64, 6, 1e7),)})
    assert CE.weight_bytes(moe, 1) == pytest.approx(1e9 + 26 * 1e7 * 6)
    assert CE.weight_bytes(moe, 2) == pytest.approx(1e9 + 26 * 1e7 * 11.4375)
    # the step at 2 users reads 11.4375 experts per layer, not 12: solve by hand at F=100
    t2 = (CE.weight_bytes(moe, 2) + 2 * 1e5 * 1e3) / 1e12
    assert CE.decode_step(moe, WORK, CARD, 2)[0] == pytest.approx(t2)
    p = CE.at(moe, WORK, CARD, 100.0)
    w = CE.weight_bytes(moe, p["n_star"])
    assert (w + p["n_star"] * 1e8) / 1e12 == pytest.approx(0.010, rel=1e-9)
    assert p["n_star"] < 90                                  # the experts cost users


def test_stats_of_presets_by_hand():
    # qwen3 tiny (tied): per layer q 8192 + k 4096 + v 4096 + o 8192 + MLP 3 x 64 x 128
    # + norms 16 + 16 + 64 + 64; 2 layers, embedding 256 x 64 (the LM head), final norm
    m = CE.model_stats("tiny", "qwen3")
    assert m.weight_bytes_total == m.dense_step_bytes == 2 * (2 * 49312 + 16384 + 64)
    assert m.decode_matmul_params == 2 * 49152 + 16384
    assert m.prefill_matmul_params == 2 * 49152               # no LM head in prefill
    assert m.kv_bytes_per_token == 2 * (2 * 2 * 4 * 16)      # 2 layers x K,V x 4 heads x 16
    assert m.attn_decode_flops_per_pos == m.attn_prefill_flops_per_pos == 2 * 4 * 8 * 16
    assert m.moe == ()
    # the MoE preset: layers 1-2 route 2 of 8 experts of (2 x 32 x 64 + 64 x 32) params
    moe = CE.model_stats("tiny-moe", "qwen3")
    assert moe.moe == (CE.MoELayers(2, 8, 2, 2 * (2 * 32 * 64 + 64 * 32)),)
    # untied: the 256 x 64 input embedding is stored but not read in full by a step
    assert moe.weight_bytes_total == moe.dense_step_bytes + 2 * 8 * 12288 + 2 * 256 * 64
    # MLA (kimi tiny: 4 heads, latent 32, rope 8, nope 16, v 16; 3 layers)
    mla = CE.model_stats("tiny", "kimi_k25")
    assert mla.kv_bytes_per_token == 3 * (32 + 8) * 2
    assert mla.attn_decode_flops_per_pos == 3 * 2 * 4 * (2 * 32 + 8)
    assert mla.attn_prefill_flops_per_pos == 3 * 2 * 4 * (16 + 8 + 16)
    # the published sizes: Qwen3-8B 8.19e9 parameters; DeepSeek-V2-Lite 15.7e9, 2.4e9 active
    q8 = CE.model_stats("qwen3-8b")
    assert q8.weight_bytes_total / 2 == pytest.approx(8.19e9, rel=0.01)
    v2 = CE.model_stats("deepseek-v2-lite")
    assert v2.weight_bytes_total / 2 == pytest.approx(15.7e9, rel=0.01)
    assert v2.decode_matmul_params == pytest.approx(2.4e9, rel=0.05)
    with pytest.raises(ValueError, match="model file"):
        CE.model_stats("tiny")                               # tiny is in every file


def test_program_gives_the_preset_stats(tmp_path):
    prog = build("qwen3", preset="tiny-moe", mesh=Mesh.build(1)).save(tmp_path / "t.tsprog")
    a, b = CE.model_stats(program=prog), CE.model_stats("tiny-moe", "qwen3")
    assert asdict(a) | {"source": "", "name": ""} == asdict(b) | {"source": "",
                                                                         "name": ""}
    assert "program" in a.source


def test_memory_bound_binds():
    # a 5e6-token pool holds 50 contexts of 1e5: N* = 50 < 90
    card = CE.Card(1e12, 1e15, pool_tokens=5e6)
    p = CE.at(TOY, WORK, card, 100.0)
    assert p["binds"] == "kv pool" and p["n_star"] == pytest.approx(50.0)
    assert p["step_ms"] == pytest.approx(1.0 + 5.0)          # below the 10 ms budget
    assert p["output_tpm_per_gpu"] == pytest.approx(60 * 50 / (0.006 + 50 * 0.105e-3))
    assert CE.at(TOY, WORK, card, 500.0)["binds"] == "decode bytes"   # 10 users fit
    tiny = CE.at(TOY, WORK, CE.Card(1e12, 1e15, pool_tokens=5e4), 100.0)
    assert tiny["output_tpm_per_gpu"] == 0 and tiny["binds"].startswith("kv pool")
    # the pool from GPU memory: (1 x 6 GB - 2 GB of weights) / 1 KB = 4e6 tokens -> 40 users
    c, run = CE.card_for(TOY, CE.Roofs(1e12, 1e15, memory_bytes=6e9))
    assert c.pool_tokens == pytest.approx(4e6) and "upper bound" in run["kv_pool_from"]
    assert CE.at(TOY, WORK, c, 100.0)["n_star"] == pytest.approx(40.0)
    c, run = CE.card_for(TOY, ROOFS, kv_pool_tokens=7e6)
    assert c.pool_tokens == 7e6 and run["kv_pool_from"].startswith("given")
    c, run = CE.card_for(TOY, ROOFS)
    assert c.pool_tokens is None and "no memory bound" in run["kv_pool_from"]
    with pytest.raises(ValueError, match="do not fit"):
        CE.card_for(TOY, CE.Roofs(1e12, 1e15, memory_bytes=1e9))


def levels(*pts):
    return [{"concurrency": c, "tps_user_mean": x, "output_tpm_per_gpu": y,
             "uncached_prompt_tokens": u, "output_tokens": o} for c, x, y, u, o in pts]


def test_fraction_of_ceiling_and_the_floor_never_reached():
    lv = levels((1, 150.0, 1000.0, 9000, 100), (2, 110.0, 1800.0, 20000, 250),
                (4, 60.0, 3000.0, 30000, 300))
    head = M.headline(lv, (70.0, 200.0, 1000.0))
    b = CE.block(TOY, WORK, ROOFS, floors=(70.0, 200.0, 1000.0), levels=lv, headline=head)
    ceil70 = CE.at(TOY, WORK, CARD, 70.0)["output_tpm_per_gpu"]
    f70 = b["fraction_of_ceiling"]["70"]
    assert f70["measured_tpm_per_gpu"] == pytest.approx(2760.0)     # the headline's figure
    assert f70["ceiling_tpm_per_gpu"] == pytest.approx(ceil70)
    assert f70["fraction"] == pytest.approx(2760.0 / ceil70)
    assert f70["between_concurrency"] == [2, 4] and f70["reason"] is None
    assert f70["fraction_of_interleaved"] > f70["fraction"]
    # the highest level whose TPS/user meets 70 is c=2 (110 TPS/user, 1800)
    assert f70["at_level"]["concurrency"] == 2
    assert f70["at_level"]["fraction"] == pytest.approx(1800.0 / ceil70)
    f200 = b["fraction_of_ceiling"]["200"]
    assert f200["fraction"] is None and f200["ceiling_tpm_per_gpu"] > 0
    assert "does not reach the floor" in f200["reason"] and "150.0" in f200["reason"]
    assert f200["at_level"] is None
    f1000 = b["fraction_of_ceiling"]["1000"]                   # above F_max: ceiling 0
    assert f1000["fraction"] is None and "ceiling is 0" in f1000["reason"]
    assert b["inputs"]["measured_uncached_per_output"] == {"1": 90.0, "2": 80.0, "4": 100.0}
    assert b["inputs"]["from_run"]["copy_Bps"] == 1e12
    assert b["inputs"]["from_workload"]["prefill_flops_per_token"] == pytest.approx(1.05e9)
    text = CE.format_table(b, floors_only=True)
    assert "fraction of ceiling at 70 TPS/user: " + f"{2760.0 / ceil70:.3f}" in text
    assert "at 200 TPS/user: null" in text
    # without a run: every fraction null, with a reason
    alone = CE.block(TOY, WORK, ROOFS)
    assert all(f["fraction"] is None and f["reason"] for f in
               alone["fraction_of_ceiling"].values())
    json.dumps(b)                                             # JSON-clean


def test_workload_stats_by_hand(tmp_path):
    from benchmarks.agentic import workload as W
    # turn 0: 1000-token prompt, 10 out; turn 1: +200 appended (1210 prompt: 1000 + 10 + 200),
    # 20 out
    s = Session("s0", "t", [Turn([], 10, 10, 1000, 1000), Turn([], 20, 20, 200, 1210)])
    w = CE.workload_stats([s])
    assert (w.output_tokens, w.uncached_tokens, w.requests) == (30, 1200, 2)
    assert w.ctx == pytest.approx((10 * (1000 + 4.5) + 20 * (1210 + 9.5)) / 30)
    assert w.uncached_per_output == pytest.approx(40.0)
    # prefixes: turn 0 positions 0..999, turn 1 positions 1010..1209
    pos = list(range(1000)) + list(range(1010, 1210))
    assert w.prefix_mean == pytest.approx(np.mean(pos))
    path = W.save(tmp_path / "wl.jsonl", [s, s])
    assert CE.workload_file_stats(path).ctx == pytest.approx(w.ctx)


def test_roofs_files(tmp_path):
    h = tmp_path / "harness.json"
    h.write_text(json.dumps({"device": "NVIDIA H200", "roofs": {"copy_GBps": 4072.6,
                                                                "bf16_mm_TFLOPs": 785.6}}))
    r = CE.load_roofs(h)
    assert (r.bw, r.flops, r.device) == (4072.6e9, 785.6e12, "NVIDIA H200")
    ours = tmp_path / "roofs.json"
    ours.write_text(json.dumps(CE.roofs_to_json(CE.Roofs(4e12, 8e14, "x", "H", 1.4e11))))
    r = CE.load_roofs(ours)
    assert (r.bw, r.flops, r.memory_bytes) == (4e12, 8e14, 1.4e11)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="no roofs"):
        CE.load_roofs(bad)
    with pytest.raises(ValueError, match="positive"):
        CE.Roofs(0, 1)


def ceiling_summary(label="tsrun"):
    lv = levels((1, 150.0, 1000.0, 9000, 100), (4, 60.0, 3000.0, 30000, 300))
    head = M.headline(lv)
    return {"metadata": {"label": label, "gpus": 1}, "levels": lv, "headline": head,
            "ceiling": CE.block(TOY, WORK, ROOFS, levels=lv, headline=head)}


def test_plot_draws_the_ceiling_dashed_with_the_fractions(tmp_path):
    s = ceiling_summary()
    frac = s["ceiling"]["fraction_of_ceiling"]["70"]["fraction"]
    fig = P.figure([s, {"metadata": {"label": "other"}, "levels": s["levels"]}])
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert "tsrun ceiling" in lines and "other ceiling" not in lines
    ceil = lines["tsrun ceiling"]
    assert ceil.get_linestyle() == "--"
    measured = next(k for k in lines if k.startswith("tsrun (of ceiling"))
    assert f"{100 * frac:.0f}% at 70" in measured and "- at 200" in measured
    assert ceil.get_color() == lines[measured].get_color()
    xs, ys = ceil.get_data()
    top = s["ceiling"]["tps_user_max"]
    assert xs[-1] == pytest.approx(top) and ys[-1] == 0 and max(ys) > 0
    assert fig.axes[0].get_ylim()[1] >= max(ys)              # the ceiling is in view
    path = P.pareto([s], tmp_path / "p.png")
    assert path.read_bytes()[:8] == PNG
    # and through the CLI plot of a summary.json
    (tmp_path / "s.json").write_text(json.dumps(s))
    assert main(["plot", str(tmp_path / "s.json"), "-o", str(tmp_path / "q.png")]) == 0
    assert (tmp_path / "q.png").read_bytes()[:8] == PNG


def test_ceiling_cli(tmp_path, capsys):
    from benchmarks.agentic import workload as W
    s = Session("s0", "t", [Turn([], 10, 10, 1000, 1000), Turn([], 20, 20, 200, 1210)])
    wl = W.save(tmp_path / "wl.jsonl", [s])
    summ = tmp_path / "summary.json"
    summ.write_text(json.dumps(ceiling_summary()))
    out = tmp_path / "with_ceiling.json"
    rc = main(["ceiling", "--preset", "tiny", "--model-file", "qwen3", "--workload", str(wl),
               "--bw", "4.3e12", "--flops", "7.9e14", "--gpu-memory-gib", "1",
               "--summary", str(summ), "--json", str(out), "--plot", str(tmp_path / "c.png")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "TPS/user" in printed and "fraction of ceiling at 70 TPS/user" in printed
    d = json.loads(out.read_text())
    assert d["levels"] and d["ceiling"]["inputs"]["from_model"]["name"] == "qwen3:tiny"
    assert d["ceiling"]["inputs"]["from_run"]["kv_pool_tokens"] == pytest.approx(
        (2**30 - 230144) / 512)
    assert d["ceiling"]["fraction_of_ceiling"]["70"]["fraction"] is not None
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    assert main(["ceiling", "--preset", "tiny", "--workload", str(wl), "--bw", "1e12",
                 "--flops", "1e15"]) == 2                   # which file's tiny?
    assert "model file" in capsys.readouterr().err
    assert main(["ceiling", "--preset", "qwen3-8b", "--workload", str(wl), "--bw",
                 "1e12"]) == 2
    assert "--bw and --flops" in capsys.readouterr().err


def test_sweep_writes_the_ceiling_block(tmp_path, monkeypatch):
    """run_sweep with the client replaced by synthetic records: summary.json gains the block
    computed from the replayed sessions, the headline prints the fraction, the PNG is
    written."""
    sessions = [Session("s0", "t", [Turn([], 10, 10, 1000, 1000),
                                    Turn([], 20, 20, 200, 1210)])]

    def fake_run(cfg, sess, c, *, tag, model, max_turns=None):
        assert sess is sessions
        tpot = 0.01 * c                                      # 100 TPS/user at c=1, 25 at 4
        return [RequestRecord(c, f"s{i}", "t", 0, 10, start=0.0, latency=1.0, ttft=0.1,
                              token_times=[0.1 + tpot * j for j in range(10)],
                              output_tokens=10, prompt_tokens=1000, cached_tokens=0)
                for i in range(c)]
    monkeypatch.setattr(C, "run", fake_run)
    monkeypatch.setattr(S, "server_models", lambda cfg: ["m"])
    monkeypatch.setattr(S, "server_kernels", lambda cfg: None)
    stats = CE.model_stats("tiny", "qwen3")
    spec = S.CeilingSpec(stats, CE.Roofs(1e9, 1e12, "given"), kv_pool_tokens=1e6)
    scfg = S.SweepConfig(out=str(tmp_path / "o"), levels=(1, 4), warmup_sessions=0)
    summary = S.run_sweep(C.ClientConfig(url="http://x"), scfg, sessions, {}, spec)
    disk = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert disk["ceiling"] == json.loads(json.dumps(summary["ceiling"]))
    b = disk["ceiling"]
    assert b["inputs"]["from_workload"]["ctx"] == pytest.approx(
        CE.workload_stats(sessions).ctx)
    assert b["inputs"]["from_run"]["kv_pool_tokens"] == 1e6
    f70 = b["fraction_of_ceiling"]["70"]
    assert f70["measured_tpm_per_gpu"] == pytest.approx(disk["headline"]["70"]
                                                        ["output_tpm_per_gpu"])
    assert f70["fraction"] == pytest.approx(f70["measured_tpm_per_gpu"] /
                                            f70["ceiling_tpm_per_gpu"])
    assert "fraction of ceiling at 70 TPS/user" in S.format_headline(summary)
    assert (tmp_path / "o" / "pareto.png").read_bytes()[:8] == PNG
    # without a spec: a reason, not a block
    plain = S.run_sweep(C.ClientConfig(url="http://x"),
                        S.SweepConfig(out=str(tmp_path / "p"), levels=(1,), warmup_sessions=0),
                        sessions, {})
    assert "not computed" in plain["ceiling"]["reason"]
    # bad ceiling inputs fail before any level runs
    monkeypatch.setattr(C, "run", lambda *a, **k: pytest.fail("a level ran"))
    with pytest.raises(ValueError, match="do not fit"):
        S.run_sweep(C.ClientConfig(url="http://x"), scfg, sessions, {},
                    S.CeilingSpec(stats, CE.Roofs(1e9, 1e12, memory_bytes=1.0)))


def test_roofs_need_cuda_or_numbers(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: `roofs` would measure it")
    assert main(["roofs", "-o", str(tmp_path / "r.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    assert main(["ceiling", "--preset", "qwen3-8b", "--workload", "x.jsonl", "--bw", "1e12",
                 "--flops", "1e15", "--measure-roofs"]) == 2
    assert "one of --roofs" in capsys.readouterr().err
