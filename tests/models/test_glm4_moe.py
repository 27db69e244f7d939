"""GLM-4.5 / 4.6 (models/glm4_moe.py) against transformers' Glm4MoeForCausalLM on tiny random
checkpoints: single-device parity over prefill + 16 paged decode steps with two page sizes,
the compiled program at TP2 / TP4 / EP2 / EP4 (gloo CPU processes, the checkpoint read slice
by slice), config.json parsing and its refusals, and the real presets on the meta device."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.models import glm4_moe, model_file_for_hf, read_hf_config
from tscompile.models.checkpoint import loadable_tensors, resolve
from tscompile.models.layers import GatedMLP, MoE
from tscompile.runtime.distributed import StepsJob, run_steps

from .parity import ATOL, check_parity, hf_greedy

VOCAB = 128

# initializer_range 0.2 (10x HF's 0.02): attention scores and logits at O(1), and router
# logits of std ~1.6, so sigmoid scores spread over (0, 1) and top-k is far from ties
# (HF's 0.02 would route almost uniformly). num_mtp_layers=0: HF builds no MTP layer anyway.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
              n_routed_experts=8, num_experts_per_tok=2, attention_bias=True,
              max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
              rms_norm_eps=1e-5)


def _randomise(model: transformers.PreTrainedModel, seed: int) -> None:
    """Move off HF's init so every weight matters: norm weights away from 1, nonzero q/k/v
    biases (HF starts them at 0), a sharper router (x1.5) and nonzero correction biases
    (they pick the experts, and come from their own checkpoint key)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("_proj.bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.mul_(1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def _add_mtp_layer(path, num_layers: int) -> None:
    """What a GLM checkpoint also ships: one MTP layer as model.layers.{num_layers}.*
    (shapes of GLM's eh_proj / enorm / hnorm / shared_head.norm and a decoder layer's
    attention). The model file must neither need nor trip over it."""
    tensors = load_file(path / "model.safetensors")
    h, prefix = COMMON["hidden_size"], f"model.layers.{num_layers}"
    tensors.update({f"{prefix}.eh_proj.weight": torch.randn(h, 2 * h),
                    f"{prefix}.enorm.weight": torch.ones(h),
                    f"{prefix}.hnorm.weight": torch.ones(h),
                    f"{prefix}.shared_head.norm.weight": torch.ones(h),
                    f"{prefix}.self_attn.q_proj.weight": torch.randn(128, h),
                    f"{prefix}.mlp.gate.e_score_correction_bias": torch.zeros(8)})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _save(cfg: transformers.Glm4MoeConfig, seed: int, path) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.Glm4MoeForCausalLM(cfg).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    _add_mtp_layer(path, cfg.num_hidden_layers)
    return model


@pytest.fixture(scope="module")
def hf_glm45(tmp_path_factory):
    """GLM-4.5-like: QK-norm, partial rotary 0.5 (8 of 16 dims), 2 expert groups of which 1
    competes, 1 shared expert, renormalised top-2 times 2.5, one dense first layer."""
    cfg = transformers.Glm4MoeConfig(
        **COMMON, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1, use_qk_norm=True, num_mtp_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5})
    path = tmp_path_factory.mktemp("glm45")
    return _save(cfg, 31, path), path


@pytest.fixture(scope="module")
def hf_air(tmp_path_factory):
    """GLM-4.5-Air-like but with the other options flipped: no QK-norm, a quarter of the
    head rotated (4 of 16 dims), one group, top-2 not renormalised, 2 shared experts, two
    dense layers, and YaRN (x4 over 32 positions: frequencies over the r dims only)."""
    cfg = transformers.Glm4MoeConfig(
        **COMMON, n_shared_experts=2, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, first_k_dense_replace=2, use_qk_norm=False, num_mtp_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32,
                         "partial_rotary_factor": 0.25})
    path = tmp_path_factory.mktemp("glm_air")
    return _save(cfg, 32, path), path


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------
# The tiny checkpoints exercise what they claim to

