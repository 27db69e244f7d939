"""The engine over two tensor-parallel ranks, as tsrun runs it on GPUs but on the CPU: step
inputs travel over a gloo side group (`set_control_group`), and both ranks run decode steps
padded into CUDA-graph buckets (`StepGraphs(capture=False)`: the same static buffers and
scratch-block padding, replayed eagerly). Greedy tokens equal each request run alone on the
single-device reference, and both ranks took the same number of padded steps. And a step that
fails on rank 0 at world 2 is fatal and loud: every request gets an error output, rank 0
exits non-zero, and rank 1 (blocked in the failed step's collective) exits too, not hangs.

The ranks are this file run as a script (one process each), as tests/kernels/test_collectives.py
does: a spawned child cannot import a test module loaded by pytest's importlib mode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.runtime import load_model
from tscompile.runtime.cuda_graphs import StepGraphs, run_step
from tscompile.runtime.distributed import free_port
from tscompile.runtime.engine import Engine, EngineConfig
from tscompile.runtime.kv_cache import bind_rank, kv_blocks
from tscompile.runtime.offline import PagedRunner, generate
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import AddRequest, SamplingParams
from tscompile.runtime.step_io import broadcast_step, follow_steps, set_control_group

SEED, MAX_LEN, PAGE = 3, 512, 4
PROMPTS = [list(range(3, 3 + k)) + [40 + k] * (k % 3) for k in (5, 9, 13)]
CFG = EngineConfig(page_size=PAGE, max_num_seqs=4, max_num_batched_tokens=16,
                   kv_cache_tokens=256)


def _rank_main(rank: int, port: int, prog: str, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    set_control_group(dist.new_group(backend="gloo"))
    program = RankProgram(prog, rank, dummy_seed=SEED)
    blocks = kv_blocks(CFG, program, torch.float32, torch.device("cpu"), MAX_LEN)

    def padded() -> StepGraphs:
        return StepGraphs(program, max_batch=4, max_blocks=MAX_LEN // PAGE, page_size=PAGE,
                            scratch_block=blocks, device="cpu", sizes=(2, 4),
                            prefill_sizes=(8, 16), capture=False)
    if rank == 0:
        eng = Engine(program, CFG, vocab_size=256, max_position_embeddings=MAX_LEN,
                     num_blocks=blocks)
        eng.graphs = padded()
        reqs = [AddRequest(f"r{i}", tuple(p), SamplingParams(max_tokens=5 + 2 * i,
                                                             temperature=0.0))
                for i, p in enumerate(PROMPTS)]
        tokens: dict[str, list[int]] = {r.rid: [] for r in reqs}
        for r in reqs:
            assert eng.add(r) is None
        while eng.has_work:
            for o in eng.step():
                tokens[o.rid] += o.token_ids
        broadcast_step(None)
        result = {"tokens": tokens, "replays": eng.graphs.replays}
    else:
        assert bind_rank(program, CFG, blocks, MAX_LEN, torch.float32,
                         torch.device("cpu")) is None          # no graphs on the CPU
        graphs = padded()
        follow_steps(lambda step: run_step(program, graphs, step, torch.device("cpu")))
        result = {"replays": graphs.replays}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _two_ranks(tmp_path: Path, *mode: str, timeout: float) -> tuple[list[int], str]:
    """This file as a script on ranks 0 and 1 of a tp-2 tiny Llama: exit codes, both logs."""
    prog = build("llama", preset="tiny", mesh=Mesh.build(2)).save(tmp_path / "tp2.tsprog")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), str(prog),
                               str(tmp_path), *mode], stdout=logs[r], stderr=subprocess.STDOUT,
                              env=env)
             for r in range(2)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]      # a hang fails here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes, "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2))


def test_two_ranks_padded_decode_over_a_side_group_equal_each_request_alone(tmp_path):
    codes, text = _two_ranks(tmp_path, timeout=300)
    assert codes == [0, 0], text
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["replays"] == got[1]["replays"] > 0
    model, _ = load_model("llama", preset="tiny", dummy_weights=True, seed=SEED)
    for i, p in enumerate(PROMPTS):
        runner = PagedRunner(model, page_size=PAGE, num_blocks=64)
        want = generate(runner, list(p), SamplingParams(max_tokens=5 + 2 * i, temperature=0.0))
        assert got[0]["tokens"][f"r{i}"] == want


class _FileQueue:
    """Stands in for tsrun's output queue to the API process: each message, pickled, to a file."""

    def __init__(self, path: Path):
        self.path = path

    def put(self, msg) -> None:
        import pickle
        with open(self.path, "ab") as f:
            pickle.dump(msg, f)
            f.flush()

    def close(self) -> None:
        pass

    def join_thread(self) -> None:
        pass


def _served_rank_failing(rank: int, port: int, prog: str, out: Path) -> None:
    """tsrun's own rank main (runtime/serve.py), rank 0's first forward raising."""
    import queue

    import tscompile.runtime.engine as engine_mod
    from tscompile.runtime import serve

    def broken(*args, **kw):
        raise RuntimeError("injected failure on rank 0")
    requests: queue.Queue = queue.Queue()
    if rank == 0:
        engine_mod.run_step = broken
        for i, p in enumerate(PROMPTS[:2]):
            params = SamplingParams(max_tokens=4, temperature=0.0)
            requests.put(AddRequest(f"r{i}", tuple(p), params))
    cfg = serve.ServeConfig(program=prog, dummy_weights=True, seed=SEED, threads_per_rank=1,
                            engine=CFG)
    serve._rank_main(rank, 2, port, cfg, (), requests, _FileQueue(out / f"outputs{rank}.pkl"),
                     os.getppid())


def test_a_failed_step_at_world_two_is_fatal_and_stops_both_ranks(tmp_path):
    import pickle

    from tscompile.runtime.protocol import StepOutputs
    codes, text = _two_ranks(tmp_path, "fail", timeout=120)
    assert codes[0] == 1 and codes[1] != 0, text
    assert "a step failed at world 2" in text
    msgs = []
    with open(tmp_path / "outputs0.pkl", "rb") as f:
        while True:
            try:
                msgs.append(pickle.load(f))
            except EOFError:
                break
    outs = [o for m in msgs if isinstance(m, StepOutputs) for o in m.outputs]
    assert sorted(o.rid for o in outs) == ["r0", "r1"]
    assert all(o.finish_reason == "error" and "injected failure on rank 0" in o.error
               for o in outs)


if __name__ == "__main__":
    main = _served_rank_failing if sys.argv[5:] == ["fail"] else _rank_main
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
