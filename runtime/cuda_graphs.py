"""CUDA graphs for engine steps: decodes, decodes + prefill chunks, and prefill chunks alone.

What it is: `StepGraphs`, which owns static input buffers sized for the largest bucket,
captures the compiled program once per bucket at start-up (largest first, one memory pool),
and replays the smallest bucket that holds a step: a 36-layer model's hundreds of kernel
launches become one, for every step shape the scheduler plans inside the buckets. Also
`plan_bucket` (which bucket a step pads into, or why none: pure host logic, tested on the
CPU) and `run_step`, the one forward call the engine and the follower ranks use.
What it is not: the scheduler or the sampler (they run outside the graph), or a fallback:
a capture that fails raises and names `--enforce-eager`. A step no bucket holds runs the
program eagerly and is counted (`eager_steps`, `tsrun_eager_steps_total`), never hidden.

Buckets are pairs (d, p): d decode rows (0 or a decode batch size) and p prefill tokens (0 or
a prefill token size). A step of D decodes and chunks of P tokens in total replays the
smallest (d >= D, p >= P) bucket. Layout of a bucket, rows in the kernels' order (decodes
first, kernels/paged.py):

    sequences: [D real decodes | d - D padding decodes | chunks ... | padding chunk | empty ...]
               |<------------ d ------------>|<------------ max_prefill_seqs ------------>|
    tokens:    [D decode tokens | d - D pad  | the chunks' P tokens | p - P pad tokens ]

* a padding decode: token 0 at position 0, context length 1, block table [scratch, ...];
* the padding chunk holds the p - P padding tokens as one sequence of that length whose
  block table is all `scratch` (positions 0..p-P-1, so it writes and reads only the scratch
  block, whatever the aliasing of its positions onto that one block);
* an empty sequence has no query tokens and context length 0 (the prefill kernels skip it).

`scratch` is one KV block beyond the scheduler's pool (`num_blocks`): padding never touches a
live sequence's cache. The decode kernels size their split grid from the block-table width,
the prefill kernel its grid from the token and sequence counts: with the full max_model_len
width and the bucket's counts, the grids depend on the bucket only. Every bucket returns the
logits of every sequence's last token into one static buffer; the rows the step samples are
gathered from it after the replay.

Mixed buckets need a prefill attention that never reads lengths back to the host. The GQA
prefill kernel does not; the MLA prefill (kernels/triton/mla.py) sizes its expanded context
from the chunks' lengths on the host, so a program with MLA layers captures decode buckets
only, and its steps that carry chunks run eagerly, counted.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tscompile.kernels import AttentionMetadata
from tscompile.runtime.step_io import StepInputs

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]

MAX_PREFILL_SEQS = 8          # chunk slots of a mixed bucket (one of them may be padding)
MAX_PREFILL_BUCKET = 4096     # default largest prefill bucket (tokens)


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


def prefill_bucket_sizes(max_tokens: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_tokens`, then `max_tokens` itself: a chunk
    pads by less than 2x, and the capture count grows with log2 of the budget."""
    if max_tokens < 1:
        raise ValueError(f"CUDA-graph prefill bucket must be >= 1 token, got {max_tokens}")
    sizes, s = [], smallest
    while s < max_tokens:
        sizes.append(s)
        s *= 2
    return tuple(sizes) + (max_tokens,)


@dataclass(frozen=True, slots=True)
class Bucket:
    decodes: int             # d: decode rows
    prefill: int             # p: prefill tokens (0: a pure-decode bucket)
    # A verify bucket (speculative decoding): logits for every token, not only each
    # sequence's last, and `chunk_slots` rows for its q_len > 1 sequences (verify rows and
    # prefill chunks).
    all_logits: bool = False
    chunk_slots: int = MAX_PREFILL_SEQS

    @property
    def num_seqs(self) -> int:
        return self.decodes + (self.chunk_slots if self.prefill else 0)

    @property
    def num_tokens(self) -> int:
        return self.decodes + self.prefill

    @property
    def num_logits(self) -> int:
        return self.num_tokens if self.all_logits else self.num_seqs


