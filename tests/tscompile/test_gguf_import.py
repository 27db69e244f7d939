"""Tests for tscompile.gguf_import: GGUF (llama) -> Hugging Face folder.

The oracle is transformers' own GGUF reader, which dequantizes and undoes llama.cpp's Q/K
permutation independently of our code. `AutoModelForCausalLM.from_pretrained(gguf_file=...)`
refuses to run without the `accelerate` package (not a dependency of ours), so the weight
oracle calls the function it uses internally, `load_gguf_checkpoint`, directly; the config
and tokenizer oracles use the public `gguf_file=` path, which needs no accelerate.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import safetensors.torch
import torch

import transformers  # noqa: E402

from tscompile.gguf_import import import_gguf, smollm2_gguf_path, unpermute_qk  # noqa: E402

TEXTS = [
    "Hello world",
    "1234567 + 89 = 3.14159, year 2024",
    "  leading  spaces\ttab\n\nnew lines  ",
    "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\nHi<|im_end|>",
    "héllo wörld — 你好 🙂 ñ",
]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    """A directory holding only a symlink to the SmolLM2 GGUF (transformers wants dir + name)."""
    d = tmp_path_factory.mktemp("gguf")
    (d / "model.gguf").symlink_to(smollm2_gguf_path())
    return d


@pytest.fixture(scope="module")
def hf_dir(smollm2_dir):
    return smollm2_dir  # session fixture in tests/conftest.py: import_gguf of the real file


@pytest.fixture(scope="module")
def model(smollm2_hf):
    return smollm2_hf


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def oracle_tokenizer(gguf_dir):
    return transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")


def test_config_matches_transformers_gguf_config(hf_dir, gguf_dir, model):
    ref = transformers.AutoConfig.from_pretrained(gguf_dir, gguf_file="model.gguf")
    ours = model.config
    for key in [
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
        "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ]:
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours.tie_word_embeddings  # SmolLM2 has no output.weight
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_weights_equal_transformers_gguf_loader(hf_dir, gguf_dir, model):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers maps GGUF names through a model's state_dict; a meta-device model is enough.
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(model.config)
    ref = load_gguf_checkpoint(str(gguf_dir / "model.gguf"), return_tensors=True, model_to_load=skeleton)
    ref = {k: torch.as_tensor(np.asarray(v)) for k, v in ref["tensors"].items()}
    ours = safetensors.torch.load_file(hf_dir / "model.safetensors")
    with safetensors.safe_open(hf_dir / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: lm_head is not stored
    assert len(ours) == 2 + 9 * 30
    for name, t in ours.items():
        assert t.dtype == torch.float32 and t.is_contiguous(), name
        torch.testing.assert_close(t, ref[name].float(), rtol=0, atol=1e-6, msg=name)
    # The loaded model really uses them (no silently re-initialised tensor).
    sd = model.state_dict()
    for name, t in ours.items():
        assert torch.equal(sd[name], t), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_matches_transformers_gguf_tokenizer(tokenizer, oracle_tokenizer, hf_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == oracle_tokenizer(text).input_ids, text
        assert ids == raw.encode(text).ids, text
        assert tokenizer.decode(ids) == text
    # smollm pre-tokenizer: one token per digit; chat markers are single special ids, no BOS.
    assert tokenizer("2024").input_ids == [tokenizer.convert_tokens_to_ids(c) for c in "2024"]
    assert tokenizer("<|im_start|>user\nHi<|im_end|>").input_ids[0] == 1
    assert tokenizer("Hi").input_ids == oracle_tokenizer("Hi").input_ids and len(tokenizer("Hi").input_ids) == 1
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.decode([1, 28120, 2], skip_special_tokens=True) == oracle_tokenizer.decode(
        [1, 28120, 2], skip_special_tokens=True
    )
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        oracle_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )


def test_greedy_generation_is_coherent(model, tokenizer):
    # A wrong Q/K permutation scrambles rotary positions and the answer turns to noise.
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in text, text


# ---- tiny synthetic GGUFs: permutation round trip, dtype, untied head, errors ----


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf `permute` (HF rotate-half rows -> GGML interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_llama(path, *, arch="llama", drop=()):
    """1-layer GQA llama (hidden 8, 2 heads, 1 kv head, head_dim 4) with an untied output."""
    rng = np.random.default_rng(0)
    hf = {  # HF layout (out, in)
        "token_embd.weight": rng.standard_normal((6, 8)),
        "output_norm.weight": rng.standard_normal(8),
        "output.weight": rng.standard_normal((6, 8)),
        "blk.0.attn_norm.weight": rng.standard_normal(8),
        "blk.0.ffn_norm.weight": rng.standard_normal(8),
        "blk.0.attn_q.weight": rng.standard_normal((8, 8)),
        "blk.0.attn_k.weight": rng.standard_normal((4, 8)),
        "blk.0.attn_v.weight": rng.standard_normal((4, 8)),
        "blk.0.attn_output.weight": rng.standard_normal((8, 8)),
        "blk.0.ffn_gate.weight": rng.standard_normal((16, 8)),
        "blk.0.ffn_up.weight": rng.standard_normal((16, 8)),
        "blk.0.ffn_down.weight": rng.standard_normal((8, 16)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(["<|endoftext|>", "<x>", "a", "b", "ab", "Ġ"])
    w.add_token_types([3, 4, 1, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    for name, t in hf.items():
        if name not in drop:
            perm = {"blk.0.attn_q.weight": 2, "blk.0.attn_k.weight": 1}.get(name)
            w.add_tensor(name, _permute(t, perm) if perm else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)  # 3 heads of head_dim 4
    assert np.array_equal(unpermute_qk(_permute(w, 3), 3), w)
    assert not np.array_equal(_permute(w, 3), w)


def test_tiny_llama_roundtrip_bf16_untied(tmp_path):
    hf = _tiny_llama(tmp_path / "tiny.gguf")
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", dtype=torch.bfloat16)
    sd = safetensors.torch.load_file(out / "model.safetensors")
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    expect = torch.from_numpy(hf["blk.0.attn_q.weight"]).bfloat16()
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], expect)
    expect = torch.from_numpy(hf["blk.0.attn_k.weight"]).bfloat16()
    assert torch.equal(sd["model.layers.0.self_attn.k_proj.weight"], expect)
    assert torch.equal(sd["lm_head.weight"], torch.from_numpy(hf["output.weight"]).bfloat16())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("ab<x>ab").input_ids == [4, 1, 4]  # user-defined token matched whole
    assert tok.decode([0, 4], skip_special_tokens=True) == "ab"  # control token is special


def test_non_llama_architecture_is_named(tmp_path):
    _tiny_llama(tmp_path / "g.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        import_gguf(tmp_path / "g.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tmp_path):
    _tiny_llama(tmp_path / "m.gguf", drop=("blk.0.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing tensor.*blk\.0\.ffn_up\.weight"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
