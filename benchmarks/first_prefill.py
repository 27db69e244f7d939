"""The first long prefill after start-up against a warm one (Triton compiles on first use).

What it measures: engine start-up (weights, KV pool profile run, warm-up step, decode
graphs), then the time to the first token of a P-token prompt, twice: the first request after
start-up and a second one with a different prompt (no prefix hit), both alone on the engine.
A first prefill much slower than the second means a kernel compiled on the request's path.

    python -m benchmarks.first_prefill --model kimi_k25 --preset moonlight-16b-a3b \\
        [--prompt-tokens 7168] [--max-num-batched-tokens 8192] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.kernels import REGISTRY
from tscompile.runtime.engine import Engine, EngineConfig
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import AddRequest, SamplingParams


def time_to_first_token(eng: Engine, rid: str, prompt: tuple[int, ...]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    assert eng.add(AddRequest(rid, prompt, params)) is None
    while not any(o.rid == rid and o.token_ids for o in eng.step()):
        pass
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="kimi_k25")
    ap.add_argument("--preset", default="moonlight-16b-a3b")
    ap.add_argument("--prompt-tokens", type=int, default=7168)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--out")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = build(a.model, preset=a.preset, mesh=Mesh.build(1)).save(
        Path(tempfile.mkdtemp()) / f"{a.preset}.tsprog")
    t0 = time.perf_counter()
    program = RankProgram(path, 0, dummy_seed=0, dtype=torch.bfloat16, device="cuda")
    load_s = time.perf_counter() - t0
    vocab = program.config.vocab_size
    max_len = a.prompt_tokens + 64
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=a.max_num_batched_tokens,
                       max_model_len=max_len, kv_cache_tokens=4 * max_len)
    t0 = time.perf_counter()
    eng = Engine(program, cfg, vocab_size=vocab, max_position_embeddings=max_len,
                 dtype=torch.bfloat16, device="cuda")
    engine_s = time.perf_counter() - t0
    prompts = [tuple((k * 7919 + 13 * j) % vocab for j in range(a.prompt_tokens))
               for k in (1, 2)]
    first = time_to_first_token(eng, "first", prompts[0])
    second = time_to_first_token(eng, "second", prompts[1])
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "model": f"{a.model}:{a.preset}", "prompt_tokens": a.prompt_tokens,
              "max_num_batched_tokens": a.max_num_batched_tokens,
              "dummy_weight_load_s": round(load_s, 2), "engine_start_s": round(engine_s, 2),
              "first_ttft_s": round(first, 3), "second_ttft_s": round(second, 3),
              "kernels": REGISTRY.selections()}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
