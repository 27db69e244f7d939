from __future__ import annotations

import pytest
import torch
import transformers

from .parity import check_parity, save_hf


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return save_hf(model, tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def hf_llama_tied_llama3(tmp_path_factory):
    """SmolLM2-like: tied embeddings; plus Llama 3.1 rope scaling and an explicit head_dim."""
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32})
    model = transformers.LlamaForCausalLM(cfg).eval()
    return save_hf(model, tmp_path_factory, "llama_tied")


# Prompt lengths: 16 ends exactly on a page boundary for both page sizes; 13 does not.
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("prompt_len", [13, 16])
def test_llama_parity(hf_llama, page_size, prompt_len):
    model, path = hf_llama
    prompt = torch.randint(0, 128, (prompt_len,), generator=torch.Generator().manual_seed(3))
    check_parity(model, path, "llama", prompt.tolist(), page_size=page_size)


def test_llama_tied_llama3_rope_chunked_prefill(hf_llama_tied_llama3):
    model, path = hf_llama_tied_llama3
    prompt = torch.randint(0, 96, (21,), generator=torch.Generator().manual_seed(4)).tolist()
    # Chunks of 8 over pages of 4: each chunk attends to a cached prefix plus itself.
    check_parity(model, path, "llama", prompt, page_size=4, prefill_chunk=8)
