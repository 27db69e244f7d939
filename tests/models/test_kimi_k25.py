"""Kimi K2.5 / DeepSeek-V3 model file: parity with transformers' DeepseekV3ForCausalLM on tiny
random checkpoints, config parsing, and the real presets built on the meta device."""
from __future__ import annotations

import pytest
import torch
import transformers

from tscompile.models import kimi_k25

from .parity import check_parity

VOCAB = 128


def _randomise(model: transformers.PreTrainedModel, seed: int) -> None:
    """Move off HF's init so every weight matters: norm weights away from 1 (a swapped
    q_a/kv_a norm would show), nonzero router correction biases (routing depends on them,
    and they are loaded from a separate checkpoint key), and small latents so the latent
    norms' eps (HF: a fixed 1e-6, not rms_norm_eps) moves the logits well past tolerance."""
    g = torch.Generator().manual_seed(seed)
    rank = model.config.kv_lora_rank
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("kv_a_proj_with_mqa.weight", "q_a_proj.weight")):
                p[:rank if "kv_a" in name else None] *= 0.02  # c rows only: k_pe keeps O(1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def _save(cfg: transformers.DeepseekV3Config, seed: int, path) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    return model


# initializer_range 0.2 (HF's 0.02 gives near-uniform attention, which hides RoPE and
# masking mistakes) puts attention scores and logits at O(1). num_key_value_heads must be
# set: HF defaults it to 128 whatever num_attention_heads is.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
              n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
              initializer_range=0.2, num_mtp_layers=0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_kimi(tmp_path_factory):
    """Query LoRA, YaRN with mscale != mscale_all_dim (both the cos/sin factor and the
    softmax-scale correction are exercised), 4 expert groups of which 2 compete, 2 shared
    experts, interleaved RoPE, rms_norm_eps != the latent norms' fixed 1e-6."""
    cfg = transformers.DeepseekV3Config(
        **COMMON, q_lora_rank=20, n_shared_experts=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-5,
        max_position_embeddings=128, rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8})
    path = tmp_path_factory.mktemp("kimi")
    return _save(cfg, 11, path), path


@pytest.fixture(scope="module")
def hf_moonlight(tmp_path_factory):
    """Moonlight-like: no query LoRA (q_proj), one expert group, no renormalisation, plain
    RoPE with the rotate-half pairing."""
    cfg = transformers.DeepseekV3Config(
        **COMMON, q_lora_rank=None, n_shared_experts=1, n_group=1, topk_group=1,
        routed_scaling_factor=2.446, norm_topk_prob=False, rms_norm_eps=1e-6,
        max_position_embeddings=128, rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    path = tmp_path_factory.mktemp("moonlight")
    return _save(cfg, 12, path), path


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# Prompt lengths: 16 ends exactly on a page boundary for both page sizes; 13 does not.
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("prompt_len", [13, 16])
def test_kimi_parity(hf_kimi, page_size, prompt_len):
    model, path = hf_kimi
    check_parity(model, path, "kimi_k25", _prompt(prompt_len, 3), page_size=page_size)


def test_kimi_parity_chunked_prefill(hf_kimi):
    model, path = hf_kimi
    # Chunks of 8 over pages of 4: each chunk attends to a cached prefix plus itself, and
    # positions run past YaRN's original 32-token window.
    check_parity(model, path, "kimi_k25", _prompt(21, 4), page_size=4, prefill_chunk=8)


@pytest.mark.parametrize("page_size", [4, 16])
def test_moonlight_parity(hf_moonlight, page_size):
    model, path = hf_moonlight
    check_parity(model, path, "kimi_k25", _prompt(13, 5), page_size=page_size)


def test_from_hf_reads_both_rope_styles_and_nesting():
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=8,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, num_experts_per_tok=2,
                n_group=1, topk_group=1, first_k_dense_replace=1)
    yarn = {"factor": 64.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
            "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}
    old = kimi_k25.CONFIG.from_hf({**base, "n_routed_experts": 4, "rope_theta": 50000.0,
                                   "rope_scaling": {"type": "yarn", **yarn}})
    new = kimi_k25.CONFIG.from_hf({"model_type": "kimi_k25", "text_config": {
        **base, "num_local_experts": 4,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, **yarn}}})
    for c in (old, new):
        assert (c.rope_theta, c.n_routed_experts, c.q_lora_rank) == (50000.0, 4, None)
        assert c.rope_scaling["factor"] == 64.0
        # DeepSeek scales the softmax by mscale(64, 1)^2 = (1 + 0.1 ln 64)^2 ~ 2.005.
        assert c.softmax_scale == pytest.approx(8 ** -0.5 * (1 + 0.1 * torch.log(
            torch.tensor(64.0)).item()) ** 2)
    plain = kimi_k25.CONFIG.from_hf({**base, "n_routed_experts": 4})
    assert plain.rope_scaling is None and plain.softmax_scale == 8 ** -0.5


@pytest.mark.parametrize("field,value,match", [
    ("n_group", 3, "n_routed_experts=8 does not split into n_group=3"),
    ("num_heads", 0, "num_heads must be positive"),
    ("topk_group", 5, "topk_group=5 exceeds n_group=4"),
    ("num_experts_per_tok", 5, "num_experts_per_tok=5 exceeds"),
    ("first_k_dense_replace", -1, "first_k_dense_replace must be >= 0"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim must be even"),
])
def test_config_validation_names_the_field(field, value, match):
    args = {f: getattr(kimi_k25.PRESETS["tiny"], f) for f in kimi_k25.CONFIG.__dataclass_fields__}
    with pytest.raises(ValueError, match=match):
        kimi_k25.CONFIG(**{**args, field: value})


@pytest.mark.parametrize("preset,low,high", [
    ("moonlight-16b-a3b", 15e9, 17e9),   # "16B total"
    ("kimi-k2.5", 1.0e12, 1.1e12),       # "1T total" (1.04T with the vision tower)
])
def test_big_presets_build_on_meta(preset, low, high):
    cfg = kimi_k25.PRESETS[preset]
    with torch.device("meta"):
        model = kimi_k25.MODEL(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert low < n < high, f"{preset}: {n / 1e9:.2f}B parameters"
    attn = model.layers[0].self_attn
    # The latent cache row: 512 + 64 = 576 values per token per layer, shared by all heads.
    assert attn.kv_cache_shape(10, 16) == (10, 16, 576)
    assert isinstance(model.layers[0].mlp, kimi_k25.GatedMLP)
    assert isinstance(model.layers[1].mlp, kimi_k25.MoE)
