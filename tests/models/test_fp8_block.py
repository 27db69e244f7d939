"""Block-scaled FP8 weights (issue 19, first slice): a tiny random Qwen3 checkpoint made by
`tscompile quantize --fp8-block`, compiled and loaded slice by slice at TP 1 and 2, against
the same model with its weights dequantized to fp32 (the oracle: transformers on the
dequantized checkpoint, and our compiled program on it)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.cli import main
from tscompile.kernels.fp8 import dequantize_fp8_block, fp8_block_linear, quantize_fp8_block
from tscompile.runtime.distributed import StepsJob, run_steps

from .parity import hf_greedy_tokens

STEPS = 32


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(fp32 checkpoint, its FP8 block copy, that copy dequantized to fp32)."""
    torch.manual_seed(19)
    cfg = transformers.Qwen3Config(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=256,
        tie_word_embeddings=False)
    root = tmp_path_factory.mktemp("fp8")
    transformers.Qwen3ForCausalLM(cfg).eval().save_pretrained(root / "fp32")
    assert main(["quantize", str(root / "fp32"), "--fp8-block", "-o", str(root / "fp8")]) == 0
    config = json.loads((root / "fp8" / "config.json").read_text())
    tensors = load_file(root / "fp8" / "model.safetensors")
    deq = {k: dequantize_fp8_block(v, tensors[k + "_scale_inv"], [128, 128])
           if v.dtype == torch.float8_e4m3fn else v
           for k, v in tensors.items() if not k.endswith("_scale_inv")}
    (root / "deq").mkdir()
    save_file(deq, root / "deq" / "model.safetensors", metadata={"format": "pt"})
    del config["quantization_config"]
    (root / "deq" / "config.json").write_text(json.dumps(config))
    return root / "fp32", root / "fp8", root / "deq"


def test_kernel_matches_dequantized_linear():
    w = torch.randn(200, 300) * 0.05                 # neither dim a multiple of 128
    q, s = quantize_fp8_block(w, [128, 128])
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s.dtype == torch.float32
    deq = dequantize_fp8_block(q, s, [128, 128])
    assert (deq - w).norm() / w.norm() < 0.05        # e4m3: 3 mantissa bits
    x, b = torch.randn(5, 300), torch.randn(200)
    torch.testing.assert_close(fp8_block_linear(x, q, s, b, [128, 128]),
                               torch.nn.functional.linear(x, deq, b))


