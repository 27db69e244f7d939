"""One step's model inputs: built from the scheduler's plan arrays on the engine rank and
broadcast to the other tensor-parallel ranks, so every rank runs the compiled program on
the same tokens and metadata (one scheduler per replica; ranks never plan on their own).

What it is: `StepInputs` (the forward contract's inputs as tensors), `from_plan()`, and a
two-message broadcast (a fixed header, then one int64 payload) over the control group: host
memory over gloo, the default group on the CPU; on GPUs the default group is NCCL (device
tensors only), so serving names a gloo side group with `set_control_group`. What it is not:
the scheduler, the sampler, or CUDA-graph buffers (runtime/cuda_graphs.py copies these into
its static buffers).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tscompile.kernels import AttentionMetadata

_HEADER = 6          # command, T, B, S, num_decodes, max_blocks
_RUN, _STOP = 1, 2
_control_group: Any = None      # None: the default group (gloo on the CPU)


def set_control_group(group: Any) -> None:
    """The process group (gloo) that carries step inputs when the default one is NCCL."""
    global _control_group
    _control_group = group


def control_group() -> Any:
    return _control_group


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor       # [T] int64
    positions: torch.Tensor       # [T] int64
    meta: AttentionMetadata

    @classmethod
    def from_plan(cls, plan: dict[str, Any], block_table: np.ndarray, page_size: int,
                  device: torch.device | str = "cpu") -> StepInputs:
        q = plan["query_lens"].astype(np.int32)
        qsl = np.zeros(len(q) + 1, np.int32)
        np.cumsum(q, out=qsl[1:])
        seq_lens = plan["seq_lens"].astype(np.int32)
        max_blocks = int(-(-seq_lens.max() // page_size))
        tables = block_table[plan["slots"], :max_blocks]           # a gather: a copy
        rows = plan["sample"] == 1
        spec = plan.get("spec_lens")
        if spec is None or not spec.any():
            logits_indices = (qsl[1:] - 1)[rows].astype(np.int64)
        else:       # a verify row samples all of its 1 + k positions, in order
            k = spec[rows].astype(np.int64)
            last = (qsl[1:] - 1)[rows].astype(np.int64)
            n = k + 1
            start = np.repeat(last - k - np.cumsum(n) + n, n)
            logits_indices = start + np.arange(int(n.sum()), dtype=np.int64)
        t = torch.from_numpy
        meta = AttentionMetadata(t(qsl), t(seq_lens), t(np.ascontiguousarray(tables)),
                                 t(plan["slot_mapping"]), t(logits_indices),
                                 int(plan["num_decodes"]))
        return cls(t(plan["input_ids"].astype(np.int64)), t(plan["positions"].astype(np.int64)),
                   meta).to(device)

    def to(self, device: torch.device | str) -> StepInputs:
        if torch.device(device) == self.input_ids.device:
            return self
        return StepInputs(self.input_ids.to(device), self.positions.to(device),
                          self.meta.to(device))


def _pack(s: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    m = s.meta
    b, max_blocks = m.block_tables.shape
    header = torch.tensor([_RUN, s.input_ids.numel(), b, m.logits_indices.numel(),
                           m.num_decodes, max_blocks], dtype=torch.int64)
    payload = torch.cat([s.input_ids, s.positions, m.slot_mapping, m.query_start_loc.long(),
                         m.seq_lens.long(), m.block_tables.reshape(-1).long(),
                         m.logits_indices]).cpu()
    return header, payload


def _unpack(header: torch.Tensor, payload: torch.Tensor) -> StepInputs:
    _, t, b, s, num_decodes, max_blocks = (int(x) for x in header)
    sizes = [t, t, t, b + 1, b, b * max_blocks, s]
    ids, pos, slot_mapping, qsl, seq_lens, tables, logits_indices = payload.split(sizes)
    meta = AttentionMetadata(qsl.int(), seq_lens.int(), tables.int().view(b, max_blocks),
                             slot_mapping, logits_indices, num_decodes)
    return StepInputs(ids, pos, meta)


def broadcast_step(step: StepInputs | None) -> StepInputs | None:
    """On rank 0: send `step` (None: tell the other ranks to stop) and return it. On the
    other ranks: receive the next step, or None at shutdown. No-op in a world of one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return step
    if dist.get_rank() == 0:
        if step is None:
            dist.broadcast(torch.tensor([_STOP, 0, 0, 0, 0, 0], dtype=torch.int64), src=0,
                           group=_control_group)
            return None
        header, payload = _pack(step)
        dist.broadcast(header, src=0, group=_control_group)
        dist.broadcast(payload, src=0, group=_control_group)
        return step
    header = torch.empty(_HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0, group=_control_group)
    if int(header[0]) == _STOP:
        return None
    t, b, s, max_blocks = int(header[1]), int(header[2]), int(header[3]), int(header[5])
    payload = torch.empty(3 * t + (b + 1) + b + b * max_blocks + s, dtype=torch.int64)
    dist.broadcast(payload, src=0, group=_control_group)
    return _unpack(header, payload)


def follow_steps(run: Callable[[StepInputs], Any]) -> None:
    """A non-engine rank's whole life: `run` every broadcast step until told to stop."""
    while (step := broadcast_step(None)) is not None:      # the argument is rank 0's
        run(step)
