"""GPT-OSS (models/gpt_oss.py) against transformers' GptOssForCausalLM (eager attention, the
implementation with sinks) on a tiny random checkpoint: single device over prefill + 16
paged decode steps at two page sizes and with chunked prefill; the same checkpoint compiled
at TP2, TP4, EP2 and EP4 (gloo CPU processes, read slice by slice); the sharding plan
(sinks with the heads, expert biases with the experts / the width, the down bias once);
config.json parsing and its refusals; the published presets on the meta device.

The checkpoint is built so that every GPT-OSS feature changes the logits: a sliding window
of 5 keys under prompts of 13-21 tokens on layers 0 and 2 (layer 1 and 3 full), sinks ~N(0, 1),
biases ~N(0, 0.5) on q/k/v/o, the router and both expert projections, a router wide enough
that the top-k choice is robust, and expert weights large enough that the SwiGLU clamp
(limit 7) bites on some rows.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.models import model_file_for_hf, read_hf_config
from tscompile.models.checkpoint import resolve
from tscompile.models.gpt_oss import CONFIG, MODEL, PRESETS, YARN, GptOssConfig, alternating
from tscompile.runtime.distributed import StepsJob, run_steps

from .parity import ATOL, check_parity, hf_greedy

VOCAB = 128
WINDOW = 5
LIMIT = 7.0


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def hf_oss(tmp_path_factory):
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=16, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                     "full_attention"],
        max_position_embeddings=256, rms_norm_eps=1e-5, swiglu_limit=LIMIT,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False},
        tie_word_embeddings=False, initializer_range=0.1, attn_implementation="eager")
    torch.manual_seed(17)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_bias", ".bias")):
                p.normal_(0.0, 0.5)
            elif name.endswith("sinks"):
                p.normal_(0.0, 1.0)
            elif name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("router.weight"):
                p.normal_(0.0, 0.5)
            elif name.endswith("gate_up_proj"):
                p.normal_(0.0, 0.4)          # |gate/up| reach past the clamp at 7
    path = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(path)
    return model, path


def test_tiny_checkpoint_exercises_the_features(hf_oss):
    """The clamp bites, the window is shorter than the prompts, layers alternate."""
    model, path = hf_oss
    cfg = CONFIG.from_hf(read_hf_config(path))
    assert cfg.layer_types == alternating(4) and cfg.sliding_window == WINDOW
    assert [cfg.window(i) for i in range(4)] == [WINDOW, 0, WINDOW, 0]
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["truncate"] is False
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(64, 64)
    pre = x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert (pre.abs() > LIMIT).float().mean() > 0.01
    ours = MODEL(cfg)
    assert ours.layers[0].self_attn.window == WINDOW and ours.layers[1].self_attn.window == 0
    assert model_file_for_hf(read_hf_config(path)).MODEL is MODEL


@pytest.mark.parametrize("page_size", [4, 16])
def test_parity(hf_oss, page_size):
    model, path = hf_oss
    worst = check_parity(model, path, "gpt_oss", _prompt(13, 3), page_size=page_size, steps=16)
    print(f"gpt_oss page {page_size}: max |logit diff| {worst:.2e}")


def test_parity_chunked_prefill(hf_oss):
    model, path = hf_oss
    # Chunks of 8 over pages of 4: the window starts mid-page inside a cached prefix.
    worst = check_parity(model, path, "gpt_oss", _prompt(21, 4), page_size=4, prefill_chunk=8)
    print(f"gpt_oss chunked prefill: max |logit diff| {worst:.2e}")


def test_hf_without_window_or_sinks_differs(hf_oss):
    """The oracle is sensitive: dropping the window or the sinks moves HF's own logits by
    far more than ATOL, so parity above is evidence for both."""
    model, _ = hf_oss
    ids = torch.tensor([_prompt(13, 3)])
    with torch.no_grad():
        base = model(ids).logits
        saved = [layer.self_attn.sinks.clone() for layer in model.model.layers]
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
        no_sinks = model(ids).logits
        for layer, s in zip(model.model.layers, saved):
            layer.self_attn.sinks.copy_(s)
        model.config.sliding_window = 1000
        no_window = model(ids).logits
        model.config.sliding_window = WINDOW
        assert torch.equal(model(ids).logits, base)
    assert (base - no_sinks).abs().max() > 1e-2
    assert (base - no_window).abs().max() > 1e-2


MESHES = [(2, {}), (4, {}), (2, {"moe_ep": 2}), (4, {"moe_ep": 4})]


def test_compiled_tp_and_ep_match_transformers(hf_oss, tmp_path):
    """TP2 (heads, sinks and the expert width split), TP4, attention TP2 + EP2 (4 whole
    experts with their biases per rank) and attention TP4 + EP4: logits at every position
    equal HF's over a prefill and 9 decode steps."""
    model, path = hf_oss
    prompt = _prompt(13, 9)
    tokens, hf_logits = hf_greedy(model, prompt, 9)
    feeds = [[(0, prompt)]] + [[(0, [t])] for t in tokens[:-1]]
    for world in (2, 4):          # run_steps launches one world size at a time
        meshes = [Mesh.build(w, **kw) for w, kw in MESHES if w == world]
        jobs = [StepsJob(str(build("gpt_oss", config=path, mesh=m).save(
            tmp_path / f"w{world}_{i}.tsprog")), feeds, weights=str(path))
            for i, m in enumerate(meshes)]
        for m, out in zip(meshes, run_steps(jobs)):
            worst = float((torch.cat(out) - hf_logits[:-1]).abs().max())  # last: never fed
            print(f"gpt_oss {m.describe()}: max |logit diff| {worst:.2e}")
            assert worst < ATOL, f"{m.describe()}: logits differ by {worst}"