def test_tiny_checkpoints_are_partial_rotary_and_route_by_bias(hf_glm45, hf_air):
    for (model, path), rot in ((hf_glm45, 8), (hf_air, 4)):
        cfg = glm4_moe.CONFIG.from_hf(read_hf_config(path))
        assert cfg.rotary_dim == rot < cfg.head_dim == 16
        ours = glm4_moe.MODEL(cfg)
        kinds = [isinstance(layer.mlp, MoE) for layer in ours.layers]
        assert kinds == [i >= cfg.first_k_dense_replace for i in range(3)]
        assert all(isinstance(layer.mlp, GatedMLP) for layer, k in zip(ours.layers, kinds)
                   if not k)
        assert ours.layers[0].self_attn.q_proj.bias is not None
        assert ours.layers[0].self_attn.o_proj.bias is None
        assert (ours.layers[0].self_attn.q_norm is not None) == cfg.use_qk_norm
        # Routing matters: zeroing the correction biases moves HF's own logits well past
        # the parity tolerance (a bias left unloaded could not pass).
        ids = torch.tensor([_prompt(16, 3)])
        with torch.no_grad():
            ref = model(ids).logits
            saved = {n: b.clone() for n, b in model.named_buffers()
                     if n.endswith("e_score_correction_bias")}
            for n, b in model.named_buffers():
                if n in saved:
                    b.zero_()
            moved = (model(ids).logits - ref).abs().max().item()
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
        print(f"{path.name}: zeroing the correction biases moves HF logits by {moved:.3g}")
        assert moved > 100 * ATOL, f"correction bias changes logits by only {moved}"


# ---------------------------------------------------------------------------------------
# Single-device parity: prompt 13 ends off a page boundary for pages of 4 and 16.

@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("which", ["hf_glm45", "hf_air"])
def test_parity(request, which, page_size):
    model, path = request.getfixturevalue(which)
    worst = check_parity(model, path, "glm4_moe", _prompt(13, 7), page_size=page_size, steps=16)
    print(f"{which} page {page_size}: max abs logit diff {worst:.3g}")


def test_parity_chunked_prefill(hf_glm45):
    model, path = hf_glm45
    check_parity(model, path, "glm4_moe", _prompt(21, 8), page_size=4, prefill_chunk=8)


# ---------------------------------------------------------------------------------------
# Compiled: TP (heads, expert width) and EP (whole experts) over gloo processes

def _compiled(hf, tmp_path, world: int, meshes: list[dict]) -> None:
    model, path = hf
    prompt = _prompt(13, 9)
    tokens, hf_logits = hf_greedy(model, prompt, 9)
    feeds = [[(0, prompt)]] + [[(0, [t])] for t in tokens[:-1]]
    built = [Mesh.build(world, **kw) for kw in meshes]
    jobs = [StepsJob(str(build("glm4_moe", config=path, mesh=m).save(
        tmp_path / f"glm_{world}_{i}.tsprog")), feeds, weights=str(path))
        for i, m in enumerate(built)]
    outs = [torch.cat(out) for out in run_steps(jobs)]
    for m, out in zip(built, outs):
        worst = float((out - hf_logits[:-1]).abs().max())     # last token: never fed
        print(f"{m.describe()}: max abs logit diff vs transformers {worst:.3g}")
        assert worst < ATOL, f"{m.describe()}: logits differ from transformers by {worst}"
    assert float((outs[0] - outs[1]).abs().max()) < ATOL


def test_compiled_tp2_and_ep2_match_transformers(hf_glm45, tmp_path):
    _compiled(hf_glm45, tmp_path, 2, [{}, {"moe_ep": 2}])


def test_compiled_tp4_and_ep4_match_transformers(hf_glm45, tmp_path):
    _compiled(hf_glm45, tmp_path, 4, [{}, {"moe_ep": 4}])


# ---------------------------------------------------------------------------------------
# config.json

# zai-org/GLM-4.5-Air config.json as published on the hub (transformers 4.54 spelling).
AIR_HUB = {
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "partial_rotary_factor": 0.5,
    "initializer_range": 0.02, "intermediate_size": 10944, "max_position_embeddings": 131072,
    "model_type": "glm4_moe", "moe_intermediate_size": 1408, "norm_topk_prob": True,
    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128,
    "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8,
    "first_k_dense_replace": 1, "num_hidden_layers": 46, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": False,
    "vocab_size": 151552}
# zai-org/GLM-4.5: the keys that differ from Air's. GLM-4.6 adds a 202752-position context.
GLM45_HUB = {**AIR_HUB, "hidden_size": 5120, "intermediate_size": 12288,
             "moe_intermediate_size": 1536, "n_routed_experts": 160,
             "routed_scaling_factor": 2.5, "first_k_dense_replace": 3,
             "num_hidden_layers": 92, "use_qk_norm": True}
GLM46_HUB = {**GLM45_HUB, "max_position_embeddings": 202752}


@pytest.mark.parametrize("hub, preset", [(AIR_HUB, "glm-4.5-air"), (GLM45_HUB, "glm-4.5"),
                                         (GLM46_HUB, "glm-4.6")])
def test_from_hub_config_matches_presets(hub, preset):
    assert glm4_moe.CONFIG.from_hf(hub) == glm4_moe.PRESETS[preset]
    assert model_file_for_hf(hub) is glm4_moe


