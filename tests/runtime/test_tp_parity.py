"""The compiled program at TP/EP 1, 2 and 4 (gloo CPU processes) against the single-device
eager model: logits for every fed token over a prefill step, a mixed prefill-chunk +
decode step and 8 decode steps, within 1e-4 (fp32). One process launch per world size runs
every configuration of that size. Weights: the deterministic dummy weights, which each rank
loads as slices of the same full tensors (runtime/shards.py), plus real safetensors
checkpoints read slice by slice (tiny Llama; SmolLM2-135M's real weights)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.models.checkpoint import loadable_tensors, resolve
from tscompile.runtime import load_model
from tscompile.runtime.distributed import StepsJob, generate_compiled, run_steps
from tscompile.runtime.offline import PagedRunner
from tscompile.runtime.protocol import SamplingParams

from ..models.parity import hf_greedy_tokens
from .test_shards import save

ATOL = 1e-4
SEED = 5
ARCH = str(Path(__file__).parents[1] / "passes" / "mixtral_style.py")

# world -> [(id, model, preset, mesh kwargs)]
CONFIGS: dict[int, list[tuple[str, str, str, dict]]] = {
    1: [("llama", "llama", "tiny", {}), ("qwen3", "qwen3", "tiny", {}),
        ("qwen3-moe", "qwen3", "tiny-moe", {}), ("kimi", "kimi_k25", "tiny", {}),
        ("arch", ARCH, "tiny", {})],
    2: [("llama-tp2", "llama", "tiny", {}), ("qwen3-tp2", "qwen3", "tiny", {}),
        ("qwen3-moe-tp2", "qwen3", "tiny-moe", {}), ("qwen3-moe-ep2", "qwen3", "tiny-moe",
                                                     {"moe_ep": 2}),
        ("kimi-tp2", "kimi_k25", "tiny", {}), ("kimi-ep2", "kimi_k25", "tiny", {"moe_ep": 2}),
        ("arch-tp2", ARCH, "tiny", {}), ("llama-attn1-tp2", "llama", "tiny", {"attn_tp": 1})],
    4: [("llama-tp4", "llama", "tiny", {}), ("qwen3-tp4", "qwen3", "tiny", {}),
        ("qwen3-moe-tp4", "qwen3", "tiny-moe", {}), ("qwen3-moe-ep4", "qwen3", "tiny-moe",
                                                     {"moe_ep": 4}),
        ("kimi-attn4-moe-tp4", "kimi_k25", "tiny", {}),
        ("kimi-attn4-moe-ep4", "kimi_k25", "tiny", {"moe_ep": 4})],
}


def feeds(vocab: int) -> list[list[tuple[int, list[int]]]]:
    """Two sequences: prefills across a page boundary (page 4), then a mixed step (one
    decode + one 5-token prefill chunk), then 8 decode steps."""
    ids = [(7 * i + 3) % vocab for i in range(40)]
    steps = [[(0, ids[:13]), (1, ids[13:19])], [(0, [ids[19]]), (1, ids[20:25])]]
    steps += [[(0, [ids[25 + i]]), (1, [ids[33 - i]])] for i in range(8)]
    return steps


def eager(model: str, preset: str, steps) -> list[torch.Tensor]:
    net, _ = load_model(model, preset=preset, dummy_weights=True, seed=SEED)
    runner = PagedRunner(net, page_size=4, num_blocks=64)
    runner.add(), runner.add()
    return [runner.step(s, all_logits=True) for s in steps]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """world -> {config id: worst max-abs logit difference}, computed on first use."""
    cache: dict[int, dict[str, float]] = {}

    def get(world: int) -> dict[str, float]:
        if world not in cache:
            root = tmp_path_factory.mktemp(f"world{world}")
            jobs, refs = [], []
            for cid, model, preset, kw in CONFIGS[world]:
                prog = build(model, preset=preset, mesh=Mesh.build(world, **kw)).save(
                    root / f"{cid}.tsprog")
                cfg = load_model(model, preset=preset, dummy_weights=True)[1]
                steps = feeds(cfg.vocab_size)
                jobs.append(StepsJob(str(prog), steps, dummy_seed=SEED))
                refs.append(eager(model, preset, steps))
            got = run_steps(jobs)
            cache[world] = {
                cid: max(float((a - b).abs().max()) for a, b in zip(ref, out))
                for (cid, *_), ref, out in zip(CONFIGS[world], refs, got)}
        return cache[world]
    return get


@pytest.mark.parametrize("world,cid", [(w, c[0]) for w, cs in CONFIGS.items() for c in cs])
def test_compiled_matches_single_device(results, world, cid):
    worst = results(world)[cid]
    assert worst < ATOL, f"{cid}: logits differ from the single-device model by {worst}"


def _hf_checkpoint(model, folder: Path) -> Path:
    """The model's tensors under their checkpoint names (the CHECKPOINT_MAP inverted)."""
    full = loadable_tensors(model)
    return save(folder, {p.ckpt: full[p.param][p.index].clone()
                         for p in resolve(model, type(model).CHECKPOINT_MAP)}, files=2)


def test_compiled_loads_slices_from_safetensors(tmp_path):
    net, cfg = load_model("kimi_k25", preset="tiny", dummy_weights=True, seed=SEED)
    ckpt = _hf_checkpoint(net, tmp_path / "ckpt")
    steps = feeds(cfg.vocab_size)
    runner = PagedRunner(net, page_size=4, num_blocks=64)
    runner.add(), runner.add()
    ref = [runner.step(s, all_logits=True) for s in steps]
    jobs = [StepsJob(str(build("kimi_k25", preset="tiny", mesh=Mesh.build(2, **kw)).save(
        tmp_path / f"{i}.tsprog")), steps, weights=str(ckpt)) for i, kw in
        enumerate(({}, {"moe_ep": 2}))]
    for out in run_steps(jobs):
        worst = max(float((a - b).abs().max()) for a, b in zip(ref, out))
        assert worst < ATOL, worst


def test_smollm2_real_weights_tp2_greedy_equals_transformers(smollm2_dir, smollm2_hf,
                                                              tmp_path):
    """SmolLM2-135M has 9 query / 3 KV heads: attention stays replicated (attn-tp 1), the
    MLPs split over 2 ranks; 24 greedy tokens equal transformers' greedy tokens."""
    from tscompile.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    prog = build("llama", preset="smollm2-135m", mesh=Mesh.build(2, attn_tp=1)).save(
        tmp_path / "smollm2.tsprog")
    ours = generate_compiled(prog, prompt, SamplingParams(max_tokens=24, temperature=0.0),
                             weights=smollm2_dir)
    assert ours == hf_greedy_tokens(smollm2_hf, prompt, 24)