def _placements(built, layer: int = 0) -> dict[str, str]:
    pre = f"layers.{layer}."
    return {k[len(pre):]: v["placement"] for k, v in built.manifest["tensors"].items()
            if k.startswith(pre)}


@pytest.mark.parametrize("kw, want, rank0", [
    # TP2: heads (with their sinks) and the expert width (whole gate/up pairs of the
    # interleaved [E, H, 2I]) split; both row-parallel biases (o_proj, the experts' down
    # bias) whole and added on rank 0 only.
    ({}, {"self_attn.sinks": "S(0)", "self_attn.q_proj.bias": "S(0)",
          "self_attn.o_proj.weight": "S(1)", "self_attn.o_proj.bias": "R",
          "mlp.experts.gate_up_proj": "S(2)", "mlp.experts.gate_up_proj_bias": "S(1)",
          "mlp.experts.down_proj": "S(1)", "mlp.experts.down_proj_bias": "R",
          "mlp.router.weight": "R", "mlp.router.bias": "R"},
     ["layers.0.self_attn.o_proj", "layers.0.mlp"]),
    # EP2: whole experts with their biases (each expert's bias added by its one holder).
    ({"moe_ep": 2}, {"self_attn.sinks": "S(0)", "mlp.experts.gate_up_proj": "S(0)",
                     "mlp.experts.gate_up_proj_bias": "S(0)", "mlp.experts.down_proj": "S(0)",
                     "mlp.experts.down_proj_bias": "S(0)", "mlp.router.bias": "R"},
     ["layers.0.self_attn.o_proj"]),
])
def test_sharding_plan(kw, want, rank0):
    built = build("gpt_oss", preset="tiny", mesh=Mesh.build(2, **kw))
    got = _placements(built)
    assert {k: got[k] for k in want} == want
    layer0 = built.manifest["collectives_per_layer"]["0"]
    assert [c.split(" @ ")[1] for c in layer0 if c.startswith("rank0")] == rank0
    # One all-reduce after attention and one after the MoE: nothing inside either.
    assert sum(c.startswith("all_reduce") for c in layer0) == 2 and len(layer0) == 2 + len(rank0)


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_presets_build_on_meta_in_bf16(name):
    with torch.device("meta"):
        model = MODEL(PRESETS[name]).to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name, world, kw, heads", [
    ("gpt-oss-20b", 4, {}, 16), ("gpt-oss-20b", 8, {}, 8),
    ("gpt-oss-120b", 8, {"moe_ep": 8}, 8)])
def test_presets_compile(name, world, kw, heads):
    """The published shapes through the whole compiler (no GPU, no weights): per rank 1/world
    of the heads with their sinks, and of the expert width (TP) or of the experts (EP)."""
    built = build("gpt_oss", preset=name, mesh=Mesh.build(world, **kw))
    c = PRESETS[name]
    t = built.manifest["tensors"]
    assert t["layers.0.self_attn.sinks"]["shape"] == [c.num_heads]
    assert t["layers.0.self_attn.sinks"]["placement"] == "S(0)" and c.num_heads // world == heads
    experts = t[f"layers.{c.num_layers - 1}.mlp.experts.down_proj_bias"]["placement"]
    assert experts == ("S(0)" if kw else "R")
    assert len(built.manifest["collectives_per_layer"]) == c.num_layers