def test_from_transformers5_saved_config(hf_glm45, hf_air):
    d = read_hf_config(hf_air[1])
    # What transformers 5 writes: partial_rotary_factor inside rope_parameters, with YaRN.
    assert "partial_rotary_factor" in d["rope_parameters"] and "rope_theta" not in d
    cfg = glm4_moe.CONFIG.from_hf(d)
    assert (cfg.partial_rotary_factor, cfg.rope_theta) == (0.25, 50000.0)
    assert cfg.rope_scaling["rope_type"] == "yarn" and "partial_rotary_factor" not in (
        cfg.rope_scaling)
    assert (cfg.n_shared_experts, cfg.first_k_dense_replace, cfg.norm_topk_prob) == (2, 2, False)
    cfg = glm4_moe.CONFIG.from_hf(read_hf_config(hf_glm45[1]))
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == (2, 1, 2.5)
    assert cfg.rope_scaling is None and cfg.use_qk_norm and cfg.attention_bias
    # A key left out means transformers' default (partial_rotary_factor 0.5).
    hub = {k: v for k, v in AIR_HUB.items() if k != "partial_rotary_factor"}
    assert glm4_moe.CONFIG.from_hf(hub).rotary_dim == 64


def test_build_from_config_records_glm_options(hf_glm45):
    built = build(None, config=hf_glm45[1], mesh=Mesh.build(1))   # found by model_type
    c = built.manifest["model"]["config"]
    assert (c["partial_rotary_factor"], c["use_qk_norm"], c["n_group"]) == (0.5, True, 2)