def has_verify_rows(meta: AttentionMetadata) -> bool:
    """Whether some logits row is not the last token of its sequence (a speculative verify
    row's draft positions). Host tensors: a few us of numpy."""
    if not meta.logits_indices.numel():
        return False
    ends = meta.query_start_loc[1:].cpu().numpy().astype(np.int64) - 1
    idx = meta.logits_indices.cpu().numpy()
    return bool((ends[np.minimum(np.searchsorted(ends, idx), len(ends) - 1)] != idx).any())


def plan_bucket(step: StepInputs, decode_sizes: Sequence[int], prefill_sizes: Sequence[int],
                max_blocks: int, verify_sizes: Sequence[int] = (),
                verify_slots: int = MAX_PREFILL_SEQS) -> tuple[Bucket | None, str]:
    """The smallest bucket that holds `step`, or (None, why not). Sizes sorted ascending;
    empty `prefill_sizes`: decode buckets only; `verify_sizes`: the prefill token sizes of
    the verify buckets (steps with verify rows), each with `verify_slots` chunk rows."""
    m = step.meta
    nd, n = m.num_decodes, m.num_seqs
    chunks, prefill = n - nd, step.input_ids.numel() - nd
    if n == 0:
        return None, "an empty step"
    if has_verify_rows(m):
        return _verify_bucket(m, nd, chunks, prefill, decode_sizes, verify_sizes,
                              verify_slots, max_blocks)
    if m.block_tables.shape[1] > max_blocks:
        return None, (f"a block table of {m.block_tables.shape[1]} blocks is wider than the "
                      f"graphs' {max_blocks}")
    if nd > (decode_sizes[-1] if decode_sizes else 0):
        return None, f"{nd} decodes > the largest decode bucket {decode_sizes[-1]}"
    d = next((s for s in decode_sizes if s >= nd), 0) if nd else 0
    if not chunks:
        return Bucket(d, 0), ""
    if not prefill_sizes:
        return None, "a step with prefill chunks (this program has decode graphs only)"
    if prefill > prefill_sizes[-1]:
        return None, f"{prefill} prefill tokens > the largest prefill bucket {prefill_sizes[-1]}"
    p = next(s for s in prefill_sizes if s >= prefill)
    if chunks + (p > prefill) > MAX_PREFILL_SEQS:
        return None, (f"{chunks} prefill chunks (+ padding) > the {MAX_PREFILL_SEQS} chunk "
                      f"slots of a mixed bucket")
    return Bucket(d, p), ""


def _verify_bucket(m: AttentionMetadata, nd: int, chunks: int, prefill: int,
                   decode_sizes: Sequence[int], verify_sizes: Sequence[int], slots: int,
                   max_blocks: int) -> tuple[Bucket | None, str]:
    if not verify_sizes:
        return None, ("a step with verify rows (logits at every draft position), and no "
                      "verify graphs were captured")
    if m.block_tables.shape[1] > max_blocks:
        return None, (f"a block table of {m.block_tables.shape[1]} blocks is wider than the "
                      f"graphs' {max_blocks}")
    if nd > (decode_sizes[-1] if decode_sizes else 0):
        return None, f"{nd} decodes > the largest decode bucket {decode_sizes[-1]}"
    if prefill > verify_sizes[-1]:
        return None, (f"{prefill} verify and prefill tokens > the largest verify bucket "
                      f"{verify_sizes[-1]}")
    d = next((s for s in decode_sizes if s >= nd), 0) if nd else 0
    p = next(s for s in verify_sizes if s >= prefill)
    if chunks + (p > prefill) > slots:
        return None, (f"{chunks} verify rows and chunks (+ padding) > the {slots} rows of a "
                      f"verify bucket")
    return Bucket(d, p, all_logits=True, chunk_slots=slots), ""


