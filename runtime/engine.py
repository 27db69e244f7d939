"""The execution plane on the engine rank: plan -> inputs -> program -> sample -> events.

What it is: `Engine`, which owns the C++ scheduler (one per model replica), the batch
sampler and the per-request bookkeeping the API needs (prompt length, cached tokens,
generated ids, the request's seed), and runs one step at a time: the plan's arrays become
the program's inputs (broadcast to the other TP ranks), rank 0's logits are sampled, and
the sampled ids go back to the scheduler, which decides stop-token and length finishes.
A request with a grammar (`SamplingParams.grammar`) gets a matcher from the engine's
`GrammarCompiler` when it is added (kept across preemption: the generated tokens are kept,
so is its state); the sampler masks its rows with it, and each sampled token advances it
here. A grammar that has finished (accepted EOS) ends the request as "stop"; a token it
refuses (a bug, not a request error) ends that request with an error naming the grammar.

Speculative decoding (`--speculative suffix|ngram`, model-free drafters of runtime/spec):
before each plan, every decoding request that speculates proposes up to K draft tokens
(K per request from `AdaptiveDraftLength`, down to 0), handed to the scheduler, which makes
its decode a verify row (q_len 1 + k, after the plain decodes: the chunk path of the
attention over its cached prefix) and returns logits for all 1 + k positions. Position i is
drawn exactly as the plain step at output index len(outputs) + i would draw it (same seed,
same counter), and the engine accepts the longest prefix of drafts equal to the draws, plus
the draw after it (the bonus token). Greedy: the longest prefix equal to the argmax. With
temperature > 0 this is exact rejection sampling for a deterministic draft d: the
exponential race picks d with probability p(d) (accept), and given it did not pick d its
winner is distributed as p restricted to x != d and renormalised (the residual); so the
text is the target's distribution, and with a seed the very text the request gets without
speculation. The scheduler takes the accepted tokens plus the bonus, checks stop ids,
max_tokens and the context limit token by token, and rolls the sequence back to what it
kept (rejected drafts' blocks return to the pool). Requests with a grammar or penalties do
not speculate (their later positions depend on the earlier ones' tokens). On a GPU, verify
steps replay the step graphs' verify buckets (runtime/cuda_graphs.py: logits at every
token), captured when the engine speculates.
What it is not: the API (tokenization, stop strings, streaming: runtime/server/) or the
process launch (runtime/serve.py). Requests are `protocol.AddRequest`; every result is a
`protocol.RequestOutput`, and a request the engine cannot take gets an error output,
never an exception that would stop the loop.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from tscompile.runtime._scheduler import (
    FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Scheduler,
)
from tscompile.runtime.cuda_graphs import MAX_PREFILL_BUCKET, prefill_bucket_sizes, run_step
from tscompile.runtime.grammar import GrammarCompiler, GrammarMatcher
from tscompile.runtime.kv_cache import bind_rank, kv_blocks
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import AddRequest, EngineStats, RequestOutput, SamplingParams
from tscompile.runtime.sampler import BatchSampler, SampleResult, _uses_penalty
from tscompile.runtime.spec import (
    AdaptiveDraftLength, LinearStepCost, NgramDrafter, SuffixDrafter, SuffixRequest,
)
from tscompile.runtime.step_io import StepInputs, broadcast_step
from tscompile.runtime.step_model import StepTimeModel, profile

log = logging.getLogger(__name__)

FINISH_NAMES = {FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_ABORT: "abort",
                FINISH_ERROR: "error"}
FINISH_CODES = {"stop": FINISH_STOP, "length": FINISH_LENGTH, "abort": FINISH_ABORT,
                "error": FINISH_ERROR}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_num_seqs: int = 32               # running requests (block-table rows)
    max_num_batched_tokens: int = 512    # tokens per step (decodes + prefill chunks)
    max_tokens_with_decodes: int | None = None   # tokens of a step carrying decodes (default
                                                 # max_num_batched_tokens): bounds their ITL
    max_model_len: int | None = None     # default: the model's max_position_embeddings
    page_size: int = 16
    kv_cache_tokens: int | None = None   # KV pool size in tokens (default below)
    kv_memory_fraction: float | None = None   # CUDA: fraction of free memory for KV (0.9)
    session_ttl: float = 60.0            # seconds a finished session's prefix stays pinned
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"         # "auto" (the model's dtype) or "fp8" (e4m3, scale 1)
    enforce_eager: bool = False          # CUDA: no step CUDA graphs
    max_graph_batch: int | None = None   # largest captured decode batch (default max_num_seqs)
    graph_prefill_tokens: tuple[int, ...] | None = None   # prefill token buckets of the
                                         # mixed / prefill graphs (default: powers of two up
                                         # to min(max_num_batched_tokens, 4096); (): none)
    decode_floor_tps: float = 0.0        # tokens/s every decoding request keeps (0: none);
                                         # per request: AddRequest.decode_floor_tps
    step_time_model: StepTimeModel | None = None   # what the floor planner sizes steps by
                                         # (None: profiled at start-up when a floor can apply)
    profile_step_time: bool = False      # profile a model even with no default floor (so
                                         # per-request floors are honoured)
    speculative: str | None = None       # model-free drafting: "suffix" or "ngram" (None: off)
    num_speculative_tokens: int = 4      # K: draft tokens per verify row, at most
    spec_adaptive: bool = True           # per-request K from its running acceptance (down
                                         # to 0); False: always K while the drafter proposes

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, "
                                 f"got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_size:
            raise ValueError(f"--kv-cache-tokens must hold at least one page "
                             f"({self.page_size} tokens), got {self.kv_cache_tokens}")
        if self.kv_memory_fraction is not None and not 0 < self.kv_memory_fraction < 1:
            raise ValueError(f"--kv-memory-fraction must be in (0, 1), "
                             f"got {self.kv_memory_fraction}")
        if self.kv_cache_tokens is not None and self.kv_memory_fraction is not None:
            raise ValueError("give --kv-cache-tokens or --kv-memory-fraction, not both")
        if self.session_ttl < 0:
            raise ValueError(f"--session-ttl must be >= 0, got {self.session_ttl}")
        if self.max_graph_batch is not None and not 1 <= self.max_graph_batch <= self.max_num_seqs:
            raise ValueError(f"--max-graph-batch must be in [1, --max-num-seqs = "
                             f"{self.max_num_seqs}], got {self.max_graph_batch}")

        if not (self.decode_floor_tps >= 0 and np.isfinite(self.decode_floor_tps)):
            raise ValueError(f"--decode-floor-tps must be a finite number >= 0, "
                             f"got {self.decode_floor_tps}")
        if self.graph_prefill_tokens is not None and any(
                t < 1 for t in self.graph_prefill_tokens):
            raise ValueError(f"--graph-prefill-buckets must be positive token counts, "
                             f"got {list(self.graph_prefill_tokens)}")
        cap = self.max_tokens_with_decodes
        if cap is not None and not 1 <= cap <= self.max_num_batched_tokens:
            raise ValueError(f"--max-tokens-with-decodes must be in [1, --max-num-batched-tokens"
                             f" = {self.max_num_batched_tokens}], got {cap}")
        if self.speculative is not None and self.speculative not in SPEC_METHODS:
            raise ValueError(f"--speculative must be one of {', '.join(SPEC_METHODS)}, "
                             f"got {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= 64:
            raise ValueError(f"--num-speculative-tokens must be in [1, 64], "
                             f"got {self.num_speculative_tokens}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {sorted(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")

    def prefill_buckets(self, max_model_len: int) -> tuple[int, ...]:
        """The prefill token buckets the step graphs capture (each <= max_model_len)."""
        if self.graph_prefill_tokens is not None:
            sizes = sorted(set(self.graph_prefill_tokens))
        else:
            sizes = list(prefill_bucket_sizes(min(self.max_num_batched_tokens,
                                                  MAX_PREFILL_BUCKET)))
        return tuple(s for s in sizes if s <= max_model_len)

    def model_len(self, max_position_embeddings: int | None) -> int:
        return self.max_model_len or max_position_embeddings or 4096

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype


KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp8": torch.float8_e4m3fn}
SPEC_METHODS = ("suffix", "ngram")


class RankFailure(RuntimeError):
    """A step failed in a world of several ranks. The engine cannot go on: the other ranks
    may be blocked in a collective of the failed forward, and no later step would meet
    them. `outputs` are the error outputs of the requests the failed step carried; the
    caller fails the rest (`Engine.fail_all`) and exits, which ends the other ranks too."""

    def __init__(self, message: str, outputs: list[RequestOutput]):
        super().__init__(message)
        self.outputs = outputs


@dataclass
class _Live:
    """The engine's side of one request, under its scheduler key (an int)."""
    rid: str                         # the API's request id
    params: SamplingParams
    prompt: tuple[int, ...]
    outputs: list[int] = field(default_factory=list)
    slot: int | None = None          # sampler row while the request holds KV
    seed: int | None = None
    cached: int | None = None        # prefix-hit tokens at first admission
    grammar: GrammarMatcher | None = None   # params.grammar's matcher, for the request's life
    drafter: SuffixRequest | NgramDrafter | None = None   # None: this request does not speculate
    policy: AdaptiveDraftLength | None = None
    shadow: list[int] | None = None  # K = 0: a free probe draft scored against the next token
    spec_rows: int = 0               # verify rows, draft tokens they carried, drafts accepted
    spec_drafted: int = 0
    spec_accepted: int = 0


