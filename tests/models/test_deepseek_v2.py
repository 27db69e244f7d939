"""DeepSeek-V2 / V2-Lite through the MLA + MoE model file (models/kimi_k25.py): parity with
transformers' DeepseekV2ForCausalLM (an independent implementation of V2's softmax greedy
routing) on a tiny random checkpoint with the V2-Lite structure, single-device and compiled
at TP2 / EP2 (gloo CPU processes, the checkpoint read slice by slice); config.json parsing;
and the `deepseek-v2-lite` preset's parameter counts."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.kernels import rope_cos_sin_cache
from tscompile.models import kimi_k25
from tscompile.runtime.distributed import StepsJob, run_steps

from .parity import ATOL, check_parity, hf_greedy
from .test_kimi_k25 import VOCAB, _prompt, _randomise

# deepseek-ai/DeepSeek-V2-Lite config.json (the keys that shape the model).
V2_LITE = {
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1,
    "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "aux_loss_alpha": 0.001, "seq_aux": True,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
    "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def hf_v2(tmp_path_factory):
    """V2-Lite in miniature: no query LoRA, softmax greedy top-3 of 8 experts (not
    renormalised, scale 1), 2 shared experts, a dense first layer, YaRN with mscale =
    mscale_all_dim (0.707, as V2-Lite: only the softmax scale changes). The router is
    scaled up so the softmax is far from uniform (which expert wins, and its weight, matter)."""
    cfg = transformers.DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.0, rms_norm_eps=1e-6,
        max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})
    torch.manual_seed(21)
    model = transformers.DeepseekV2ForCausalLM(cfg).eval()
    _randomise(model, 21)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(3.0)
    path = tmp_path_factory.mktemp("deepseek_v2")
    model.save_pretrained(path)
    return model, path


def test_tiny_checkpoint_routes_by_softmax_without_bias(hf_v2):
    _, path = hf_v2
    cfg = kimi_k25.CONFIG.from_hf(json.loads((path / "config.json").read_text()))
    assert (cfg.scoring_func, cfg.n_group, cfg.norm_topk_prob, cfg.q_lora_rank) == (
        "softmax", 1, False, None)
    moe = kimi_k25.MODEL(cfg).layers[1].mlp
    assert moe.scoring == "softmax" and moe.e_score_correction_bias is None


@pytest.mark.parametrize("page_size", [4, 16])
def test_v2_parity(hf_v2, page_size):
    model, path = hf_v2
    check_parity(model, path, "kimi_k25", _prompt(13, 7), page_size=page_size)


def test_v2_parity_chunked_prefill(hf_v2):
    model, path = hf_v2
    # Positions run past YaRN's original 32-token window.
    check_parity(model, path, "kimi_k25", _prompt(21, 8), page_size=4, prefill_chunk=8)


def test_v2_compiled_tp2_and_ep2_match_transformers(hf_v2, tmp_path):
    """The compiled program at TP2 (heads and expert width split) and at attention TP2 +
    MoE EP2 (4 whole experts per rank), loading the HF checkpoint slice by slice: logits
    at every position equal HF's (no cache) over a prefill and 8 decode steps."""
    model, path = hf_v2
    prompt = _prompt(13, 9)
    tokens, hf_logits = hf_greedy(model, prompt, 9)
    feeds = [[(0, prompt)]] + [[(0, [t])] for t in tokens[:-1]]
    jobs = [StepsJob(str(build("kimi_k25", config=path, mesh=Mesh.build(2, **kw)).save(
        tmp_path / f"v2_{i}.tsprog")), feeds, weights=str(path))
        for i, kw in enumerate(({}, {"moe_ep": 2}))]
    for kw, out in zip(({}, {"moe_ep": 2}), run_steps(jobs)):
        worst = float((torch.cat(out) - hf_logits[:-1]).abs().max())  # last: never fed
        assert worst < ATOL, f"{Mesh.build(2, **kw).describe()}: logits differ by {worst}"


def test_from_hf_reads_v2_lite_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V2_LITE))
    built = build("kimi_k25", config=tmp_path, mesh=Mesh.build(1))   # a path, as the CLI
    cfg = kimi_k25.CONFIG.from_hf(V2_LITE)
    preset = kimi_k25.PRESETS["deepseek-v2-lite"]
    assert dataclasses.replace(cfg, rope_scaling=None) == dataclasses.replace(
        preset, rope_scaling=None)
    assert built.manifest["model"]["config"]["scoring_func"] == "softmax"
    # rope_scaling as written ({"type": "yarn", "factor": 40, ...}) means the preset's.
    for table in (64, 4096, 163840):
        torch.testing.assert_close(rope_cos_sin_cache(64, table, 10000.0, cfg.rope_scaling),
                                   rope_cos_sin_cache(64, table, 10000.0, preset.rope_scaling),
                                   atol=0, rtol=0)
    # 192^-0.5 * (1 + 0.0707 ln 40)^2: YaRN's temperature on the softmax.
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (1 + 0.0707 * 3.6888794541) ** 2)


