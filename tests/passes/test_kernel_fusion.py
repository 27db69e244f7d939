"""Per-rank kernel fusions (passes/fuse_kernels.py, passes/pack_linears.py): the structure
they produce, that the compiled program computes the same logits with and without them
(and as transformers does, through the models' parity tests), and the runtime's packing."""
from __future__ import annotations

import collections

import pytest
import torch

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.runtime.distributed import StepsJob, run_steps
from tscompile.runtime.program import RankProgram, pack_tensors


def _ops(built) -> collections.Counter:
    return collections.Counter(
        getattr(n.target, "__name__", str(n.target)) for n in built.stage.gm.graph.nodes
        if n.op == "call_function")


def test_qwen3_layer_is_one_qkv_matmul_and_fused_norms():
    built = build("qwen3", preset="tiny", mesh=Mesh.build(1))
    ops, layers = _ops(built), 2
    # Per layer: q/k/v as one linear (+ o, gate_up, down; + the LM head).
    assert ops["linear"] == 4 * layers + 1
    assert ops["narrow"] == 3 * layers
    assert ops["rms_norm_rope.default"] == 2 * layers and ops["rope.default"] == 0
    # Every residual add feeds a norm except the last layer's (its user is the logits
    # gather): 2 per layer - 1 fused; the first input norm and the final norm stay plain.
    assert ops["fused_add_rms_norm.default"] == 2 * layers - 1
    assert ops["rms_norm.default"] == 2 and ops["add"] == 1
    assert built.manifest["fused_kernels"] == {"add_rms_norm": 3, "rms_norm_rope": 4}
    packed = built.manifest["packed"]
    assert packed["layers.0.self_attn.q_proj+k_proj+v_proj.weight"] == {
        "parts": ["layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
                  "layers.0.self_attn.v_proj.weight"], "dim": 0}
    assert len(packed) == layers


def test_mla_packs_query_and_latent_projections_only_when_placed_alike():
    # Query LoRA (Kimi / DeepSeek-V3): q_a_proj and the latent projection are both
    # replicated under attention TP, so they pack at every degree.
    for tp in (1, 2):
        packed = build("kimi_k25", preset="tiny", mesh=Mesh.build(tp)).manifest["packed"]
        assert packed["layers.0.self_attn.q_a_proj+kv_a_proj_with_mqa.weight"]["parts"] == [
            "layers.0.self_attn.q_a_proj.weight", "layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    # No query LoRA (DeepSeek-V2-Lite): q_proj is head-sharded at TP 2, the latent one is
    # replicated; stacking their slices would mix placements, so they stay apart.
    lite = {tp: build("kimi_k25", preset="deepseek-v2-lite", mesh=Mesh.build(tp))
            .manifest["packed"] for tp in (1, 2)}
    assert "layers.3.self_attn.q_proj+kv_a_proj_with_mqa.weight" in lite[1]
    assert len(lite[1]) == 27 and lite[2] == {}


def test_fusion_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("TSCOMPILE_NO_KERNEL_FUSION", "1")
    built = build("qwen3", preset="tiny", mesh=Mesh.build(1))
    ops = _ops(built)
    assert built.manifest["packed"] == {} and ops["narrow"] == 0
    assert ops["rope.default"] == 4 and ops["fused_add_rms_norm.default"] == 0


@pytest.mark.parametrize("model,preset,tp", [("qwen3", "tiny", 1), ("qwen3", "tiny", 2),
                                             ("kimi_k25", "tiny", 1)])
def test_fused_program_computes_the_unfused_logits(model, preset, tp, tmp_path, monkeypatch):
    fused = build(model, preset=preset, mesh=Mesh.build(tp)).save(tmp_path / "fused.tsprog")
    monkeypatch.setenv("TSCOMPILE_NO_KERNEL_FUSION", "1")
    plain = build(model, preset=preset, mesh=Mesh.build(tp)).save(tmp_path / "plain.tsprog")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (9,), generator=g).tolist()
    feeds = [[(0, prompt)]] + [[(0, [t])] for t in (5, 17, 3)]
    a, b = [torch.cat(o) for o in run_steps(
        [StepsJob(str(fused), feeds, dummy_seed=1), StepsJob(str(plain), feeds, dummy_seed=1)])]
    # Same math; only the packed matmul's shape (so its summation blocking) differs.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rank_program_holds_packs_not_parts(tmp_path):
    prog = build("qwen3", preset="tiny", mesh=Mesh.build(1)).save(tmp_path / "q.tsprog")
    rp = RankProgram(prog, 0, dummy_seed=3)
    q, k, v = (f"layers.1.self_attn.{x}_proj.weight" for x in "qkv")
    assert not {q, k, v} & set(rp.tensors)
    packed = rp.tensors["layers.1.self_attn.q_proj+k_proj+v_proj.weight"]
    from tscompile.runtime.shards import load_rank_tensors
    parts = load_rank_tensors({n: rp.plans[n] for n in (q, k, v)}, 0, 1, dummy_seed=3,
                              dtype=torch.float32, device="cpu")
    assert torch.equal(packed, torch.cat([parts[q], parts[k], parts[v]]))


def test_a_missing_part_is_named():
    with pytest.raises(ValueError, match=r"packed tensor p\.w\+v needs \['b'\]"):
        pack_tensors({"a": torch.ones(1)}, {"p.w+v": {"parts": ["a", "b"], "dim": 0}})