class Engine:
    def __init__(self, program: RankProgram, cfg: EngineConfig, *, vocab_size: int,
                 eos_token_ids: tuple[int, ...] = (), max_position_embeddings: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_blocks: int | None = None, grammar: GrammarCompiler | None = None):
        """`num_blocks`: the KV pool size if already decided (serving decides it first and
        shares it with the other ranks, which bind and capture alongside); else kv_blocks().
        `grammar`: compiles requests' grammars (built for this model's vocab and EOS ids);
        None: a request with a grammar gets an error output."""
        if grammar is not None and grammar.vocab_size != vocab_size:
            raise ValueError(f"the grammar compiler is built for a vocab of "
                             f"{grammar.vocab_size}, the model's is {vocab_size}")
        self.grammar = grammar
        self.program, self.cfg = program, cfg
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:   # "cuda" -> "cuda:0"
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.vocab_size, self.eos = vocab_size, tuple(eos_token_ids)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.max_model_len = cfg.model_len(max_position_embeddings)
        self.num_blocks = num_blocks or kv_blocks(cfg, program, dtype, self.device,
                                                  self.max_model_len)
        self.graphs = bind_rank(program, cfg, self.num_blocks, self.max_model_len, dtype,
                                self.device)
        kv_bytes = sum(c.numel() * c.element_size() for c in program.caches)
        log.info("KV pool: %d blocks of %d tokens (%d tokens, %.1f GiB on this rank)",
                 self.num_blocks, cfg.page_size, self.num_blocks * cfg.page_size,
                 kv_bytes / 2**30)
        self.step_model, self.step_samples = cfg.step_time_model, []
        if self.step_model is None and (cfg.decode_floor_tps > 0 or cfg.profile_step_time):
            self.step_model, self.step_samples = self.profile_step_time()
        self.sched = Scheduler(
            num_blocks=self.num_blocks, page_size=cfg.page_size, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=self.max_model_len,
            session_ttl=cfg.session_ttl, enable_prefix_caching=cfg.enable_prefix_caching,
            max_tokens_with_decodes=cfg.max_tokens_with_decodes or 0,
            decode_floor_tps=cfg.decode_floor_tps,
            step_model=self.step_model.to_dict() if self.step_model else None,
            prefill_buckets=list(self.graphs.prefill_sizes) if self.graphs else [])
        self.block_table = self.sched.block_table
        self.sampler = BatchSampler(cfg.max_num_seqs, vocab_size, self.device)
        self.suffix = SuffixDrafter() if cfg.speculative == "suffix" else None
        self.spec_cost = _spec_cost(self.step_model)
        self.live: dict[int, _Live] = {}     # scheduler key -> request
        self.keys: dict[str, int] = {}       # API request id -> scheduler key
        self._next_key = 0
        self.steps_run = 0                   # forward steps, graphed or eager

    def profile_step_time(self) -> tuple[StepTimeModel, list]:
        """Time this rank's real steps (graphs where a bucket holds them; the other ranks
        follow the broadcast steps) over the engine's limits and fit the step-time model.
        Runs before any request: it writes only KV blocks no request holds yet."""
        cfg = self.cfg
        prefill = cfg.max_tokens_with_decodes or cfg.max_num_batched_tokens

        def run(step: StepInputs) -> torch.Tensor:
            broadcast_step(step)
            return run_step(self.program, self.graphs, step, self.device)

        model, samples = profile(run, max_decodes=cfg.max_num_seqs, max_prefill=prefill,
                                 max_context=self.max_model_len, page_size=cfg.page_size,
                                 num_blocks=self.num_blocks, vocab_size=self.vocab_size,
                                 device=self.device)
        if self.graphs is not None:             # the profile is not serving
            self.graphs.replays = self.graphs.eager_steps = 0
        return model, samples

    # -------------------------------------------------------------- requests in and out

    def add(self, req: AddRequest) -> RequestOutput | None:
        """Queue a request; an immediate error output if the engine cannot take it."""
        def error(msg: str) -> RequestOutput:
            return RequestOutput(req.rid, finish_reason="error", prompt_tokens=len(req.prompt_ids),
                                 error=msg)
        if req.rid in self.keys:
            return error(f"request id {req.rid!r} is already running")
        p = req.params
        for what, ids in (("prompt", req.prompt_ids), ("stop", p.stop_token_ids),
                          ("logit_bias", [t for t, _ in p.logit_bias])):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                return error(f"{what} token id {bad[0]} outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if len(req.prompt_ids) >= self.max_model_len:
            return error(f"prompt of {len(req.prompt_ids)} tokens does not fit max_model_len "
                         f"{self.max_model_len}")
        if req.decode_floor_tps and self.step_model is None:
            return error("decode floor: this engine has no step-time model to keep a floor "
                         "with (start tsrun with --decode-floor-tps or --step-time-model)")
        if not (req.decode_floor_tps >= 0 and np.isfinite(req.decode_floor_tps)):
            return error(f"decode floor must be a finite number >= 0, "
                         f"got {req.decode_floor_tps}")
        matcher = None
        if p.grammar is not None:
            if self.grammar is None:
                return error("grammar: this engine has no grammar backend (tsrun builds one "
                             "from the tokenizer folder)")
            try:
                matcher = self.grammar.matcher(p.grammar)
            except ValueError as e:
                return error(str(e))
        stop = tuple(p.stop_token_ids) + (() if p.ignore_eos else self.eos)
        key = self._next_key
        self._next_key += 1
        self.sched.add_request(key, np.asarray(req.prompt_ids, np.int32), p.max_tokens,
                               list(stop), req.session_id or "", req.arrival,
                               req.decode_floor_tps)
        live = self.live[key] = _Live(req.rid, p, tuple(req.prompt_ids), grammar=matcher)
        if self.cfg.speculative is not None:
            if p.grammar is not None or _uses_penalty(p):
                log.debug("request %s: no speculation (%s)", req.rid,
                          "grammar" if p.grammar is not None else "penalties")
            else:
                if self.suffix is not None:
                    live.drafter = self.suffix.start(key, list(req.prompt_ids), req.session_id)
                else:
                    live.drafter = NgramDrafter(list(req.prompt_ids))
                live.policy = AdaptiveDraftLength(self.spec_cost,
                                                  k_max=self.cfg.num_speculative_tokens)
        self.keys[req.rid] = key
        return None

    def abort(self, rid: str, reason: str = "abort") -> RequestOutput | None:
        """Finish a live request now; None if it already finished (a benign race)."""
        key = self.keys.get(rid)
        if key is None:
            return None
        self.sched.abort(key, FINISH_CODES[reason], time.monotonic())
        return self._forget(key, reason)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every live request with an error (the engine is going down)."""
        now = time.monotonic()
        outs = []
        for key in list(self.live):
            self.sched.abort(key, FINISH_ERROR, now)
            outs.append(self._forget(key, "error", message))
        return outs

    def _forget(self, key: int, reason: str, error: str | None = None) -> RequestOutput:
        """The engine's bookkeeping of a request the scheduler has finished."""
        r = self.live.pop(key)
        del self.keys[r.rid]
        if r.slot is not None:
            self.sampler.release(r.slot)
        if isinstance(r.drafter, SuffixRequest):
            self.suffix.finish(r.drafter)       # the output joins its session's index
        if r.spec_rows:
            log.debug("request %s: %d verify steps, %d/%d drafts accepted (%.2f per step)",
                      r.rid, r.spec_rows, r.spec_accepted, r.spec_drafted,
                      r.spec_accepted / r.spec_rows)
        return RequestOutput(r.rid, finish_reason=reason, prompt_tokens=len(r.prompt),
                             cached_tokens=r.cached or 0, error=error, **_spec_fields(r))

    @property
    def has_work(self) -> bool:
        return self.sched.has_work

    def stats(self) -> EngineStats:
        s = self.sched.stats()
        return EngineStats(running=s["running"], waiting=s["waiting"],
                           kv_blocks_total=s["blocks_total"], kv_blocks_used=s["blocks_in_use"],
                           prefix_hit_tokens=s["prefix_hit_tokens"],
                           prompt_tokens=s["prompt_tokens"],
                           generation_tokens=s["generated_tokens"],
                           preemptions=s["preemptions"], steps=self.steps_run,
                           eager_steps=self.eager_steps,
                           spec_verify_steps=s["spec_verify_rows"],
                           spec_draft_tokens=s["spec_draft_tokens"],
                           spec_accepted_tokens=s["spec_accepted_tokens"])

    @property
    def eager_steps(self) -> int:
        """Forward steps that ran the program eagerly (no CUDA-graph bucket held them,
        or there are no graphs: the CPU, --enforce-eager)."""
        return self.graphs.eager_steps if self.graphs is not None else self.steps_run

    # -------------------------------------------------------------- one step

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Plan, run the forward, sample, and hand the tokens back to the scheduler."""
        if self.cfg.speculative is not None:
            self._set_drafts()
        plan = self.sched.plan(time.monotonic())
        self._apply_admissions(plan)
        if not self.sched.plan_pending:
            return []
        try:
            keys, result = self._forward_and_sample(plan)
        except Exception as e:       # fail this step's requests, not the engine
            return self._fail_step(e)
        return self._commit(plan, keys, result)

    def _apply_admissions(self, plan: dict) -> None:
        """Sampler rows follow the plan's lifecycle changes: preempted requests give theirs
        back, admitted ones get one (with their seed, kept across preemptions)."""
        for key in plan["preempted_ids"].tolist():
            r = self.live[key]
            self.sampler.release(r.slot)
            r.slot = None
        for key, slot, cached in zip(plan["admitted_ids"].tolist(),
                                     plan["admitted_slots"].tolist(),
                                     plan["admitted_cached"].tolist()):
            r = self.live[key]
            r.slot = slot
            r.cached = cached if r.cached is None else r.cached
            r.seed = self.sampler.admit(slot, r.params, r.prompt, r.outputs, seed=r.seed,
                                        grammar=r.grammar)

    def _set_drafts(self) -> None:
        """Each speculating request that holds KV and has sampled proposes its next draft
        (the scheduler ignores drafts of requests that are not decoding at plan time)."""
        ids, lens, toks = [], [], []
        for key, r in self.live.items():
            if r.drafter is None or r.slot is None or not r.outputs:
                continue
            k = r.policy.choose() if self.cfg.spec_adaptive else self.cfg.num_speculative_tokens
            if k == 0:                  # no verify: a free probe keeps the estimate moving
                r.shadow = r.drafter.propose(r.policy.probe_k) or None
                continue
            r.shadow = None
            draft = r.drafter.propose(k)
            if draft:
                ids.append(key)
                lens.append(len(draft))
                toks += draft
        if ids:
            self.sched.set_drafts(np.asarray(ids, np.uint64), np.asarray(lens, np.int32),
                                  np.asarray(toks, np.int32))

    def _forward_and_sample(self, plan: dict) -> tuple[list[int], SampleResult]:
        inputs = StepInputs.from_plan(plan, self.block_table, self.cfg.page_size)
        broadcast_step(inputs)
        self.steps_run += 1
        logits = forward_step(self.program, self.graphs, inputs, self.device)
        rows = plan["sample"] == 1
        keys = plan["req_ids"][rows].tolist()
        slots = plan["slots"][rows].astype(np.int64)
        steps = np.array([len(self.live[k].outputs) for k in keys], dtype=np.int64)
        spec = plan["spec_lens"][rows].astype(np.int64)
        if not spec.any():
            return keys, self.sampler.sample(logits, torch.from_numpy(slots),
                                             torch.from_numpy(steps))
        # Verify rows: one sampler row per position, each at its own output index.
        n = spec + 1
        first = np.repeat(np.cumsum(n) - n, n)
        offsets = np.repeat(steps, n) + np.arange(int(n.sum())) - first
        return keys, self.sampler.sample(logits, torch.from_numpy(np.repeat(slots, n)),
                                         torch.from_numpy(offsets), repeats=True)

    def _verify(self, plan: dict, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per sample row: the tokens it emits (accepted drafts, then the bonus draw), flat,
        and how many. A plain row emits its one draw."""
        rows = plan["sample"] == 1
        spec = plan["spec_lens"][rows].astype(np.int64)
        if not spec.any():
            return draws, np.ones(len(draws), np.int32)
        qsl = np.zeros(len(plan["query_lens"]) + 1, np.int64)
        np.cumsum(plan["query_lens"], out=qsl[1:])
        starts = qsl[:-1][rows]
        ids = plan["input_ids"]
        out, counts, off = [], np.empty(len(spec), np.int32), 0
        for j, k in enumerate(spec.tolist()):
            d = draws[off:off + k + 1]
            a = accepted_length(d, ids[starts[j] + 1:starts[j] + 1 + k]) if k else 0
            out.append(d[:a + 1])
            counts[j] = a + 1
            off += k + 1
        return np.concatenate(out).astype(np.int32), counts

    def _commit(self, plan: dict, keys: list[int], result: SampleResult
                ) -> list[RequestOutput]:
        """The emitted tokens to the scheduler (which decides stop and length finishes, token
        by token, and rolls verify rows back to what they kept) and to the requests'
        grammars and drafters, then one output per sampled request still live."""
        draws = result.token_ids.cpu().numpy().astype(np.int32)
        tokens, counts = self._verify(plan, draws)
        now = time.monotonic()
        codes, kept = self.sched.update_verified(tokens, counts, now)
        lps = result.token_logprobs() if result.logprobs is not None else None
        spec = plan["spec_lens"][plan["sample"] == 1].tolist()
        outs, off, row = [], 0, 0       # off: into tokens; row: into the sampler's rows
        for j, key in enumerate(keys):
            c, k, n = int(counts[j]), spec[j], int(kept[j])
            toks = tokens[off:off + n].tolist()
            lp = [x for x in lps[row:row + n]] if lps is not None else []
            off += c
            row += k + 1
            r = self.live.get(key)
            if r is None:            # aborted while the step ran
                continue
            reason = FINISH_NAMES.get(int(codes[j]))
            if k:
                r.spec_rows += 1
                r.spec_drafted += k
                r.spec_accepted += min(c - 1, n)
                r.policy.update(k, c - 1)
            elif r.shadow is not None and toks:
                r.policy.update(1, int(r.shadow[0] == toks[0]))
                r.shadow = None
            if r.grammar is not None:       # grammar requests never speculate: one token
                tok = toks[0]
                if not r.grammar.accept(tok):
                    if reason is None:
                        self.sched.abort(key, FINISH_ERROR, now)
                    outs.append(self._forget(
                        key, "error", f"grammar: sampled token {tok} is outside the request's "
                                      f"grammar ({r.grammar.describe()})"))
                    continue
                if reason is None and r.grammar.terminated:   # EOS that is not a stop id
                    self.sched.abort(key, FINISH_STOP, now)
                    reason = "stop"
            r.outputs += toks
            if r.drafter is not None:
                r.drafter.extend(toks)
            outs.append(RequestOutput(r.rid, tuple(toks),
                                      tuple(x for x in lp if x is not None),
                                      finish_reason=reason, prompt_tokens=len(r.prompt),
                                      cached_tokens=r.cached or 0,
                                      **(_spec_fields(r) if reason is not None else {})))
            if reason is not None:
                self._forget(key, reason)
        return outs

    def _fail_step(self, e: Exception) -> list[RequestOutput]:
        """Error outputs for the failed step's requests. `fail_pending` finishes them in
        the scheduler without counting the chunk as computed, so none of its pages (whose
        KV was never written) reaches the prefix cache. In a world of several ranks the
        failure is fatal (RankFailure)."""
        log.exception("step failed")
        message = f"{type(e).__name__}: {e}"
        outs = [self._forget(key, "error", message)
                for key in self.sched.fail_pending(time.monotonic()).tolist()]
        if self.world > 1:
            raise RankFailure(f"a step failed on rank 0 of {self.world}: {message}", outs) from e
        return outs


def accepted_length(draws: np.ndarray, drafts: np.ndarray) -> int:
    """How many drafts a verify row accepts: the longest prefix of `drafts` equal to the
    row's draws at their positions (`draws` has one more entry, the bonus position)."""
    k = len(drafts)
    miss = np.flatnonzero(np.asarray(draws[:k]) != np.asarray(drafts))
    return int(miss[0]) if miss.size else k


def _spec_fields(r: _Live) -> dict:
    return {"spec_verify_steps": r.spec_rows, "spec_draft_tokens": r.spec_drafted,
            "spec_accepted_tokens": r.spec_accepted}


def _spec_cost(model: StepTimeModel | None) -> LinearStepCost:
    """A verify step's cost in plain decode steps: from the step-time model when there is
    one (each draft token priced as a prefill token against a one-decode step), else the
    policy's default (a memory-bound GPU decode, where K extra query rows are nearly free)."""
    if model is None or model.base + model.per_decode <= 0:
        return LinearStepCost()
    return LinearStepCost(1.0, model.per_prefill_token / (model.base + model.per_decode))


def forward_step(forward, graphs, step: StepInputs, device: torch.device) -> torch.Tensor:
    """The rank's forward for one step (engine and follower ranks alike): `run_step`, whose
    graphs include verify buckets (logits at every draft position) when the engine
    speculates; a verify step no bucket holds runs eagerly and is counted."""
    return run_step(forward, graphs, step, device)