def test_from_hf_v2_defaults_are_transformers_deepseek_v2():
    """A deepseek_v2 config.json without the routing keys means softmax greedy, as
    transformers' DeepseekV2Config (which has no scoring_func: V2 always uses softmax)."""
    keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "n_routed_experts",
            "num_experts_per_tok")
    cfg = kimi_k25.CONFIG.from_hf({k: V2_LITE[k] for k in keep})
    hf = transformers.DeepseekV2Config(**{k: V2_LITE[k] for k in keep[1:]})
    assert cfg.scoring_func == "softmax" and hf.topk_method == "greedy"
    for ours, theirs in [("q_lora_rank", "q_lora_rank"), ("kv_lora_rank", "kv_lora_rank"),
                         ("moe_intermediate_size", "moe_intermediate_size"),
                         ("n_shared_experts", "n_shared_experts"),
                         ("first_k_dense_replace", "first_k_dense_replace"),
                         ("routed_scaling_factor", "routed_scaling_factor"),
                         ("norm_topk_prob", "norm_topk_prob"), ("rms_norm_eps", "rms_norm_eps"),
                         ("max_position_embeddings", "max_position_embeddings")]:
        assert getattr(cfg, ours) == getattr(hf, theirs), ours
    assert (cfg.n_group, cfg.topk_group, cfg.rope_interleave) == (1, 1, True)


@pytest.mark.parametrize("change,match", [
    ({"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3},
     "topk_method='group_limited_greedy' with n_group=8, topk_group=3"),
    ({"scoring_func": "sigmoid"}, "scoring_func='sigmoid' with topk_method='greedy'"),
    ({"scoring_func": "sparsemixer"}, "scoring_func='sparsemixer'"),
    ({"num_experts_per_tok": None}, "no num_experts_per_tok"),
])
def test_from_hf_refuses_routing_it_does_not_build(change, match):
    with pytest.raises(ValueError, match=match):
        kimi_k25.CONFIG.from_hf({**V2_LITE, **change})


def test_group_limited_greedy_that_keeps_every_group_is_greedy():
    for groups in ({"n_group": 1, "topk_group": 1}, {"n_group": 4, "topk_group": 4}):
        cfg = kimi_k25.CONFIG.from_hf({**V2_LITE, "topk_method": "group_limited_greedy",
                                       **groups})
        assert (cfg.scoring_func, cfg.n_group, cfg.topk_group) == ("softmax", 1, 1)


def test_config_refuses_grouped_softmax():
    with pytest.raises(ValueError, match="n_group=4 with scoring_func='softmax'"):
        dataclasses.replace(kimi_k25.PRESETS["tiny"], scoring_func="softmax")
    with pytest.raises(ValueError, match="scoring_func must be 'sigmoid'"):
        dataclasses.replace(kimi_k25.PRESETS["tiny"], scoring_func="relu")


def test_v2_lite_preset_parameter_counts():
    """15.7B total, 2.4B active (DeepSeek-V2 paper and model card). Total: 15,706,484,224
    (the same as transformers' DeepseekV2ForCausalLM of this config). Active per token:
    everything but the 58 routed experts a token skips in each of the 26 MoE layers and the
    input embedding table (a lookup): 2,451,435,008 (the lm_head counted; the same
    convention gives full DeepSeek-V2 its 236B / 21B). With the embedding: 2.66B."""
    c = kimi_k25.PRESETS["deepseek-v2-lite"]
    with torch.device("meta"):
        model = kimi_k25.MODEL(c)
    total = sum(p.numel() for p in model.parameters())
    h, dqk = c.hidden_size, c.qk_head_dim
    attn = (h * c.num_heads * dqk + h * (c.kv_lora_rank + c.qk_rope_head_dim)
            + c.kv_lora_rank + c.kv_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim)
            + c.num_heads * c.v_head_dim * h + 2 * h)               # + the two layer norms
    expert = 3 * h * c.moe_intermediate_size
    moe = (c.n_routed_experts + c.n_shared_experts) * expert + c.n_routed_experts * h
    layers = c.num_layers * attn + 3 * h * c.intermediate_size + (c.num_layers - 1) * moe
    assert total == layers + 2 * c.vocab_size * h + h == 15_706_484_224
    skipped = (c.num_layers - 1) * (c.n_routed_experts - c.num_experts_per_tok) * expert
    active = total - skipped - c.vocab_size * h
    assert active == 2_451_435_008
    assert round(total / 1e9, 1) == 15.7 and 2.4e9 <= active < 2.5e9
    assert model.layers[0].self_attn.kv_cache_shape(10, 16) == (10, 16, 576)
    assert isinstance(model.layers[0].mlp, kimi_k25.GatedMLP)
    assert model.layers[1].mlp.e_score_correction_bias is None