@pytest.mark.parametrize("changes, words", [
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
     "quantization_config.*fp8.*not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"scoring_func": "softmax"}, "sigmoid"),
    ({"topk_method": "greedy"}, "noaux_tc"),
    ({"partial_rotary_factor": 0.51}, "65 rotary dims"),           # int(128 * 0.51): odd
    ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    ({"n_group": 3}, "n_routed_experts=128 does not split into n_group=3"),
    ({"n_group": 4, "topk_group": 5}, "topk_group=5 exceeds n_group=4"),
    ({"n_group": 16, "topk_group": 1, "num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"num_key_value_heads": 7}, "num_kv_heads=7"),
    ({"num_experts_per_tok": None}, "num_experts_per_tok"),
])
def test_from_hf_refuses_what_it_cannot_build(changes, words):
    with pytest.raises(ValueError, match=words):
        glm4_moe.CONFIG.from_hf({**AIR_HUB, **changes})


def test_config_errors_name_the_field():
    tiny = glm4_moe.PRESETS["tiny"]
    with pytest.raises(ValueError, match="intermediate_size"):
        dataclasses.replace(tiny, intermediate_size=0)
    dataclasses.replace(tiny, intermediate_size=0, first_k_dense_replace=0)  # all MoE: fine
    with pytest.raises(ValueError, match="n_shared_experts"):
        dataclasses.replace(tiny, n_shared_experts=-1)
    with pytest.raises(ValueError, match="leaves 1 expert per group"):
        dataclasses.replace(tiny, n_group=8, topk_group=2)


# ---------------------------------------------------------------------------------------
# Real presets on the meta device

def _counts(c: glm4_moe.Glm4MoeConfig) -> tuple[int, int]:
    """(total, active) parameters of the model this file builds (no MTP layer). Active per
    token: all but the routed experts a token skips, without the embedding table and the LM
    head, the convention GLM-4.5's report uses (it gives 12B / 32B; with the LM head it
    would be 12.8B / 32.9B)."""
    with torch.device("meta"):
        model = glm4_moe.MODEL(c)
    total = sum(p.numel() for p in model.parameters())
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    skipped = (c.num_layers - c.first_k_dense_replace) * (
        c.n_routed_experts - c.num_experts_per_tok) * expert
    return total, total - skipped - 2 * c.vocab_size * c.hidden_size


def test_presets_build_on_meta_with_published_sizes():
    """GLM-4.5 report / model cards: Air 106B total, 12B active; GLM-4.5 (and 4.6) 355B / 32B.
    Exact counts of this file: Air 106,852,245,504 / 12,182,609,920; GLM-4.5 352,797,814,784 /
    32,080,359,424. The published totals are rounded (and 355B seems to count the 4.0e9 MTP
    layer this file does not build), so: totals within 1%, active within 2%."""
    air, big = _counts(glm4_moe.PRESETS["glm-4.5-air"]), _counts(glm4_moe.PRESETS["glm-4.5"])
    assert air == (106_852_245_504, 12_182_609_920)
    assert big == (352_797_814_784, 32_080_359_424)
    assert _counts(glm4_moe.PRESETS["glm-4.6"]) == big
    for (total, active), (pub_total, pub_active) in ((air, (106e9, 12e9)), (big, (355e9, 32e9))):
        assert abs(total / pub_total - 1) < 0.01, f"{total / 1e9:.2f}B vs {pub_total / 1e9}B"
        assert abs(active / pub_active - 1) < 0.02, f"{active / 1e9:.2f}B vs {pub_active / 1e9}B"


@pytest.mark.parametrize("preset", ["glm-4.5-air", "glm-4.5"])
def test_preset_checkpoint_keys_skip_the_mtp_layer(preset):
    c = glm4_moe.PRESETS[preset]
    with torch.device("meta"):
        model = glm4_moe.MODEL(c)
    keys = {p.ckpt for p in resolve(model, glm4_moe.MODEL.CHECKPOINT_MAP)}
    last, dense = c.num_layers - 1, c.first_k_dense_replace
    assert f"model.layers.{last}.mlp.experts.{c.n_routed_experts - 1}.down_proj.weight" in keys
    assert f"model.layers.{last}.mlp.gate.e_score_correction_bias" in keys
    assert f"model.layers.{last}.mlp.shared_experts.up_proj.weight" in keys
    assert f"model.layers.{dense - 1}.mlp.gate_proj.weight" in keys
    assert "model.layers.0.self_attn.k_proj.bias" in keys
    assert not any(k.startswith(f"model.layers.{c.num_layers}.") for k in keys)   # MTP
    assert ("model.layers.0.self_attn.q_norm.weight" in keys) == c.use_qk_norm
    moe = c.n_routed_experts * 3 + 2 + 3                  # experts, router + bias, shared
    attn = 4 + 3 + 2 + (2 if c.use_qk_norm else 0)        # q/k/v/o, 3 biases, 2 norms, qk
    assert len(keys) == c.num_layers * attn + dense * 3 + (c.num_layers - dense) * moe + 3
    assert model.layers[0].self_attn.kv_cache_shape(10, 16) == (2, 10, 16, 8, 128)


def test_tiny_preset_builds_and_runs():
    from tscompile.runtime import load_model
    from tscompile.runtime.offline import PagedRunner, generate
    from tscompile.runtime.protocol import SamplingParams
    model, cfg = load_model("glm4_moe", preset="tiny", dummy_weights=True)
    out = generate(PagedRunner(model, page_size=4, num_blocks=16), [1, 2, 3, 4, 5],
                   SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out) == 4 and all(0 <= t < cfg.vocab_size for t in out)
    built = build("glm4_moe", preset="tiny", mesh=Mesh.build(2, moe_ep=2))
    assert built.manifest["model"]["config"]["rope_theta"] == 10000.0


@pytest.mark.parametrize("preset, mesh", [("glm-4.5-air", dict(moe_ep=8)), ("glm-4.5", {})])
def test_real_presets_compile_at_8_ranks(preset, mesh):
    """The real shapes divide over 8 ranks: 12 of 96 query heads and 1 of 8 KV heads per
    rank, 16 whole experts (EP8) or 1/8 of each expert's width (TP8). Every parameter but
    the replicated ones (embeddings, LM head, norms, routers) is split 8 ways, and each
    layer has exactly two all-reduces (each fused with the next add + RMSNorm but the last)."""
    c = glm4_moe.PRESETS[preset]
    built = build("glm4_moe", preset=preset, mesh=Mesh.build(8, **mesh))
    m = built.manifest
    assert m["warnings"] == []
    with torch.device("meta"):
        model = glm4_moe.MODEL(c)
    sizes = {n: p.numel() for n, p in loadable_tensors(model).items()}  # + correction biases
    whole = sum(n for k, n in sizes.items()
                if k.startswith(("embed_tokens", "lm_head")) or "norm" in k
                or k.endswith(("mlp.gate.weight", "e_score_correction_bias")))
    assert m["param_elements_per_rank"] == whole + (sum(sizes.values()) - whole) // 8
    fused, last = "all_reduce_add_rms_norm P->R @ layers.{}", c.num_layers - 1
    expected = {str(i): [fused.format(i)] * 2 for i in range(last)}
    # The last MLP's sum is gathered to meta.logits_indices before the final norm: unfused.
    expected[str(last)] = [fused.format(last), f"all_reduce P->R @ layers.{last}"]
    assert m["collectives_per_layer"] == expected
    assert m["kv_cache"]["elements_per_token_per_rank"] == c.num_layers * 2 * 1 * 128


def test_mtp_layer_in_checkpoint_is_not_loaded(hf_glm45, caplog):
    """The checkpoint's MTP tensors (model.layers.3.*, see _add_mtp_layer) are left out:
    the loader names them as unused, and nothing of the model comes from them."""
    import logging

    from tscompile.runtime import load_model
    _, path = hf_glm45
    with caplog.at_level(logging.INFO, logger="tscompile.weights"):
        model, _ = load_model("glm4_moe", weights=path)
    assert len(model.layers) == 3
    assert "6 tensors not used by Glm4MoeForCausalLM (e.g. model.layers.3." in caplog.text
