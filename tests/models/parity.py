"""Shared parity harness: our paged model vs Hugging Face `transformers` on the same weights.

The oracle is HF's greedy continuation (with its own cache) and the whole sequence run
through HF without a cache; ours runs prefill (optionally chunked) and then one decode step
per token through the paged KV cache. Logits must agree at every position within `ATOL`
(fp32), and our greedy tokens must equal HF's greedy tokens.
"""
from __future__ import annotations

import torch

from tscompile.runtime import load_model
from tscompile.runtime.offline import PagedRunner

ATOL = 1e-4


def save_hf(model, tmp_path_factory, name: str):
    """Save a transformers model as an HF checkpoint folder; returns (model, folder)."""
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return model, path


def hf_greedy_tokens(hf_model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation with transformers' own KV cache, argmax of the raw logits at
    every step (never stopping at, or masking, an end-of-sequence token)."""
    out, past, ids = [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            res = hf_model(ids, cache=past, use_cache=True)
            past = res.cache
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def hf_greedy(hf_model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """HF greedy continuation and HF logits (no cache) at every position of
    prompt + continuation."""
    tokens = hf_greedy_tokens(hf_model, prompt, steps)
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + tokens])).logits[0].float()
    return tokens, logits


def check_parity(hf_model, ckpt_dir, model_file: str, prompt: list[int], *, page_size: int,
                 steps: int = 16, prefill_chunk: int | None = None) -> float:
    """Returns the worst max-abs logit difference; asserts it is within ATOL."""
    hf_tokens, hf_logits = hf_greedy(hf_model, prompt, steps)
    model, _ = load_model(model_file, weights=ckpt_dir)
    runner = PagedRunner(model, page_size=page_size, num_blocks=64)
    sid = runner.add()
    chunk = prefill_chunk or len(prompt)
    ours = [runner.step([(sid, prompt[i:i + chunk])], all_logits=True)
            for i in range(0, len(prompt), chunk)]
    prefill = torch.cat(ours)
    worst = (prefill - hf_logits[: len(prompt)]).abs().max().item()
    assert worst < ATOL, f"prefill logits differ by {worst}"
    our_tokens = [int(prefill[-1].argmax())]
    for i, tok in enumerate(hf_tokens[:-1]):
        step_logits = runner.step([(sid, [tok])])[0]
        diff = (step_logits - hf_logits[len(prompt) + i]).abs().max().item()
        assert diff < ATOL, f"decode step {i}: logits differ by {diff}"
        worst = max(worst, diff)
        our_tokens.append(int(step_logits.argmax()))
    assert our_tokens == hf_tokens, f"greedy tokens differ:\nours {our_tokens}\nhf   {hf_tokens}"
    runner.free(sid)
    assert runner.allocator.num_free == runner.allocator.num_blocks  # no block leaked
    return worst
