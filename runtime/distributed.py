"""Running a compiled program on N ranks as N local processes (gloo on the CPU, NCCL on
GPUs): process launch, the process group, and offline generation where rank 0 samples and
broadcasts each token so every rank feeds the same ids.

What it is: the launcher `tscompile generate prog.tsprog` and the tests use. What it is not:
the server (tsrun, runtime/server) or a scheduler; one request at a time.
"""
from __future__ import annotations

import io
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tscompile.runtime.offline import PagedRunner, generate
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import SamplingParams
from tscompile.tsprog import read_tsprog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple,
            queue: Any) -> None:
    torch.set_num_threads(1)
    try:
        if world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                    rank=rank, world_size=world)
        out = fn(rank, *args)
        # Bytes, not tensors: a tensor in a queue is shared through a file descriptor that
        # dies with this process, which may exit before the parent reads it.
        buf = io.BytesIO()
        torch.save(out if rank == 0 else None, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException as e:       # report, never hang the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 600) -> Any:
    """Run `fn(rank, *args)` in `world` fresh processes with a process group; return rank
    0's result. `fn` must be importable (a module-level function)."""
    if world == 1:
        return fn(0, *args)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    result, errors = None, []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}: {value}")
                break
            if rank == 0:
                result = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return result


def _broadcast_token(token: int) -> int:
    if not dist.is_initialized():
        return token
    t = torch.tensor([token], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t[0])


def _generate_rank(rank: int, prog: str, weights: str | None, dummy_seed: int | None,
                   dtype: torch.dtype, prompt_ids: list[int], params: SamplingParams,
                   page_size: int) -> list[int]:
    program = RankProgram(prog, rank, weights=weights, dummy_seed=dummy_seed, dtype=dtype)
    blocks = -(-(len(prompt_ids) + params.max_tokens) // page_size) + 1
    runner = PagedRunner(program, page_size=page_size, num_blocks=blocks, dtype=dtype)
    return generate(runner, prompt_ids, params, agree=_broadcast_token)


def generate_compiled(prog: str | Path, prompt_ids: list[int], params: SamplingParams, *,
                      weights: str | Path | None = None, dummy_seed: int | None = None,
                      dtype: torch.dtype = torch.float32, page_size: int = 16) -> list[int]:
    """Greedy/sampled generation with a compiled program on its world of CPU processes."""
    world = read_tsprog(prog).world_size
    return run_on_ranks(world, _generate_rank, str(prog), None if weights is None else
                        str(weights), dummy_seed, dtype, list(prompt_ids), params, page_size)


@dataclass(frozen=True, slots=True)
class StepsJob:
    """Fixed steps [(sequence, new tokens)] to feed through one compiled program."""
    prog: str
    feeds: list[list[tuple[int, list[int]]]]
    weights: str | None = None
    dummy_seed: int | None = None
    page_size: int = 4
    num_blocks: int = 64


def _steps_rank(rank: int, jobs: list[StepsJob]) -> list[list[torch.Tensor]]:
    out = []
    for job in jobs:
        program = RankProgram(job.prog, rank, weights=job.weights, dummy_seed=job.dummy_seed)
        runner = PagedRunner(program, page_size=job.page_size, num_blocks=job.num_blocks)
        for _ in sorted({sid for step in job.feeds for sid, _ in step}):
            runner.add()
        out.append([runner.step(step, all_logits=True) for step in job.feeds])
    return out


def run_steps(jobs: list[StepsJob]) -> list[list[torch.Tensor]]:
    """Run each job's steps through its compiled program on all ranks (one launch for all
    jobs; their programs must share a world size). Per job, rank 0's logits per step for
    every fed token. The parity tests' entry point."""
    worlds = {read_tsprog(j.prog).world_size for j in jobs}
    if len(worlds) != 1:
        raise ValueError(f"run_steps: programs of different world sizes {sorted(worlds)}")
    return run_on_ranks(worlds.pop(), _steps_rank, list(jobs))