def _counts(c: GptOssConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = MODEL(c)
    total = sum(p.numel() for p in model.parameters())
    h, i = c.hidden_size, c.intermediate_size
    expert = h * 2 * i + 2 * i + i * h + h                   # gate_up (+ bias), down (+ bias)
    skipped = c.num_layers * (c.num_experts - c.num_experts_per_tok) * expert
    return total, total - skipped - c.vocab_size * h         # the input embedding: a lookup


@pytest.mark.parametrize("name, total, active, card_total, card_active", [
    # The model card (openai/gpt-oss-20b, -120b): 20.91B total / 3.61B active;
    # 116.83B / 5.13B. Checked to 0.5%; rounded as the brief states them: 21B / 3.6B,
    # 117B / 5.1B.
    ("gpt-oss-20b", 20_914_757_184, 3_608_307_264, 20.91e9, 3.61e9),
    ("gpt-oss-120b", 116_829_156_672, 5_132_849_472, 116.83e9, 5.13e9),
])
def test_preset_parameter_counts(name, total, active, card_total, card_active):
    got_total, got_active = _counts(PRESETS[name])
    assert (got_total, got_active) == (total, active)
    assert abs(got_total / card_total - 1) < 5e-3 and abs(got_active / card_active - 1) < 5e-3
    assert round(got_total / 1e9) == round(card_total / 1e9)
    assert round(got_active / 1e9, 1) == round(card_active / 1e9, 1)


def test_preset_checkpoint_keys_are_hf_names():
    with torch.device("meta"):
        model = MODEL(PRESETS["gpt-oss-20b"])
    keys = {p.ckpt for p in resolve(model, MODEL.CHECKPOINT_MAP)}
    per_layer = {f"model.layers.23.{k}" for k in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.sinks",
        *(f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")),
        "mlp.router.weight", "mlp.router.bias", "mlp.experts.gate_up_proj",
        "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj", "mlp.experts.down_proj_bias")}
    assert per_layer <= keys
    assert len(keys) == 24 * len(per_layer) + 3      # + embed_tokens, norm, lm_head
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys


# ---------------------------------------------------------------------------------------
# config.json

def _hub_20b() -> dict:
    """openai/gpt-oss-20b config.json as published (the MXFP4 quantization_config dropped:
    the dequantised bf16 checkpoint this file loads)."""
    return {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True,
        "attention_dropout": 0.0, "eos_token_id": 200002, "experts_per_token": 4,
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
        "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
        "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn",
                         "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
        "swiglu_limit": 7.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 201088}


def test_from_hub_config_matches_presets():
    assert CONFIG.from_hf(_hub_20b()) == PRESETS["gpt-oss-20b"]
    hub_120b = {**_hub_20b(), "num_hidden_layers": 36, "num_local_experts": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 18}
    assert CONFIG.from_hf(hub_120b) == PRESETS["gpt-oss-120b"]
    assert PRESETS["gpt-oss-20b"].rope_scaling == YARN
    # transformers' own defaults for the keys the hub file leaves out agree with ours.
    hf = transformers.GptOssConfig(num_hidden_layers=24, num_local_experts=32)
    ours = PRESETS["gpt-oss-20b"]
    assert (hf.swiglu_alpha, hf.swiglu_limit, hf.head_dim, hf.sliding_window) == (
        ours.swiglu_alpha, ours.swiglu_limit, ours.head_dim, ours.sliding_window)
    assert tuple(hf.layer_types) == ours.layer_types


def test_build_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_hub_20b()))
    assert model_file_for_hf(read_hf_config(tmp_path)).CONFIG is GptOssConfig


@pytest.mark.parametrize("change, words", [
    ({"quantization_config": {"quant_method": "mxfp4"}}, "mxfp4.*bf16"),
    ({"layer_types": ["sliding_attention", "chunked_attention"] * 12}, "chunked_attention"),
    ({"layer_types": ["full_attention"] * 23}, "23 entries for 24 layers"),
    ({"sliding_window": None}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"num_local_experts": None}, "num_local_experts"),
    ({"num_experts_per_tok": 33, "experts_per_token": 33}, "num_experts_per_tok"),
    ({"num_key_value_heads": 7}, "num_kv_heads"),
    ({"swiglu_limit": 0.0}, "swiglu_limit"),
])
def test_from_hf_refuses_what_it_cannot_build(change, words):
    with pytest.raises(ValueError, match=words):
        CONFIG.from_hf({**_hub_20b(), **change})


def test_config_replace_revalidates():
    with pytest.raises(ValueError, match="sliding_window"):
        dataclasses.replace(PRESETS["tiny"], sliding_window=0)
    full = dataclasses.replace(PRESETS["tiny"], sliding_window=0,
                               layer_types=("full_attention",) * 2)
    assert [full.window(i) for i in range(2)] == [0, 0]


def test_tiny_preset_builds_and_runs():
    from tscompile.runtime import load_model
    from tscompile.runtime.offline import PagedRunner, generate
    from tscompile.runtime.protocol import SamplingParams
    model, cfg = load_model("gpt_oss", preset="tiny", dummy_weights=True)
    out = generate(PagedRunner(model, page_size=4, num_blocks=16), list(range(1, 11)),
                   SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out) == 4 and all(0 <= t < cfg.vocab_size for t in out)
