"""CUDA graphs for decode steps: capture the compiled program once per batch bucket, replay.

What it is: `DecodeGraphs`, which owns static input buffers sized for the largest bucket
(token ids, positions, slots, sequence lengths, block tables at the full max_model_len
width), captures the program for every bucket size at start-up (largest first, one memory
pool), and replays the smallest bucket that holds a pure-decode step: a 36-layer model's
hundreds of kernel launches become one. `run_step` is the one forward call the engine and
the follower ranks use: a graph for the steps it covers, the program eagerly for the rest
(prefill chunks and mixed steps, whose token counts vary without bound).
What it is not: the scheduler or the sampler (they run outside the graph), or a fallback:
a capture that fails raises and names `--enforce-eager`.

Padding: a step of B decodes runs in bucket b >= B. Rows B..b-1 are padding: token 0 at
position 0, context length 1, block table [scratch, ...] and slot `scratch * page_size`,
where `scratch` is one KV block beyond the scheduler's pool (`num_blocks`): padding writes
and reads only that block, so no live sequence's cache is touched (kernels/paged.py).
The split-KV decode kernels size their grid from the block-table width, which here is the
full max_model_len, so the same graph serves every context length.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from tscompile.kernels import AttentionMetadata
from tscompile.runtime.step_io import StepInputs

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 up to 32, every 16 up to 128, every 32 beyond (vLLM-like:
    padding waste stays under ~25% while the capture count stays small)."""
    if max_batch < 1:
        raise ValueError(f"CUDA-graph batch size must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    s = 8
    while s < max_batch:
        sizes.append(s)
        s += 8 if s < 32 else 16 if s < 128 else 32
    return tuple(sizes) + (max_batch,)


class DecodeGraphs:
    def __init__(self, forward: Forward, *, max_batch: int, max_blocks: int, page_size: int,
                 scratch_block: int, device: torch.device | str,
                 sizes: Sequence[int] | None = None, capture: bool = True):
        """`capture=False` replays nothing and runs `forward` on the padded static buffers
        instead: the padding path without a GPU (tests), never a serving mode."""
        self.forward, self.page_size = forward, page_size
        self.device = torch.device(device)
        self.sizes = tuple(sorted(sizes or bucket_sizes(max_batch)))
        self.max_batch, self.max_blocks = self.sizes[-1], max_blocks
        self.scratch = scratch_block
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        n, dev = self.max_batch, self.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), scratch_block * page_size, dtype=torch.int64,
                                       device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32,
                                       device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0
        if capture:
            self._capture()

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(self.query_start_loc[: b + 1], self.seq_lens[:b],
                                 self.block_tables[:b], self.slot_mapping[:b],
                                 self.logits_indices[:b], num_decodes=b)

    def _run(self, b: int) -> torch.Tensor:
        return self.forward(self.input_ids[:b], self.positions[:b], self._meta(b))

    def _capture(self) -> None:
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.sizes):            # largest first: later ones reuse its pool
            try:
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    self._run(b)                  # compile/autotune outside the capture
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[b] = self._run(b)
            except Exception as e:
                raise RuntimeError(f"CUDA-graph capture of the decode step at batch {b} "
                                   f"failed ({type(e).__name__}: {e}); an op in the program "
                                   f"is not capturable. Serve with --enforce-eager.") from e
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        used = (free0 - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s, %.0f MiB",
                 len(self.sizes), ",".join(map(str, self.sizes)), time.perf_counter() - t0,
                 used)

    def covers(self, step: StepInputs) -> bool:
        m = step.meta
        b = m.num_seqs
        return (0 < b <= self.max_batch and m.num_decodes == b and step.input_ids.numel() == b
                and m.logits_indices.numel() == b and m.block_tables.shape[1] <= self.max_blocks)

    def __call__(self, step: StepInputs) -> torch.Tensor:
        """Logits [B, V] of a pure-decode step (see `covers`); valid until the next call."""
        m = step.meta
        b = m.num_seqs
        bucket = next(s for s in self.sizes if s >= b)
        pad = bucket - b
        ids, pos = step.input_ids.cpu().numpy(), step.positions.cpu().numpy()
        slots, lens = m.slot_mapping.cpu().numpy(), m.seq_lens.cpu().numpy()
        tables = m.block_tables.cpu().numpy()
        mb = tables.shape[1]
        table = np.full((bucket, mb), self.scratch, np.int32)
        table[:b] = tables
        self.input_ids[:bucket].copy_(torch.from_numpy(np.pad(ids, (0, pad))))
        self.positions[:bucket].copy_(torch.from_numpy(np.pad(pos, (0, pad))))
        self.slot_mapping[:bucket].copy_(torch.from_numpy(
            np.pad(slots, (0, pad), constant_values=self.scratch * self.page_size)))
        self.seq_lens[:bucket].copy_(torch.from_numpy(np.pad(lens, (0, pad),
                                                             constant_values=1)))
        self.block_tables[:bucket, :mb].copy_(torch.from_numpy(table))
        self.replays += 1
        if bucket not in self.graphs:             # capture=False: the padded eager run
            return self._run(bucket)[:b]
        self.graphs[bucket].replay()
        return self.outputs[bucket][:b]


def run_step(forward: Forward, graphs: DecodeGraphs | None, step: StepInputs,
             device: torch.device) -> torch.Tensor:
    """The rank's forward for one step: a captured graph when it covers the step, else the
    program eagerly on the step's tensors moved to `device`."""
    if graphs is not None and graphs.covers(step):
        return graphs(step)
    step = step.to(device)
    return forward(step.input_ids, step.positions, step.meta)
