"""The paged KV-cache layout and the per-step attention metadata, defined once.

Every attention op, the runtime's cache allocator and the scheduler agree on this file.

Legend: T tokens in the step (all sequences back to back), B sequences, NB physical
blocks in the pool, PS page size (tokens per block), MB max blocks per sequence,
Hkv KV heads, D head dim, R = kv_lora_rank + qk_rope_head_dim (MLA latent width).

Layout
------
* A **block** (page) holds PS consecutive token positions of one sequence.
* The cache is one preallocated tensor per attention layer, never reallocated
  (CUDA graphs replay fixed addresses):
    - GQA/MHA: ``kv_cache[2, NB, PS, Hkv, D]`` (index 0 = K, 1 = V)
    - MLA:     ``kv_cache[NB, PS, R]``  (normalised latent ``c_kv`` then roped ``k_pe``)
* ``block_tables[b, i]`` is the physical block holding positions ``[i*PS, (i+1)*PS)``
  of sequence b (entries past the sequence's last block are ignored; pad with 0).
* ``slot_mapping[t] = block * PS + offset`` is where token t's K/V is written:
  flat index into the ``NB*PS`` slots, always valid. Padding tokens of a CUDA-graph
  bucket write into a scratch block that the runtime keeps out of the scheduler's pool
  (runtime/cuda_graphs.py), so the write is one unmasked scatter with no host sync.

Step metadata
-------------
Sequences are ordered **decodes first**: the first ``num_decodes`` sequences have exactly
one query token each; the rest are prefill chunks of any length >= 1 (a chunk attends to its
sequence's cached prefix plus itself, causally). For sequence b:

* its query tokens are ``q[query_start_loc[b] : query_start_loc[b+1]]``
* ``seq_lens[b]`` is its context length **after** this step's tokens are written, so the
  query token i of a chunk of length n sits at absolute position ``seq_lens[b] - n + i``
  and attends to positions ``0 .. seq_lens[b] - n + i``.
* ``logits_indices`` are the rows of the flat batch whose logits the model returns
  (the last token of each sequence when sampling; every token for a parity check).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import dispatch, register


FP8_KV_DTYPES = (torch.float8_e4m3fn,)     # KV cache dtypes stored with scale 1


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths
    seq_lens: torch.Tensor         # [B]   int32, context length after this step
    block_tables: torch.Tensor     # [B, MB] int32
    slot_mapping: torch.Tensor     # [T]   int64
    logits_indices: torch.Tensor   # [S]   int64, rows to return logits for
    num_decodes: int               # the first num_decodes sequences have q_len == 1

    def __post_init__(self) -> None:
        b = self.seq_lens.shape[0]
        if self.query_start_loc.shape != (b + 1,):
            raise ValueError(f"query_start_loc must have shape [{b + 1}] for {b} sequences, "
                             f"got {list(self.query_start_loc.shape)}")
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != b:
            raise ValueError(f"block_tables must have shape [{b}, max_blocks], "
                             f"got {list(self.block_tables.shape)}")
        if not 0 <= self.num_decodes <= b:
            raise ValueError(f"num_decodes={self.num_decodes} outside [0, {b}]")

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def to(self, device: torch.device | str) -> AttentionMetadata:
        return AttentionMetadata(
            self.query_start_loc.to(device), self.seq_lens.to(device),
            self.block_tables.to(device), self.slot_mapping.to(device),
            self.logits_indices.to(device), self.num_decodes)


def build_metadata(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], page_size: int,
    *, all_logits: bool = False, device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Host-side builder from per-sequence lists (already ordered decodes first).

    `query_lens[b]` new tokens of sequence b are written at positions
    `seq_lens[b] - query_lens[b] .. seq_lens[b] - 1`.
    """
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("query_lens, seq_lens and block_tables need one entry per sequence")
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    slots: list[int] = []
    for b, (n, total, table) in enumerate(zip(query_lens, seq_lens, block_tables)):
        if n < 1 or n > total:
            raise ValueError(f"sequence {b}: query length {n} must be in [1, seq_len={total}]")
        if len(table) * page_size < total:
            raise ValueError(f"sequence {b}: {len(table)} blocks of {page_size} tokens cannot "
                             f"hold {total} positions")
        for pos in range(total - n, total):
            slots.append(table[pos // page_size] * page_size + pos % page_size)
    max_blocks = max((len(t) for t in block_tables), default=1) or 1
    padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    logits = list(range(qsl[-1])) if all_logits else [e - 1 for e in qsl[1:]]
    i32, i64 = torch.int32, torch.int64
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=i32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=i32, device=device),
        block_tables=torch.tensor(padded, dtype=i32, device=device).reshape(len(seq_lens), -1),
        slot_mapping=torch.tensor(slots, dtype=i64, device=device),
        logits_indices=torch.tensor(logits, dtype=i64, device=device),
        num_decodes=num_decodes,
    )


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence from a `[NB, PS, ...]` cache:
    `[length, ...]`. Reference helper shared by the attention references."""
    page_size = cache.shape[1]
    nblocks = (length + page_size - 1) // page_size
    pages = cache[block_table[:nblocks].long()]            # [nblocks, PS, ...]
    return pages.reshape(nblocks * page_size, *cache.shape[2:])[:length]


def write_slots(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """cache.view(NB*PS, ...)[slot_mapping[t]] = values[t] (in place). One scatter, no
    masking: a boolean mask would sync the host every layer and break graph capture.
    An fp8 cache stores the values saturated to its finite range (scale 1; a cast alone
    would turn an outlier into NaN)."""
    flat = cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])
    if cache.dtype in FP8_KV_DTYPES:     # as bytes: index_copy_ has no fp8 kernels
        top = torch.finfo(cache.dtype).max
        values = values.float().clamp(-top, top).to(cache.dtype)
        flat.view(torch.uint8).index_copy_(0, slot_mapping, values.view(torch.uint8))
        return
    flat.index_copy_(0, slot_mapping, values.to(cache.dtype))


@register("write_slots2", "reference")
def write_slots2_reference(dst_a: torch.Tensor, dst_b: torch.Tensor,
                           slot_mapping: torch.Tensor, a: torch.Tensor,
                           b: torch.Tensor) -> None:
    write_slots(dst_a, slot_mapping, a)
    write_slots(dst_b, slot_mapping, b)


def write_slots2(dst_a: torch.Tensor, dst_b: torch.Tensor, slot_mapping: torch.Tensor,
                 a: torch.Tensor, b: torch.Tensor) -> None:
    """`write_slots(dst_a, slots, a); write_slots(dst_b, slots, b)` as one scatter launch on
    a GPU: GQA's K and V pools (dst = kv_cache[0], kv_cache[1]), or MLA's latent and rope
    columns of its one pool (dst = kv_cache[..., :L], kv_cache[..., L:]). Each dst is
    [NB, PS, ...] whose per-slot row is contiguous or a column slice; a, b are [T, ...]
    with the same per-token element count as a dst row."""
    dispatch("write_slots2", dst_a, dst_b, slot_mapping, a, b)
