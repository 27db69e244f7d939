"""Qwen3 dense and Qwen3-MoE against Hugging Face `transformers` on the same random weights,
plus config import (hub and transformers-5 spellings), validation, and the big presets on
the meta device."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from tscompile.models import model_file_for_hf, read_hf_config
from tscompile.models.checkpoint import resolve
from tscompile.models.layers import GatedMLP, MoE
from tscompile.models.qwen3 import CONFIG, MODEL, PRESETS, Qwen3Config

from .parity import check_parity, save_hf


def _sharpen_routers(model, std: float) -> None:
    """HF initialises routers at std 0.02, so router logits differ by ~1e-2 and top-k choices
    sit close to ties; a wider router makes the chosen set robust to 1e-7 rounding."""
    with torch.no_grad():
        for layer in model.model.layers:
            if isinstance(layer.mlp, transformers.models.qwen3_moe.modeling_qwen3_moe
                          .Qwen3MoeSparseMoeBlock):
                layer.mlp.gate.weight.normal_(0.0, std)


@pytest.fixture(scope="module")
def hf_dense(tmp_path_factory):
    """Qwen3-0.6B-like: tied embeddings, head_dim * heads != hidden, QK-norm."""
    torch.manual_seed(11)
    cfg = transformers.Qwen3Config(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    # Non-trivial QK-norm weights, so a missing or misplaced QK-norm cannot pass.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return save_hf(model, tmp_path_factory, "qwen3")


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    """Renormalised top-2 of 8; layer 1 forced dense by mlp_only_layers."""
    torch.manual_seed(12)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=1000000.0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    _sharpen_routers(model, 0.3)
    return save_hf(model, tmp_path_factory, "qwen3_moe")


@pytest.fixture(scope="module")
def hf_moe_sparse_step(tmp_path_factory):
    """Raw (not renormalised) top-3 of 6 on every second layer (decoder_sparse_step=2), with
    layer 3 also dense through mlp_only_layers: layers are dense, MoE, dense, dense."""
    torch.manual_seed(13)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=False,
        decoder_sparse_step=2, mlp_only_layers=[3], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    _sharpen_routers(model, 0.3)
    return save_hf(model, tmp_path_factory, "qwen3_moe_step")


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------
# Parity: prompt length 16 ends exactly on a page boundary for pages of 4 and 16; 13 does not.

@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("prompt_len", [13, 16])
@pytest.mark.parametrize("which", ["hf_dense", "hf_moe"])
def test_parity(request, which, page_size, prompt_len):
    model, path = request.getfixturevalue(which)
    prompt = _prompt(prompt_len, model.config.vocab_size, seed=prompt_len)
    check_parity(model, path, "qwen3", prompt, page_size=page_size)


@pytest.mark.parametrize("page_size", [4, 16])
def test_parity_sparse_step_unnormalised(hf_moe_sparse_step, page_size):
    model, path = hf_moe_sparse_step
    check_parity(model, path, "qwen3", _prompt(13, 96, seed=5), page_size=page_size)


@pytest.mark.parametrize("which", ["hf_dense", "hf_moe", "hf_moe_sparse_step"])
def test_parity_chunked_prefill(request, which):
    model, path = request.getfixturevalue(which)
    # Chunks of 8 over pages of 4: each chunk attends to a cached prefix plus itself.
    prompt = _prompt(21, model.config.vocab_size, seed=21)
    check_parity(model, path, "qwen3", prompt, page_size=4, prefill_chunk=8)


# ---------------------------------------------------------------------------------------
# Config import and layer layout

def test_layer_kinds_follow_hf(hf_moe, hf_moe_sparse_step):
    for hf, path in (hf_moe, hf_moe_sparse_step):
        cfg = CONFIG.from_hf(read_hf_config(path))
        ours = MODEL(cfg)
        hf_moe_layers = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock"
                         for layer in hf.model.layers]
        assert [isinstance(layer.mlp, MoE) for layer in ours.layers] == hf_moe_layers
        assert [isinstance(layer.mlp, GatedMLP) for layer in ours.layers] == [
            not m for m in hf_moe_layers]
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, False]


def test_from_transformers5_saved_config(hf_moe_sparse_step):
    _, path = hf_moe_sparse_step
    d = read_hf_config(path)
    # What transformers 5 writes: the aliases this file must read.
    assert "num_local_experts" in d and "num_experts" not in d and "rope_parameters" in d
    cfg = CONFIG.from_hf(d)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (6, 3, 24)
    assert (cfg.norm_topk_prob, cfg.decoder_sparse_step, cfg.mlp_only_layers) == (False, 2, (3,))
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling is None
    assert model_file_for_hf(d) is model_file_for_hf({"model_type": "qwen3"})
    assert model_file_for_hf(d).__name__ == "tscompile.models.qwen3"


def _hub_30b_a3b() -> dict:
    # Qwen/Qwen3-30B-A3B config.json as published on the hub (transformers 4.51 spelling).
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}


def test_from_hub_config_matches_presets(tmp_path):
    assert CONFIG.from_hf(_hub_30b_a3b()) == PRESETS["qwen3-30b-a3b"]
    hub_06b = {k: v for k, v in _hub_30b_a3b().items()
               if k not in ("decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
                            "norm_topk_prob", "num_experts", "num_experts_per_tok",
                            "output_router_logits", "router_aux_loss_coef")}
    hub_06b.update(model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                   num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                   max_window_layers=28, tie_word_embeddings=True)
    assert CONFIG.from_hf(hub_06b) == PRESETS["qwen3-0.6b"]
    (tmp_path / "config.json").write_text(json.dumps(hub_06b))
    assert model_file_for_hf(read_hf_config(tmp_path)).CONFIG is Qwen3Config


@pytest.mark.parametrize("preset, low, high", [
    ("qwen3-0.6b", 0.55e9, 0.65e9),        # 596e6 with the tied embedding counted once
    ("qwen3-30b-a3b", 30.0e9, 31.0e9),     # 30.5e9
])
def test_big_presets_build_on_meta(preset, low, high):
    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = MODEL(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert low < n < high, f"{preset}: {n / 1e9:.3f}e9 parameters"
    keys = {p.ckpt for p in resolve(model, MODEL.CHECKPOINT_MAP)}
    if cfg.num_experts:
        assert "model.layers.47.mlp.experts.127.down_proj.weight" in keys
        assert "model.layers.0.mlp.gate.weight" in keys and "lm_head.weight" in keys
        assert len(keys) == 48 * (128 * 3 + 1 + 8) + 3  # experts, router, attn+norms; ends
    else:
        assert "lm_head.weight" not in keys  # tied: the embedding is the head
        assert "model.layers.27.mlp.up_proj.weight" in keys


def test_tiny_presets_build_and_run():
    from tscompile.runtime import load_model
    from tscompile.runtime.offline import PagedRunner, generate
    from tscompile.runtime.protocol import SamplingParams
    for preset in ("tiny", "tiny-moe"):
        model, cfg = load_model("qwen3", preset=preset, dummy_weights=True)
        out = generate(PagedRunner(model, page_size=4, num_blocks=16), [1, 2, 3, 4, 5],
                       SamplingParams(max_tokens=4, temperature=0.0))
        assert len(out) == 4 and all(0 <= t < cfg.vocab_size for t in out)


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(head_dim=None, hidden_size=50), "head_dim"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
    (dict(mlp_only_layers=(3,)), "mlp_only_layers"),
    (dict(num_experts=-1), "num_experts"),
    (dict(intermediate_size=0), "intermediate_size"),  # layer 0 is dense in tiny-moe
    (dict(vocab_size=0), "vocab_size"),
])
def test_config_errors_name_the_field(changes, field):
    base = {f: getattr(PRESETS["tiny-moe"], f) for f in Qwen3Config.__dataclass_fields__}
    with pytest.raises(ValueError, match=field):
        Qwen3Config(**{**base, **changes})


def test_all_moe_needs_no_dense_width():
    cfg = Qwen3Config(vocab_size=8, hidden_size=8, intermediate_size=0, num_layers=2,
                      num_heads=2, num_kv_heads=1, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=4)
    assert all(cfg.is_moe_layer(i) for i in range(2))


@pytest.mark.parametrize("changes, words", [
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True}, "sliding"),
    ({"layer_types": ["full_attention"] * 47 + ["sliding_attention"]}, "sliding"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_experts_per_tok": 129}, "num_experts_per_tok"),
])
def test_from_hf_refuses_what_it_cannot_build(changes, words):
    with pytest.raises(ValueError, match=words):
        CONFIG.from_hf({**_hub_30b_a3b(), **changes})