def test_quantize_writes_the_shipped_format(ckpts):
    _, fp8, _ = ckpts
    q = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128]
    assert {"lm_head", "model.embed_tokens"} <= set(q["modules_to_not_convert"])
    t = load_file(fp8 / "model.safetensors")
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert t["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 4)   # [256, 512]
    assert t["lm_head.weight"].dtype == torch.float32
    assert t["model.layers.0.input_layernorm.weight"].dtype == torch.float32


def test_manifest_records_stored_precision(ckpts):
    _, fp8, deq = ckpts
    m = build("qwen3", config=fp8, mesh=Mesh.build(2)).manifest
    t = m["tensors"]
    gate_up = "layers.0.mlp.gate_up_proj"
    assert t[f"{gate_up}.weight"]["stored"] == "float8_e4m3fn"
    assert t[f"{gate_up}.weight_scale_inv"]["stored"] == "float32"
    # The fused [gate ; up] scale: two checkpoint pieces, split like its weight (S(0)x2).
    assert t[f"{gate_up}.weight_scale_inv"]["placement"] == t[f"{gate_up}.weight"]["placement"]
    assert [p[0] for p in t[f"{gate_up}.weight_scale_inv"]["pieces"]] == [
        "model.layers.0.mlp.gate_proj.weight_scale_inv",
        "model.layers.0.mlp.up_proj.weight_scale_inv"]
    assert t["layers.0.self_attn.o_proj.weight_scale_inv"]["placement"] == "S(1)"
    assert t["lm_head.weight"]["stored"] is None and t["embed_tokens.weight"]["stored"] is None
    assert len(m["quantization"]["quantized_tensors"]) == 2 * 6        # q k v o gate_up down
    plain = build("qwen3", config=deq, mesh=Mesh.build(2)).manifest["param_bytes_per_rank"]
    assert m["param_bytes_per_rank"]["bfloat16"] < 0.7 * plain["bfloat16"]


def test_straddling_block_is_an_error_naming_it(ckpts):
    _, fp8, _ = ckpts
    # k_proj is [4 heads * 64, 256]: at TP4 a rank holds 64 rows of a 128-row block.
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj\.weight .*rows "
                                         r"\[0, 64\).*weight_block_size \[128, 128\]"):
        build("qwen3", config=fp8, mesh=Mesh.build(4))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_fp8_program_matches_dequantized_model_tp1_tp2(ckpts, tmp_path, record_property):
    fp32, fp8, deq = ckpts
    prompt = torch.randint(0, 256, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    oracle = transformers.Qwen3ForCausalLM.from_pretrained(deq).eval()
    tokens = hf_greedy_tokens(oracle, prompt, STEPS)
    with torch.no_grad():
        hf_logits = oracle(torch.tensor([prompt + tokens])).logits[0, :-1]
    feeds = [[(0, prompt)]] + [[(0, [t])] for t in tokens[:-1]]

    def prog(weights, tp):
        path = tmp_path / f"{weights.name}_tp{tp}.tsprog"
        return str(build("qwen3", config=weights, mesh=Mesh.build(tp)).save(path))

    q1, d1 = [torch.cat(o) for o in run_steps(
        [StepsJob(prog(fp8, 1), feeds, weights=str(fp8)),
         StepsJob(prog(deq, 1), feeds, weights=str(deq))])]
    (q2,) = [torch.cat(o) for o in run_steps([StepsJob(prog(fp8, 2), feeds, weights=str(fp8))])]
    n = len(prompt)
    for name, ours in (("fp8 tp1", q1), ("fp8 tp2", q2)):
        cos = _cos(ours, hf_logits)
        greedy = ours[n - 1:].argmax(-1).tolist()
        record_property(f"{name} cosine", cos)
        assert cos >= 0.999, f"{name}: logits cosine {cos}"
        assert greedy == tokens, f"{name}: greedy tokens differ"
    # The FP8 path is exactly the dequantized model, at any TP degree.
    for name, diff in (("fp8 tp1 vs dequantized tp1", (q1 - d1).abs().max()),
                       ("fp8 tp2 vs dequantized tp1", (q2 - d1).abs().max()),
                       ("fp8 tp1 vs transformers", (q1 - hf_logits).abs().max())):
        record_property(name, float(diff))
        assert diff < 1e-4, f"{name}: logits differ by {float(diff)}"


def test_fp8_checkpoint_into_an_unquantized_program_is_refused(ckpts, tmp_path):
    from tscompile.runtime.program import RankProgram
    _, fp8, deq = ckpts
    prog = build("qwen3", config=deq, mesh=Mesh.build(1)).save(tmp_path / "plain.tsprog")
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.weight' is float8_e4m3fn"):
        RankProgram(prog, 0, weights=fp8)


def test_build_quant_makes_a_preset_fp8():
    """`tscompile build --quant fp8-block` (dummy-weight runs): every Linear but the LM head
    stored FP8, so the bytes per rank fall to about half."""
    plain = build("qwen3", preset="qwen3-0.6b", mesh=Mesh.build(1)).manifest
    m = build("qwen3", preset="qwen3-0.6b", mesh=Mesh.build(1), quant="fp8-block").manifest
    assert len(m["quantization"]["quantized_tensors"]) == 28 * 6   # q k v o gate_up down
    assert m["tensors"]["layers.3.self_attn.q_proj.weight"]["stored"] == "float8_e4m3fn"
    assert m["packed"] == {}                  # FP8 projections are not packed (yet)
    body = lambda x: sum(v for k, v in x["param_bytes_per_rank"].items())  # noqa: E731
    assert body(m) < 0.75 * body(plain)       # the tied 151936 x 1024 table stays bf16
    with pytest.raises(ValueError, match="--quant 'int3' is not supported"):
        build("qwen3", preset="qwen3-0.6b", mesh=Mesh.build(1), quant="int3")


def test_quant_on_a_quantized_config_is_refused(ckpts):
    _, fp8, _ = ckpts
    with pytest.raises(ValueError, match="already quantized .*drop --quant"):
        build("qwen3", config=fp8, mesh=Mesh.build(1), quant="fp8-block")


def test_a_weight_the_model_reads_directly_stays_unquantized():
    """Qwen3-MoE's router reads `gate.weight` for its fp32 matmul: an FP8 router weight
    would be used without its scales, so the build keeps that Linear unquantized and marks
    it for dequantization at load (should the checkpoint hold it in FP8)."""
    cfg = {"model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 256,
           "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 128, "num_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 128,
           "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    t = build(None, config=cfg, mesh=Mesh.build(1)).manifest["tensors"]
    gate = t["layers.0.mlp.gate.weight"]
    assert gate["stored"] is None and gate["dequantize"] == [128, 128]
    assert t["layers.0.self_attn.q_proj.weight"]["stored"] == "float8_e4m3fn"
    assert t["layers.0.self_attn.q_proj.weight"]["dequantize"] is None


def test_deepseek_v3_fp8_checkpoint_matches_its_dequantized_model(tmp_path):
    """DeepSeek-V3's FP8 format on a tiny MLA + MoE model: every Linear FP8 but the router,
    the routed experts too (`quantize --experts`), and `kv_b_proj`, which the MLA code reads
    itself (absorbed into the query and output). The experts and kv_b_proj load dequantized.
    Compiled at TP 1 and 2 against the dequantized checkpoint."""
    from .test_kimi_k25 import _randomise
    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
        initializer_range=0.2, num_mtp_layers=0, tie_word_embeddings=False,
        max_position_embeddings=128, rope_parameters={"rope_type": "default",
                                                      "rope_theta": 10000.0})
    torch.manual_seed(5)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    _randomise(model, 5)
    model.save_pretrained(tmp_path / "bf")
    assert main(["quantize", str(tmp_path / "bf"), "--fp8-block", "--experts",
                 "-o", str(tmp_path / "fp8")]) == 0
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    assert tensors["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    deq = {k: dequantize_fp8_block(v, tensors[k + "_scale_inv"], [128, 128])
           if v.dtype == torch.float8_e4m3fn else v
           for k, v in tensors.items() if not k.endswith("_scale_inv")}
    (tmp_path / "deq").mkdir()
    save_file(deq, tmp_path / "deq" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "deq" / "config.json").write_text(json.dumps(config))

    built = build("kimi_k25", config=tmp_path / "fp8", mesh=Mesh.build(1))
    t = built.manifest["tensors"]
    assert t["layers.0.self_attn.kv_b_proj.weight"]["dequantize"] == [128, 128]
    assert t["layers.1.mlp.w13"]["dequantize"] == [128, 128]
    assert t["layers.0.self_attn.q_b_proj.weight"]["stored"] == "float8_e4m3fn"
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(4)).tolist()
    feeds = [[(0, prompt)]] + [[(0, [t])] for t in (3, 77, 140, 9)]

    def prog(weights, tp):
        return str(build("kimi_k25", config=weights, mesh=Mesh.build(tp)).save(
            tmp_path / f"{weights.name}_tp{tp}.tsprog"))
    q1, d1 = [torch.cat(o) for o in run_steps(
        [StepsJob(prog(tmp_path / "fp8", 1), feeds, weights=str(tmp_path / "fp8")),
         StepsJob(prog(tmp_path / "deq", 1), feeds, weights=str(tmp_path / "deq"))])]
    (q2,) = [torch.cat(o) for o in run_steps(
        [StepsJob(prog(tmp_path / "fp8", 2), feeds, weights=str(tmp_path / "fp8"))])]
    for name, got in (("tp1", q1), ("tp2", q2)):
        diff = float((got - d1).abs().max())
        assert diff < 1e-4, f"fp8 {name} vs the dequantized model: {diff}"
