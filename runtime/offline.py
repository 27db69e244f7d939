"""Offline generation: prefill then token-by-token decode through the paged KV cache.

What it is: the smallest correct engine over the forward contract, on any device: a set of
sequences with block tables, a step that feeds new tokens (prefill chunks and decode tokens
mixed, decodes first), and greedy/seeded sampling with the `sample` kernel, taking the
serving path's `protocol.SamplingParams` (one name, one set of defaults: pass
temperature=0.0 for greedy). It is the reference path the serving runtime and the compiled
program are checked against.
What it is not: a scheduler (no preemption, no prefix sharing, no batching policy).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from tscompile.kernels import build_metadata, sample
from tscompile.runtime.kv_cache import BlockAllocator, bind_kv_caches
from tscompile.runtime.protocol import SamplingParams


@dataclass
class Sequence:
    tokens: list[int] = field(default_factory=list)  # every token whose KV is cached
    blocks: list[int] = field(default_factory=list)


class PagedRunner:
    def __init__(self, model: nn.Module, *, page_size: int = 16, num_blocks: int = 256,
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        self.model = model
        self.page_size = page_size
        self.device = torch.device(device)
        dtype = dtype or getattr(model, "dtype", None) or next(model.parameters()).dtype
        if hasattr(model, "bind_kv_caches"):      # a compiled program (runtime/program.py)
            model.bind_kv_caches(num_blocks, page_size, dtype=dtype, device=self.device)
        else:
            bind_kv_caches(model, num_blocks, page_size, dtype=dtype, device=self.device)
        self.allocator = BlockAllocator(num_blocks)
        self.seqs: dict[int, Sequence] = {}
        self._next_id = 0

    def add(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self.seqs[sid] = Sequence()
        return sid

    def free(self, sid: int) -> None:
        self.allocator.free(self.seqs.pop(sid).blocks)

    @torch.no_grad()
    def step(self, feeds: list[tuple[int, list[int]]], *, all_logits: bool = False
             ) -> torch.Tensor:
        """Run one forward over `feeds` = [(sequence, new tokens)], any order. Returns logits
        [len(feeds), V] for each feed's last token (in feed order), or with `all_logits`
        [sum of new tokens, V] for every new token (in feed order)."""
        if not feeds:
            raise ValueError("step() needs at least one sequence")
        # Decodes first (kernels/paged.py); remember where each feed landed.
        order = sorted(range(len(feeds)), key=lambda i: len(feeds[i][1]) != 1)
        ids, pos, qlens, slens, tables = [], [], [], [], []
        for i in order:
            sid, new = feeds[i]
            if not new:
                raise ValueError(f"sequence {sid}: no new tokens to feed")
            seq = self.seqs[sid]
            start = len(seq.tokens)
            need = -(-(start + len(new)) // self.page_size) - len(seq.blocks)
            if need > 0:
                seq.blocks += self.allocator.allocate(need)
            seq.tokens += new
            ids += new
            pos += range(start, start + len(new))
            qlens.append(len(new))
            slens.append(len(seq.tokens))
            tables.append(seq.blocks)
        meta = build_metadata(qlens, slens, tables, self.page_size, all_logits=all_logits,
                              device=self.device)
        logits = self.model(torch.tensor(ids, device=self.device),
                            torch.tensor(pos, device=self.device), meta)
        # Undo the decode-first reordering: batch slot j holds feed order[j].
        if not all_logits:
            return logits[torch.tensor(order).argsort()]
        starts = [sum(qlens[:j]) for j in range(len(order))]
        slot_of = {feed: j for j, feed in enumerate(order)}
        rows = [logits[starts[slot_of[i]] : starts[slot_of[i]] + qlens[slot_of[i]]]
                for i in range(len(feeds))]
        return torch.cat(rows)


def _check_offline(params: SamplingParams) -> None:
    """The offline path samples with the `sample` kernel alone: what it cannot apply is an
    error, not ignored."""
    unsupported = [name for name, off in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                                          ("repetition_penalty", 1.0), ("logprobs", False),
                                          ("logit_bias", ()), ("grammar", None))
                   if getattr(params, name) != off]
    if unsupported:
        raise ValueError(f"offline generation does not apply {', '.join(unsupported)}; "
                         f"serve the program with tsrun for those")


def sample_one(logits: torch.Tensor, params: SamplingParams, offset: int) -> int:
    """One token from `logits` [V] at draw `offset`; `params.seed` must be set (generate()
    fixes one per request when the caller gave none)."""
    if params.seed is None:
        raise ValueError("sample_one: params.seed must be set (generate() picks one)")
    dev = logits.device
    return int(sample(
        logits[None].float(), torch.tensor([params.temperature], device=dev),
        torch.tensor([params.top_k], dtype=torch.int32, device=dev),
        torch.tensor([params.top_p], device=dev), torch.tensor([params.min_p], device=dev),
        torch.tensor([params.seed], dtype=torch.int64, device=dev),
        torch.tensor([offset], dtype=torch.int64, device=dev))[0])


def generate(runner: PagedRunner, prompt_ids: list[int], params: SamplingParams,
             prefill_chunk: int | None = None,
             agree: Callable[[int], int] | None = None) -> list[int]:
    """Prefill `prompt_ids` (in chunks of `prefill_chunk` tokens if given), then decode until
    max_tokens or a stop token (which is included in the output, as HF does). `agree` maps
    this process's sampled token to the one every rank uses (tensor parallel: rank 0's,
    broadcast), so all ranks feed the same ids."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    _check_offline(params)
    if params.seed is None:          # one seed for the whole request, as the engine does
        params = replace(params, seed=int(torch.randint(2**62, ())))
    sid = runner.add()
    try:
        chunk = prefill_chunk or len(prompt_ids)
        for i in range(0, len(prompt_ids), chunk):
            logits = runner.step([(sid, prompt_ids[i : i + chunk])])
        out: list[int] = []
        while True:
            token = sample_one(logits[0], params, len(out))
            if agree is not None:
                token = agree(token)
            out.append(token)
            if len(out) >= params.max_tokens or token in params.stop_token_ids:
                return out
            logits = runner.step([(sid, [token])])
    finally:
        runner.free(sid)
