"""The execution plane's batch sampler: grammar masks, penalties, the seeded draw and
logprobs for one step.

What it is: per-slot sampling state held in tensors indexed by slot (a slot is the
scheduler's row for a running request, 0..max_slots-1), set once at admission, and a
`sample()` that works on the whole step at once: gather the rows' parameters by slot,
apply logit bias, grammar masks and penalties, draw with the `tscompile::sample` kernel,
compute logprobs, and record the drawn tokens for the penalties of later steps. The only
per-request Python is in `admit` and `release`, in `SampleResult.token_logprobs()` (the
conversion to protocol values that the engine does per request anyway) and, in steps that
carry constrained rows, one `GrammarMatcher.fill` per such row.
What it is not: the scheduler (which request owns which slot), stop handling (the engine
checks stop ids / max_tokens on the returned ids), grammar compilation or matcher state
(runtime/grammar.py builds the matchers; the engine advances them with the sampled tokens:
the sampler only reads them to fill the step's mask).

Semantics, in the order applied (vLLM V1's):
* Logit bias (OpenAI's `logit_bias`), added to the fp32 logits of the biased rows first;
  the rows of requests without one are untouched. Sparse: (row, token) pairs of the step's
  biased rows only, built on the host when such a row is in the step.
* Grammar masks (structured outputs, forced tool calls), on the rows of requests admitted
  with a matcher: each such row's `GrammarMatcher.fill` writes its allowed next tokens into
  one row of a host int32 bitmask, and every disallowed token's logit becomes -inf
  (xgrammar's `apply_token_bitmask_inplace`; on CUDA the bitmask goes to the device by a
  non-blocking copy from pinned memory, which the engine's per-step host sync of the
  sampled ids keeps from being overwritten while in flight). Ids beyond the tokenizer's
  vocabulary are never allowed. The mask is written into an fp32 copy of the step's
  logits, so the raw logits (and logprobs) are untouched; rows without a grammar are
  bit-for-bit what they would be in a step without grammar rows, and a step with no
  grammar row does no grammar work.
* Penalties, on fp32 logits: repetition first (HF/vLLM: for tokens seen in the prompt *or*
  the output, `logit / p` if `logit > 0` else `logit * p`), then frequency and presence on
  generated tokens only (OpenAI/vLLM: `logit -= frequency * count`, then
  `logit -= presence * (count > 0)`, two subtractions as vLLM does). Neutral values (1, 0, 0)
  leave a row bit-for-bit unchanged, so a batch mixing penalised and plain rows applies them
  to all rows with no masking.
* The draw: `tscompile::sample` (temperature, then top-k, top-p, min-p; temperature 0 is
  argmax of the penalised logits). Its randomness is counter-based on (seed, offset, token):
  the offset is `step_index` (tokens this request generated so far), the seed is fixed per
  request at admission, so a seeded request gives the same tokens whatever it is batched with
  and whichever slot it holds (penalty state is per slot, so it keeps that property).
* Logprobs are the log_softmax of the RAW model logits (before bias, grammar masks,
  penalties, temperature and filters): vLLM V1's default (`logprobs_mode="raw_logprobs"`)
  and what OpenAI clients expect as "the model's" logprob. The chosen token's logprob is
  therefore the raw logprob of the token the filtered distribution drew (it may be a token
  outside the raw top-k, or one the raw model deems unlikely but the grammar allows).

Cost: with no penalised request active, no [slots, V] state exists and a step is the kernel
call plus two small gathers; a step whose rows are all greedy is one argmax (the kernel's
own temperature-0 rule, known from the host-side slot flags without a device sync). Penalty state (output counts int32 [max_slots, V] and a
seen-in-prompt-or-output mask bool [max_slots, V]) is allocated when the first penalised
request is admitted and dropped when the last one is released. Logprob work (a log_softmax
over the step's rows and a top-k) runs only while some active request asked for logprobs.
Grammar work (one `fill` per constrained row of the step, one fp32 copy of the logits, one
masking pass over those rows) runs only in steps that carry a constrained row; the host
bitmask [max_slots, ceil(V / 32)] int32 (pinned, with a device twin, on CUDA) is allocated
at the first grammar admission and kept.

Slot checks in `sample()` (range, admitted, no duplicates) run when `slots` is a CPU tensor
(the engine builds it on the host); slots already on an accelerator are trusted, so the hot
path never syncs for validation.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tscompile.kernels import direct_ops
from tscompile.runtime.protocol import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from tscompile.runtime.grammar import GrammarMatcher

_SAMPLE = direct_ops().sample    # the op's body: no custom-op wrapper cost per step

# Per-slot parameter tables, one row per slot (one gather per table per step):
#   float_params   [max_slots, 6] float32: the columns below
#   int_params     [max_slots, 2] int64:   top_k, seed
#   logprob_params [max_slots, 2] int64:   logprobs on (1) / off (-1), top_logprobs (-1: off)
_TEMP, _TOP_P, _MIN_P, _PRES, _FREQ, _REP = range(6)
_NEUTRAL_FLOATS = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)    # a free slot's row
_TOP_K, _SEED = range(2)


def _as_int64_seed(seed: int) -> int:
    """Any Python int -> the int64 with the same low 64 bits (identity on int64 values)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _uses_penalty(p: SamplingParams) -> bool:
    return (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or p.repetition_penalty != 1.0)


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One step's draws, row i for `slots[i]`. The logprob fields are None when no row of
    the step asked for logprobs; otherwise they cover every row, and `wants_logprobs` /
    `num_top` say which rows asked and how many alternatives each wanted (the rest of a row's
    K columns are still valid top entries, just not requested)."""
    token_ids: torch.Tensor                     # [S] int64
    logprobs: torch.Tensor | None = None        # [S] fp32, raw logprob of token_ids
    top_ids: torch.Tensor | None = None         # [S, K] int64, best first
    top_logprobs: torch.Tensor | None = None    # [S, K] fp32, descending
    wants_logprobs: torch.Tensor | None = None  # [S] bool
    num_top: torch.Tensor | None = None         # [S] int64, params.top_logprobs per row

    def token_logprobs(self) -> list[TokenLogprob | None]:
        """Per row, the protocol value (None for rows that did not ask). One host copy."""
        n = self.token_ids.shape[0]
        if self.logprobs is None:
            return [None] * n
        ids = self.token_ids.tolist()
        lps = self.logprobs.tolist()
        want = self.wants_logprobs.tolist()
        ntop = self.num_top.tolist()
        tid = self.top_ids.tolist()
        tlp = self.top_logprobs.tolist()
        return [TokenLogprob(ids[i], lps[i], tuple(zip(tid[i][:ntop[i]], tlp[i][:ntop[i]])))
                if want[i] else None for i in range(n)]


class BatchSampler:
    """Per-slot sampling state and the vectorised step. See the module docstring.

    `admit(slot, params, prompt_ids, output_ids=(), seed=None, grammar=None) -> seed` before
    a request's first `sample()`; `release(slot)` when it leaves (finished, aborted or
    preempted). A preempted request re-admitted later passes the tokens it already generated
    as `output_ids` (so its penalty counts are restored), the seed `admit` returned the first
    time (so an unseeded request keeps its random stream) and its matcher as it stands (the
    matcher has seen exactly those tokens, so it is not re-fed)."""

    def __init__(self, max_slots: int, vocab_size: int, device: torch.device | str = "cpu",
                 *, rng_seed: int | None = None):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.max_slots = max_slots
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._rng = random.Random(rng_seed)   # fresh seeds for requests with seed=None
        self._float_params = torch.tensor([_NEUTRAL_FLOATS] * max_slots, dtype=torch.float32,
                                          device=self.device)
        self._int_params = torch.zeros(max_slots, 2, dtype=torch.int64, device=self.device)
        self._logprob_params = torch.full((max_slots, 2), -1, dtype=torch.int64,
                                          device=self.device)
        # Host-side bookkeeping (admission/validation only).
        self._params: list[SamplingParams | None] = [None] * max_slots
        self._active_cpu = torch.zeros(max_slots, dtype=torch.bool)
        self._greedy_cpu = torch.zeros(max_slots, dtype=torch.bool)   # temperature == 0
        self._penalised: set[int] = set()
        self._bias: dict[int, tuple[list[int], list[float]]] = {}   # slot -> (ids, values)
        self._top_counts: Counter[int] = Counter()   # top_logprobs of active logprob slots
        self._counts: torch.Tensor | None = None     # [max_slots, V] int32 output counts
        self._seen: torch.Tensor | None = None       # [max_slots, V] bool prompt | output
        self._grammar: dict[int, GrammarMatcher] = {}   # slot -> its request's matcher
        self._bitmask: torch.Tensor | None = None    # host [max_slots, ceil(V/32)] int32
        self._bitmask_dev: torch.Tensor | None = None   # its device copy (CUDA)

    # ------------------------------------------------------------------ admission

    @property
    def penalty_state_allocated(self) -> bool:
        return self._counts is not None

    def is_active(self, slot: int) -> bool:
        self._check_slot(slot)
        return self._params[slot] is not None

    def params(self, slot: int) -> SamplingParams | None:
        self._check_slot(slot)
        return self._params[slot]

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int, got {type(slot).__name__}")
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")

    def _token_tensor(self, ids: Iterable[int] | torch.Tensor, what: str) -> torch.Tensor:
        t = torch.as_tensor(ids if isinstance(ids, torch.Tensor) else list(ids),
                            dtype=torch.int64).reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
            raise ValueError(f"{what}: token ids must be in [0, {self.vocab_size}), "
                             f"got min {int(t.min())}, max {int(t.max())}")
        return t.to(self.device)

    def admit(self, slot: int, params: SamplingParams,
              prompt_ids: Iterable[int] | torch.Tensor,
              output_ids: Iterable[int] | torch.Tensor = (), *, seed: int | None = None,
              grammar: GrammarMatcher | None = None) -> int:
        """Set `slot`'s state for a new (or re-admitted) request; returns the int64 seed it
        uses: `seed` if given, else `params.seed`, else a fresh random one. `grammar`: the
        request's matcher (runtime/grammar.py), whose allowed tokens mask the slot's rows;
        required when `params.grammar` is set."""
        self._check_slot(slot)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if self._params[slot] is not None:
            raise ValueError(f"slot {slot} is already admitted; release it first")
        if (grammar is None) != (params.grammar is None):
            raise ValueError("grammar: a request with params.grammar needs a matcher, and "
                             "only such a request takes one")
        bad = [t for t, _ in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} outside the vocabulary "
                             f"[0, {self.vocab_size})")
        penalised = _uses_penalty(params)
        if penalised:   # validate before any state changes
            prompt = self._token_tensor(prompt_ids, "prompt_ids")
            output = self._token_tensor(output_ids, "output_ids")
        if seed is None:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seed = _as_int64_seed(seed)

        self._float_params[slot] = torch.tensor(
            (params.temperature, params.top_p, params.min_p, params.presence_penalty,
             params.frequency_penalty, params.repetition_penalty), dtype=torch.float32)
        self._int_params[slot] = torch.tensor((params.top_k, seed), dtype=torch.int64)
        self._logprob_params[slot] = torch.tensor(
            (1 if params.logprobs else -1, params.top_logprobs if params.logprobs else -1),
            dtype=torch.int64)
        if penalised:
            if self._counts is None:
                shape = (self.max_slots, self.vocab_size)
                self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
                self._seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self._counts[slot].zero_()
            self._seen[slot].zero_()
            if output.numel():
                self._counts[slot].index_put_((output,), torch.ones_like(output,
                                              dtype=torch.int32), accumulate=True)
            self._seen[slot, prompt] = True
            self._seen[slot, output] = True
            self._penalised.add(slot)
        if params.logprobs:
            self._top_counts[params.top_logprobs] += 1
        if params.logit_bias:
            self._bias[slot] = ([t for t, _ in params.logit_bias],
                                [float(b) for _, b in params.logit_bias])
        if grammar is not None:
            if self._bitmask is None:
                pin = self.device.type == "cuda"
                shape = (self.max_slots, -(-self.vocab_size // 32))
                self._bitmask = torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
                if pin:
                    self._bitmask_dev = torch.empty(shape, dtype=torch.int32,
                                                    device=self.device)
            self._grammar[slot] = grammar
        self._params[slot] = params
        self._active_cpu[slot] = True
        self._greedy_cpu[slot] = params.temperature == 0
        return seed

    def release(self, slot: int) -> None:
        """Forget `slot`'s request; the slot is free for `admit`. Error if not admitted."""
        self._check_slot(slot)
        params = self._params[slot]
        if params is None:
            raise ValueError(f"slot {slot} is not admitted")
        self._float_params[slot] = torch.tensor(_NEUTRAL_FLOATS, dtype=torch.float32)
        self._int_params[slot] = 0
        self._logprob_params[slot] = -1
        self._bias.pop(slot, None)
        self._grammar.pop(slot, None)
        if params.logprobs:
            self._top_counts[params.top_logprobs] -= 1
            if not self._top_counts[params.top_logprobs]:
                del self._top_counts[params.top_logprobs]
        self._penalised.discard(slot)
        if not self._penalised:       # last penalised request gone: drop the [N, V] state
            self._counts = self._seen = None
        self._params[slot] = None
        self._active_cpu[slot] = False
        self._greedy_cpu[slot] = False

    # ------------------------------------------------------------------ the step

    def _check_step(self, logits: torch.Tensor, slots: torch.Tensor,
                    step_index: torch.Tensor, repeats: bool = False) -> None:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = (list(logits.shape) if isinstance(logits, torch.Tensor)
                   else type(logits).__name__)
            raise ValueError(f"logits must be a 2-D tensor [S, V], got {got}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        s, v = logits.shape
        if v != self.vocab_size:
            raise ValueError(f"logits have {v} columns, the sampler's vocab_size is "
                             f"{self.vocab_size}")
        for name, t in (("slots", slots), ("step_index", step_index)):
            if not isinstance(t, torch.Tensor) or t.shape != (s,):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a tensor of shape [{s}], got {got}")
            if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
                raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if slots.device.type == "cpu" and s:
            if int(slots.min()) < 0 or int(slots.max()) >= self.max_slots:
                raise ValueError(f"slots must be in [0, {self.max_slots}), got "
                                 f"{slots.tolist()}")
            if not bool(self._active_cpu[slots.long()].all()):
                idle = [x for x in slots.tolist() if not self._active_cpu[x]]
                raise ValueError(f"slots not admitted: {idle}")
            if not repeats and torch.unique(slots).numel() != s:
                raise ValueError(f"slots repeat within a step: {slots.tolist()}")
            if repeats and (self._penalised or self._grammar):
                dup = sorted(x for x, c in Counter(slots.tolist()).items()
                             if c > 1 and (x in self._penalised or x in self._grammar))
                if dup:
                    raise ValueError(f"slots {dup} have penalties or a grammar, which depend "
                                     f"on the tokens before each row: they cannot have "
                                     f"several rows in a step (no speculation)")

    def apply_logit_bias(self, logits: torch.Tensor, host_slots: list[int] | None
                         ) -> torch.Tensor:
        """fp32 copy of `logits` with each biased row's (token, bias) pairs added; `logits`
        itself when no row of the step has a bias. `host_slots`: the step's slots, row by
        row (None: no active request has a bias)."""
        if not host_slots:
            return logits
        rows, cols, vals = [], [], []
        for row, slot in enumerate(host_slots):
            if (bias := self._bias.get(slot)) is not None:
                rows += [row] * len(bias[0])
                cols += bias[0]
                vals += bias[1]
        if not rows:
            return logits
        x = logits.float().clone()
        dev = x.device
        x.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                     torch.tensor(vals, dtype=torch.float32, device=dev), accumulate=True)
        return x

    def apply_grammar(self, x: torch.Tensor, logits: torch.Tensor,
                      host_slots: list[int] | None) -> torch.Tensor:
        """`x` (the step's logits after bias) with each constrained row's disallowed tokens at
        -inf: an fp32 copy (`x` itself when it is already a copy of `logits`), so `logits`
        stays raw. `x` unchanged when no row of the step has a grammar. `host_slots`: the
        step's slots, row by row (None: no active request has a grammar)."""
        if not host_slots:
            return x
        rows = [row for row, slot in enumerate(host_slots) if slot in self._grammar]
        if not rows:
            return x
        from tscompile.runtime.grammar import apply_bitmask

        mask = self._bitmask
        for row in rows:
            self._grammar[host_slots[row]].fill(mask, row)
        n = len(host_slots)
        if self._bitmask_dev is not None:
            self._bitmask_dev[:n].copy_(mask[:n], non_blocking=True)
            mask = self._bitmask_dev
        if x.dtype != torch.float32:
            x = x.float()
        if x is logits:
            x = x.clone()
        apply_bitmask(x, mask[:n], rows)
        return x

    def apply_penalties(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """fp32 penalised copy of `logits` (rows for `slots`); the input is not modified.
        Returns `logits` itself when no active request uses a penalty."""
        if self._counts is None:
            return logits
        f = self._float_params[slots]
        rep, pres, freq = f[:, _REP:_REP + 1], f[:, _PRES:_PRES + 1], f[:, _FREQ:_FREQ + 1]
        counts = self._counts[slots]                       # [S, V] int32
        x = logits.float()
        x = torch.where(self._seen[slots], torch.where(x > 0, x / rep, x * rep), x)
        x = x - freq * counts
        return x - pres * (counts > 0)

    def record(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count `token_ids[i]` as generated by `slots[i]`'s request (penalty state only;
        a no-op while no active request uses a penalty). `sample()` calls it."""
        if self._counts is None:
            return
        slots = slots.to(self.device, torch.int64)
        token_ids = token_ids.to(self.device, torch.int64)
        self._counts.index_put_((slots, token_ids),
                                torch.ones_like(token_ids, dtype=torch.int32), accumulate=True)
        self._seen[slots, token_ids] = True

    def sample(self, logits: torch.Tensor, slots: torch.Tensor,
               step_index: torch.Tensor, *, repeats: bool = False) -> SampleResult:
        """Draw one token per row: row i uses `slots[i]`'s request state and
        `step_index[i]` (tokens that request generated so far) as the random counter.

        `repeats=True`: a slot may own several rows (a speculative verify row's 1 + k
        positions, step_index counting up): each row is drawn exactly as that request's
        plain step at that output index would draw it, so accepting the drafts that equal
        the draws is exact rejection sampling for deterministic drafts (the engine's
        docstring says why). Not for slots with penalties or a grammar (their later rows
        would need the earlier rows' tokens applied first); checked with CPU slots."""
        self._check_step(logits, slots, step_index, repeats)
        dev = logits.device
        if dev != self.device:
            raise ValueError(f"logits are on {dev}, the sampler's state on {self.device}")
        # Every row greedy (known on the host when the engine passes CPU slots): the draw is
        # the argmax of the penalised logits, the op's own temperature-0 rule, without the
        # filters, softmax and noise it computes for the whole [S, V] otherwise.
        greedy = slots.device.type == "cpu" and bool(self._greedy_cpu[slots.long()].all())
        host_slots = slots.tolist() if self._bias or self._grammar else None
        x = self.apply_logit_bias(logits, host_slots if self._bias else None)
        x = self.apply_grammar(x, logits, host_slots if self._grammar else None)
        if greedy and self._counts is None and not self._top_counts:
            # The common decode step: nothing per slot is read on the device, so no slot or
            # counter upload (each a synchronous copy from pageable memory).
            return SampleResult(x.argmax(dim=-1))
        slots = slots.to(dev, torch.int64, non_blocking=True)
        x = self.apply_penalties(x, slots)
        if greedy:
            token_ids = x.argmax(dim=-1)
        else:
            offsets = step_index.to(dev, torch.int64, non_blocking=True)
            f = self._float_params[slots]
            i = self._int_params[slots]
            token_ids = _SAMPLE(x, f[:, _TEMP], i[:, _TOP_K], f[:, _TOP_P], f[:, _MIN_P],
                                  i[:, _SEED], offsets)
        self.record(slots, token_ids)
        if not self._top_counts:
            return SampleResult(token_ids)

        # Raw logprobs (see the module docstring) for every row of the step.
        lp_state = self._logprob_params[slots]
        lp = torch.log_softmax(logits.float(), dim=-1)
        k = min(max(self._top_counts), self.vocab_size)
        top_lp, top_ids = lp.topk(k, dim=-1, sorted=True)
        return SampleResult(
            token_ids, lp.gather(1, token_ids[:, None])[:, 0], top_ids, top_lp,
            lp_state[:, 0] > 0, lp_state[:, 1].clamp(min=0, max=k))