class StepGraphs:
    def __init__(self, forward: Forward, *, max_batch: int, max_blocks: int, page_size: int,
                 scratch_block: int, device: torch.device | str,
                 sizes: Sequence[int] | None = None,
                 prefill_sizes: Sequence[int] = (), verify_tokens: int = 0,
                 capture: bool = True):
        """`sizes`: decode batch buckets (default bucket_sizes(max_batch)); `prefill_sizes`:
        prefill token buckets of the mixed and pure-prefill graphs (empty: decode graphs
        only); each must fit the block table (<= max_blocks * page_size tokens).
        `verify_tokens`: also capture verify buckets (logits at every token: speculative
        verify rows) for the prefill sizes up to it, with one chunk row per possible
        sequence (0: none; a verify step then runs eagerly).
        `capture=False` replays nothing and runs `forward` on the padded static buffers
        instead: the padding path without a GPU (tests), never a serving mode."""
        self.forward, self.page_size = forward, page_size
        self.device = torch.device(device)
        self.sizes = tuple(sorted(sizes or bucket_sizes(max_batch)))
        self.prefill_sizes = tuple(sorted(prefill_sizes))
        if self.prefill_sizes and self.prefill_sizes[-1] > max_blocks * page_size:
            raise ValueError(f"prefill bucket of {self.prefill_sizes[-1]} tokens exceeds the "
                             f"block table ({max_blocks} blocks of {page_size})")
        self.max_batch, self.max_blocks = self.sizes[-1], max_blocks
        self.scratch = scratch_block
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.verify_sizes = tuple(p for p in self.prefill_sizes if p <= verify_tokens)
        if verify_tokens and not self.verify_sizes:
            raise ValueError(f"verify_tokens={verify_tokens} is below every prefill bucket "
                             f"{self.prefill_sizes}")
        self.verify_slots = max(MAX_PREFILL_SEQS, self.sizes[-1])
        self.buckets = [Bucket(d, 0) for d in self.sizes] + [
            Bucket(d, p) for d in (0,) + self.sizes for p in self.prefill_sizes] + [
            Bucket(d, p, all_logits=True, chunk_slots=self.verify_slots)
            for d in (0,) + self.sizes for p in self.verify_sizes]
        n = max(b.num_tokens for b in self.buckets)
        s = max(b.num_seqs for b in self.buckets)
        nl = max(b.num_logits for b in self.buckets)
        # The static inputs are views of one device arena, mirrored by one host arena
        # (pinned on a GPU) that `_fill` writes in place: a step's inputs go up in a few
        # asynchronous copies instead of one pageable copy per buffer. Layout: int64
        # [ids n | positions n | slots n | logits rows nl], then int32 [seq_lens s |
        # query_start_loc s+1 | block tables s x max_blocks] (a table's first rows are
        # contiguous with the lengths, so one copy carries all three).
        n64, n32 = 3 * n + nl, 2 * s + 1 + s * max_blocks
        size = n64 + (n32 + 1) // 2
        arena = torch.zeros(size, dtype=torch.int64, device=self.device)
        host = torch.zeros(size, dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        self._arena, self._host, self._n, self._s, self._n64 = arena, host, n, s, n64
        self._uploaded = torch.cuda.Event() if self.device.type == "cuda" else None
        self._h64 = host.numpy()
        self._h32 = self._h64[n64:].view(np.int32)
        a32 = arena[n64:].view(torch.int32)
        self.input_ids, self.positions = arena[:n], arena[n:2 * n]
        self.slot_mapping, self.logits_indices = arena[2 * n:3 * n], arena[3 * n:n64]
        self.seq_lens, self.query_start_loc = a32[:s], a32[s:2 * s + 1]
        self.block_tables = a32[2 * s + 1:n32].view(s, max_blocks)
        self._h64[2 * n:3 * n] = scratch_block * page_size
        self._h64[3 * n:n64] = np.arange(nl)
        self._h32[:s] = 1
        self._h32[s:2 * s + 1] = np.arange(s + 1)
        self._h32[2 * s + 1:n32] = scratch_block
        arena.copy_(host)
        self.logits: torch.Tensor | None = None       # [s, V]: every bucket's output rows
        self.graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        self.replays = 0
        self.verify_replays = 0          # of them, verify buckets (speculative steps)
        self.eager_steps = 0
        if capture:
            self._capture()

    def _meta(self, b: Bucket) -> AttentionMetadata:
        s, t = b.num_seqs, b.num_tokens
        return AttentionMetadata(self.query_start_loc[: s + 1], self.seq_lens[:s],
                                 self.block_tables[:s], self.slot_mapping[:t],
                                 self.logits_indices[:b.num_logits], num_decodes=b.decodes)

    def _run(self, b: Bucket) -> torch.Tensor:
        """The program on bucket b's buffers; its logits [num_seqs, V] into `self.logits`."""
        t = b.num_tokens
        out = self.forward(self.input_ids[:t], self.positions[:t], self._meta(b))
        if self.logits is None:
            rows = max(x.num_logits for x in self.buckets)
            self.logits = out.new_empty(rows, out.shape[-1])
        self.logits[: b.num_logits].copy_(out)
        return self.logits[: b.num_logits]

    def _fill_idle(self, b: Bucket) -> None:
        """Bucket b's buffers as a step of padding only (for warm-up and capture)."""
        self._fill(b, StepInputs(torch.zeros(0, dtype=torch.int64),
                                 torch.zeros(0, dtype=torch.int64),
                                 AttentionMetadata(torch.zeros(1, dtype=torch.int32),
                                                   torch.zeros(0, dtype=torch.int32),
                                                   torch.zeros(0, 1, dtype=torch.int32),
                                                   torch.zeros(0, dtype=torch.int64),
                                                   torch.zeros(0, dtype=torch.int64), 0)))

    def _capture(self) -> None:
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        # Largest first: later ones reuse its pool.
        for b in sorted(self.buckets, key=lambda x: (x.num_tokens, x.num_seqs), reverse=True):
            try:
                self._fill_idle(b)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    self._run(b)                  # compile/autotune outside the capture
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._run(b)
            except Exception as e:
                raise RuntimeError(f"CUDA-graph capture of the step bucket ({b.decodes} "
                                   f"decodes, {b.prefill} prefill tokens) failed "
                                   f"({type(e).__name__}: {e}); an op in the program is not "
                                   f"capturable. Serve with --enforce-eager.") from e
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        used = (free0 - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        log.info("captured %d step CUDA graphs in %.1f s, %.0f MiB: decode batches %s; "
                 "prefill tokens %s (with 0 or those decode batches)", len(self.graphs),
                 time.perf_counter() - t0, used, ",".join(map(str, self.sizes)),
                 ",".join(map(str, self.prefill_sizes)) or "none")

    def bucket(self, step: StepInputs) -> tuple[Bucket | None, str]:
        """The bucket `step` replays in, or (None, why it runs eagerly)."""
        return plan_bucket(step, self.sizes, self.prefill_sizes, self.max_blocks,
                           self.verify_sizes, self.verify_slots)

    def _fill(self, b: Bucket, step: StepInputs) -> np.ndarray:
        """Write `step`, padded to bucket b, into the static buffers; returns the bucket
        rows of the step's logits (the sequences it samples, in order).
        The host arena is reused each step, once the previous step's uploads are done
        (an event; in serving they are, since the engine waits for the sampled ids)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        m = step.meta
        nd, n = m.num_decodes, m.num_seqs
        ps, scratch = self.page_size, self.scratch
        ids, pos = step.input_ids.cpu().numpy(), step.positions.cpu().numpy()
        slots, lens = m.slot_mapping.cpu().numpy(), m.seq_lens.cpu().numpy()
        qsl, tables = m.query_start_loc.cpu().numpy(), m.block_tables.cpu().numpy()
        lidx = m.logits_indices.cpu().numpy()
        t_real, s, t = ids.shape[0], b.num_seqs, b.num_tokens
        d, chunks = b.decodes, n - nd
        tc = t_real - nd                                   # the chunks' tokens
        pad_chunk = t - d - tc
        N, S, h64, h32 = self._n, self._s, self._h64, self._h32
        # Tokens: decodes, decode padding, the chunks, the padding chunk.
        for off, src, fill in ((0, ids, 0), (N, pos, 0), (2 * N, slots, scratch * ps)):
            h = h64[off:off + t]
            h[:nd] = src[:nd]
            h[nd:d] = fill
            h[d:d + tc] = src[nd:]
            h[d + tc:] = fill
        if pad_chunk:
            h64[N + t - pad_chunk:N + t] = np.arange(pad_chunk)
            h64[2 * N + t - pad_chunk:2 * N + t] = scratch * ps + np.arange(pad_chunk) % ps
        # Sequences: context lengths, query start offsets, block tables.
        b_lens, b_qsl = h32[:s], h32[S:S + s + 1]
        b_lens[:nd] = lens[:nd]
        b_lens[nd:d] = 1                                   # padding decodes
        b_lens[d:d + chunks] = lens[nd:]
        b_lens[d + chunks:] = 0
        b_qsl[0] = 0
        b_qsl[1:d + 1] = np.arange(1, d + 1)               # decodes and padding: 1 each
        b_qsl[d + 1:d + chunks + 1] = d + qsl[nd + 1:] - qsl[nd]
        b_qsl[d + chunks + 1:] = d + tc
        if pad_chunk:
            b_lens[d + chunks] = pad_chunk
            b_qsl[d + chunks + 1:] += pad_chunk
        mb = tables.shape[1]
        width = max(mb, -(-pad_chunk // ps), 1)
        tab = h32[2 * S + 1:2 * S + 1 + S * self.max_blocks].reshape(S, self.max_blocks)
        tab[:s, :width] = scratch
        tab[:nd, :mb] = tables[:nd]
        tab[d:d + chunks, :mb] = tables[nd:]
        if b.all_logits:
            # Every bucket token is a logits row; the step's rows are its tokens' positions.
            if lidx.size and (lidx >= t_real).any():
                raise ValueError("StepGraphs: logits_indices past the step's tokens")
            h64[3 * N:3 * N + t] = np.arange(t)
            sel = np.where(lidx < nd, lidx, lidx - nd + d).astype(np.int64)
        else:
            # The step's logits rows: sequence of each index (its last token), as a bucket row.
            last = qsl[1:] - 1
            seq_of = np.searchsorted(last, lidx)
            if lidx.size and ((seq_of >= n).any()
                              or (last[np.minimum(seq_of, n - 1)] != lidx).any()):
                raise ValueError("StepGraphs: logits_indices must be last tokens of sequences")
            h64[3 * N:3 * N + s] = np.maximum(b_qsl[1:].astype(np.int64) - 1, 0)
            rows = np.concatenate([np.arange(nd), np.arange(nd, n) - nd + d]).astype(np.int64)
            sel = rows[seq_of]
        a, hs = self._arena, self._host
        nb = self.device.type == "cuda"
        for off, k in ((0, t), (N, t), (2 * N, t), (3 * N, b.num_logits)):
            a[off:off + k].copy_(hs[off:off + k], non_blocking=nb)
        k32 = 2 * S + 1 + s * self.max_blocks             # lengths, offsets, tables[:s]
        lo = self._n64
        a[lo:lo + (k32 + 1) // 2].copy_(hs[lo:lo + (k32 + 1) // 2], non_blocking=nb)
        if self._uploaded is not None:
            self._uploaded.record()
        return sel

    def __call__(self, step: StepInputs, b: Bucket | None = None) -> torch.Tensor:
        """Logits [S, V] of a step some bucket holds (see `bucket`), S its logits rows."""
        b = b or self.bucket(step)[0]
        if b is None:
            raise ValueError(f"StepGraphs: no bucket holds this step ({self.bucket(step)[1]})")
        sel = self._fill(b, step)
        self.replays += 1
        self.verify_replays += b.all_logits
        if b not in self.graphs:                  # capture=False: the padded eager run
            out = self._run(b)
        else:
            self.graphs[b].replay()
            out = self.logits[: b.num_logits]
        if (sel == np.arange(sel.shape[0])).all():          # decodes only: no gather
            return out[: sel.shape[0]]
        return out[torch.from_numpy(sel).to(out.device)]


def run_step(forward: Forward, graphs: StepGraphs | None, step: StepInputs,
             device: torch.device) -> torch.Tensor:
    """The rank's forward for one step: a captured graph when a bucket holds the step, else
    the program eagerly on the step's tensors moved to `device` (counted in
    `graphs.eager_steps`, and logged at the 1st, 2nd, 4th, 8th, ... such step)."""
    if graphs is not None:
        b, why = graphs.bucket(step)
        if b is not None:
            return graphs(step, b)
        graphs.eager_steps += 1
        k = graphs.eager_steps
        if k & (k - 1) == 0:
            log.info("eager step #%d (no CUDA-graph bucket holds it: %s)", k, why)
    step = step.to(device)
    return forward(step.input_ids, step.positions, step.meta)
