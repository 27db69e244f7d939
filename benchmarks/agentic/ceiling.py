"""The roofline ceiling beside the measured curve: the most output tokens per GPU-minute a
workload can yield on a card at each TPS/user floor (issue 15 item 6).

What it is: pure functions (no GPU) from three sets of numbers to a curve, plus the readers
that produce those numbers. Every input says where it comes from:

  from the run (the card, measured in the same run by `benchmarks.kernels.harness.roofs`,
  or given on the command line / in a JSON):
    BW      copy bandwidth, bytes/s (a 2 GiB device copy, bytes read + written)
    FLOPS   matmul roof, FLOP/s (bf16 8192^3 mm)
    M       KV pool, tokens: the server's pool when given, else (GPU memory - every weight
            byte) / kvb, an upper bound (no activations, no fragmentation); none given: no
            memory bound
    gpus    GPUs holding one copy of the model: BW, FLOPS and memory add up, TPM is divided
            by it (tensor parallelism without communication cost)
  from the model (a preset or a `.tsprog`'s config, built on the meta device; bf16 weights
  and KV unless told otherwise):
    W0      bytes every decode step reads whatever its batch: every parameter except the
            routed experts and the input embedding table (a lookup of N rows; a table tied
            to the LM head is read in full, once, as the LM head)
    E, k, Be  per MoE layer: routed experts, experts per token, bytes of one expert
    W(N)    = W0 + sum over MoE layers of Be * E * (1 - (1 - k/E)^N): the expected number of
            distinct experts N tokens touch when each picks k of E uniformly (dense: W0)
    kvb     KV-cache bytes per token of context, all layers
    Pd, Pp  matmul parameters one token goes through in decode (LM head included) and in
            prefill (LM head excluded: logits only for a sequence's last position); an MoE
            layer counts its k routed experts, its shared experts and its router
    ad, ap  attention FLOPs per token per context position, all layers: GQA 4 Hq D in both
            (QK^T and PV); MLA decode (absorbed, over the latent cache) 2 Nh (2 Lkv + dr),
            MLA prefill (expanded heads) 2 Nh (dqk + dv)
  from the workload (the JSONL the sweep replays; turn k of a session has prompt
  C_k = context_tokens, output m_k = max_tokens (ignore_eos), uncached u_k = new_tokens:
  turn 0 its whole prompt, a later turn what it appends, the session's previous turn,
  reply included, being in the prefix cache):
    ctx     = sum m_k (C_k + (m_k - 1) / 2) / sum m_k    context of a decode step, per output token
    r       = sum u_k / sum m_k                          uncached prompt tokens per output token
    pre     = sum (u_k (C_k - u_k) + u_k (u_k - 1) / 2) / sum u_k
                                                         mean causal prefix of an uncached token
    fpt     = 2 Pp + ap pre                              FLOPs of one prefill token

Time. Decode traffic and prefill arithmetic add (no overlap: the issue's accounting, "decode:
weights + live KV bytes over the copy bandwidth; prefill: FLOPs over the matmul roof"):

    t_dec(N) = max((W(N) + N ctx kvb) / BW,  N (2 Pd + ad ctx) / FLOPS)   one step, N streaming
    t_pre    = r fpt / FLOPS                                             prefill per output token

The ceiling. A request streaming through steps of N users gets 1 / t_dec(N) tokens/s. If
every request keeps the floor F (each request's TPOT <= 1/F), summing over requests gives
sum over steps of N_i t_dec(N_i) <= (output tokens) / F; for t_dec(N) = a + b N (dense) the
decode time per output token, sum t_dec(N_i) / sum N_i, is then smallest when every step
has the same batch N*(F), the real root of t_dec(N*) = 1/F (batches of 5 and 6 users in turn
average 5.4: N* need not be an integer), capped by the pool (N* ctx <= M). The prefill costs
t_pre per output token wherever it runs (in steps of its own while no reply streams, which
leave decode steps at t_dec(N*)), so

    ceiling(F) = 60 N* / (t_dec(N*) + N* t_pre) / gpus     output tokens / minute / GPU
               = 60 / (1 / (F N*) + t_pre) / gpus         when the step (not the pool) binds

and 0 above F_max = 1 / t_dec(1) (one user's decode step alone is slower than the floor).
`binds` says which limit sets N*: "decode bytes" or "decode flops" (the step time, by its
larger term) or "kv pool". For an MoE, W(N) is concave and equal batches are an
approximation of the best mix, not a proof. `n_max` = floor(N*) is the largest batch of
which every step keeps the floor.

Interleaved (the decode-floor scheduler of item 4: every decode step also carries the N r
uncached tokens its outputs bring, so the prefill time is inside the floor): N_int(F) is the
real root of t_dec(N) + N t_pre = 1/F (same pool cap) and interleaved(F) = 60 F N_int / gpus
(60 N_int / (t_dec + N_int t_pre) / gpus where the pool binds). It is <= the ceiling (N_int <=
N* and N / (t_dec(N) + N t_pre) grows with N); it is reported beside it, not as the headline,
because a schedule that keeps prefill out of streaming steps (one user alternating prefill
and decode, at concurrency 1) beats it, so it is no upper bound.

What it is not: a bound on mean-of-reciprocal TPS/user (a few very fast requests can lift a
mean over the floor while most are slower: the ceiling assumes every request keeps it), a
model of overlap between decode traffic and prefill arithmetic (perfect overlap would raise
it), of attention's KV reads during prefill, of collectives, of speculative decoding (which
changes tokens per step), or of the sessions paused for their tool (their KV is assumed
offloaded for free). The shared system prompt's cross-session hits are not counted (a
slightly lower r in reality).

    python -m benchmarks.agentic ceiling --preset qwen3-8b --workload wl.jsonl \\
        --bw 4.3e12 --flops 7.9e14 [--kv-pool-tokens N | --gpu-memory-gib 139] \\
        [--summary run/summary.json] [--json out.json]
"""
from __future__ import annotations

import importlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .workload import Session

FLOORS = (70.0, 200.0)          # the headline floors (metrics.FLOORS; not imported: no numpy)
GRID_STEP = 5.0                 # TPS/user between points of the stored curve


# --- inputs ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MoELayers:
    """`count` MoE layers of `experts` routed experts, `top_k` per token, `expert_bytes` each
    (w13 + w2)."""
    count: int
    experts: int
    top_k: int
    expert_bytes: float


@dataclass(frozen=True, slots=True)
class ModelStats:
    name: str
    dense_step_bytes: float          # W0
    kv_bytes_per_token: float        # kvb, all layers
    decode_matmul_params: float      # Pd
    prefill_matmul_params: float     # Pp
    attn_decode_flops_per_pos: float     # ad
    attn_prefill_flops_per_pos: float    # ap
    weight_bytes_total: float = 0.0  # every weight (all experts): the memory bound
    moe: tuple[MoELayers, ...] = ()
    source: str = "given"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "moe": [asdict(m) for m in self.moe]}


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    sessions: int
    requests: int
    output_tokens: int               # sum m_k
    uncached_tokens: int             # sum u_k
    ctx: float                       # mean decode context per output token
    uncached_per_output: float       # r
    prefix_mean: float               # mean causal prefix of an uncached token
    source: str = "given"


@dataclass(frozen=True, slots=True)
class Roofs:
    bw: float                        # bytes/s
    flops: float                     # FLOP/s
    source: str = "given"
    device: str | None = None
    memory_bytes: float | None = None    # one GPU's memory, for the default pool
    raw: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not (self.bw > 0 and self.flops > 0):
            raise ValueError(f"roofs must be positive, got bw={self.bw} B/s, "
                             f"flops={self.flops} FLOP/s")


# --- the model -------------------------------------------------------------------------------

def expected_experts(experts: int, top_k: int, tokens: float) -> float:
    """Distinct experts `tokens` tokens touch when each picks `top_k` of `experts` uniformly:
    E (1 - (1 - k/E)^N) (each expert is missed by one token with probability 1 - k/E)."""
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k={top_k} must be in [1, experts={experts}]")
    if tokens <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def weight_bytes(m: ModelStats, n: float) -> float:
    """W(N): the weight bytes one decode step of N users reads."""
    return m.dense_step_bytes + sum(
        g.count * g.expert_bytes * expected_experts(g.experts, g.top_k, n) for g in m.moe)


def prefill_flops_per_token(m: ModelStats, w: WorkloadStats) -> float:
    return 2.0 * m.prefill_matmul_params + m.attn_prefill_flops_per_pos * w.prefix_mean


@dataclass(frozen=True, slots=True)
class Card:
    """The roofs and pool of the GPUs that hold one model copy (aggregated over `gpus`)."""
    bw: float
    flops: float
    pool_tokens: float | None        # None: no memory bound
    gpus: int = 1


def decode_step(m: ModelStats, w: WorkloadStats, card: Card, n: float
                ) -> tuple[float, float, float]:
    """(t_dec(N), bytes term, flops term) in seconds."""
    t_bytes = (weight_bytes(m, n) + n * w.ctx * m.kv_bytes_per_token) / card.bw
    t_flops = n * (2.0 * m.decode_matmul_params + m.attn_decode_flops_per_pos * w.ctx) / card.flops
    return max(t_bytes, t_flops), t_bytes, t_flops


def _root(f, target: float, cap: float | None) -> float:
    """Largest N in [0, cap] with f(N) <= target, f increasing: bisection on the real line."""
    lo, hi = 0.0, 1.0
    while f(hi) <= target and (cap is None or hi < cap):
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            raise ValueError("the step time does not grow with the batch: check the inputs")
    if cap is not None and hi >= cap:
        if f(cap) <= target:
            return cap
        hi = cap
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) <= target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return lo


def at(m: ModelStats, w: WorkloadStats, card: Card, floor: float) -> dict[str, Any]:
    """The ceiling (and the interleaved figure) at one TPS/user floor."""
    if floor <= 0:
        raise ValueError(f"a TPS/user floor must be > 0, got {floor}")
    cap = card.pool_tokens / w.ctx if card.pool_tokens is not None else None
    t_pre = w.uncached_per_output * prefill_flops_per_token(m, w) / card.flops
    budget = (1.0 / floor) * (1 + 1e-12)     # F_max itself (1 / t_dec(1)) rounds back in
    tdec = lambda n: decode_step(m, w, card, n)[0]              # noqa: E731
    out: dict[str, Any] = {"tps_user": floor, "output_tpm_per_gpu": 0.0, "n_star": 0.0,
                           "n_max": 0, "binds": None, "step_ms": None,
                           "prefill_ms_per_output": t_pre * 1e3,
                           "interleaved_tpm_per_gpu": 0.0, "interleaved_n": 0.0}
    t1 = tdec(1.0)
    if cap is not None and cap < 1.0:
        out["binds"] = (f"kv pool: {card.pool_tokens:.0f} tokens hold less than one "
                        f"{w.ctx:.0f}-token context")
        return out
    if t1 > budget:
        out["binds"] = (f"one user: its decode step alone takes {t1 * 1e3:.2f} ms > 1/F = "
                        f"{budget * 1e3:.2f} ms")
        return out

    def tpm(n: float) -> float:
        return 60.0 * n / (tdec(n) + n * t_pre) / card.gpus

    n = _root(tdec, budget, cap)
    t, t_bytes, t_flops = decode_step(m, w, card, n)
    out.update(output_tpm_per_gpu=tpm(n), n_star=n, n_max=int(math.floor(n + 1e-9)),
               step_ms=t * 1e3,
               binds="kv pool" if cap is not None and n >= cap * (1 - 1e-9) else
               "decode bytes" if t_bytes >= t_flops else "decode flops")
    if tdec(1.0) + t_pre <= budget:
        ni = _root(lambda x: tdec(x) + x * t_pre, budget, cap)
        out.update(interleaved_n=ni, interleaved_tpm_per_gpu=tpm(ni))
    return out


def max_tps_user(m: ModelStats, w: WorkloadStats, card: Card) -> float:
    """F_max = 1 / t_dec(1): above it the ceiling is 0."""
    return 1.0 / decode_step(m, w, card, 1.0)[0]


def grid_step(top: float, step: float = GRID_STEP, points: int = 100) -> float:
    """`step`, or the smallest 1/2/5 x 10^k above it that keeps the grid to `points`."""
    for c in sorted(m * 10.0 ** e for e in range(-3, 16) for m in (1, 2, 5)):
        if c >= step and top / c <= points:
            return c
    return top / points


def curve(m: ModelStats, w: WorkloadStats, card: Card, floors: Iterable[float] = FLOORS,
          step: float | None = None) -> list[dict[str, Any]]:
    """The ceiling at every `step` TPS/user (default 5, coarser past 100 points) up to F_max,
    at the floors and at F_max itself."""
    top = max_tps_user(m, w, card)
    step = grid_step(top) if step is None else step
    grid = {round(step * i, 6) for i in range(1, int(top // step) + 1)}
    grid |= {float(f) for f in floors} | {top}
    return [at(m, w, card, f) for f in sorted(grid)]


# --- the summary block -----------------------------------------------------------------------

def card_for(m: ModelStats, roofs: Roofs, gpus: int = 1, kv_pool_tokens: float | None = None,
             gpu_memory_bytes: float | None = None) -> tuple[Card, dict[str, Any]]:
    """The aggregated card and a description of where its pool came from."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    mem = gpu_memory_bytes if gpu_memory_bytes is not None else roofs.memory_bytes
    if kv_pool_tokens is not None:
        pool, how = float(kv_pool_tokens), "given (the server's pool)"
    elif mem is not None:
        free = gpus * mem - m.weight_bytes_total
        if free <= 0:
            raise ValueError(f"{m.name}: {m.weight_bytes_total / 2**30:.1f} GiB of weights do "
                             f"not fit {gpus} x {mem / 2**30:.1f} GiB")
        pool, how = free / m.kv_bytes_per_token, \
            f"({gpus} x {mem / 2**30:.1f} GiB - {m.weight_bytes_total / 2**30:.1f} GiB of " \
            "weights) / kvb: an upper bound"
    else:
        pool, how = None, "not given: no memory bound (pass --kv-pool-tokens or --gpu-memory-gib)"
    card = Card(roofs.bw * gpus, roofs.flops * gpus, pool, gpus)
    return card, {"copy_Bps": roofs.bw, "matmul_flops": roofs.flops, "roofs_source": roofs.source,
                  "device": roofs.device, "gpus": gpus, "gpu_memory_bytes": mem,
                  "kv_pool_tokens": pool, "kv_pool_from": how,
                  **({"roofs_raw": roofs.raw} if roofs.raw else {})}


def fraction(ceiling_at: dict[str, Any], headline: dict[str, Any] | None,
             levels: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Measured output TPM/GPU at the floor (the headline's figure, interpolated between the
    levels that bracket the floor) over the ceiling there; and the same for the highest
    concurrency level whose TPS/user (mean, as the headline) meets the floor."""
    floor = ceiling_at["tps_user"]
    ceil = ceiling_at["output_tpm_per_gpu"]
    measured = (headline or {}).get("output_tpm_per_gpu")
    res: dict[str, Any] = {
        "floor_tps_user": floor, "ceiling_tpm_per_gpu": ceil, "measured_tpm_per_gpu": measured,
        "fraction": None, "between_concurrency": (headline or {}).get("between_concurrency"),
        "reason": None, "fraction_of_interleaved": None, "at_level": None}
    if not ceil:
        res["reason"] = f"the ceiling is 0 at this floor ({ceiling_at['binds']})" + (
            "" if measured is None else f", yet {measured:.0f} was measured: check the inputs")
    elif measured is None:
        res["reason"] = ("the measured curve does not reach the floor: "
                         + ((headline or {}).get("reason") or "no measured run given"))
    else:
        res["fraction"] = measured / ceil
        if ceiling_at["interleaved_tpm_per_gpu"]:
            res["fraction_of_interleaved"] = measured / ceiling_at["interleaved_tpm_per_gpu"]
    ok = [lv for lv in levels or () if lv.get("tps_user_mean") is not None
          and lv.get("output_tpm_per_gpu") is not None and lv["tps_user_mean"] >= floor]
    if ok:
        best = max(ok, key=lambda lv: lv["concurrency"])
        res["at_level"] = {"concurrency": best["concurrency"],
                           "tps_user_mean": best["tps_user_mean"],
                           "output_tpm_per_gpu": best["output_tpm_per_gpu"],
                           "fraction": best["output_tpm_per_gpu"] / ceil if ceil else None}
    return res


def block(m: ModelStats, w: WorkloadStats, roofs: Roofs, *, gpus: int = 1,
          kv_pool_tokens: float | None = None, gpu_memory_bytes: float | None = None,
          floors: Iterable[float] = FLOORS, levels: list[dict[str, Any]] | None = None,
          headline: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The summary.json "ceiling" block: inputs by origin, the curve, the headline fractions."""
    floors = tuple(float(f) for f in floors)
    card, run = card_for(m, roofs, gpus, kv_pool_tokens, gpu_memory_bytes)
    pts = curve(m, w, card, floors)
    by_floor = {p["tps_user"]: p for p in pts}
    fpt = prefill_flops_per_token(m, w)
    measured_r = {str(lv["concurrency"]): lv["uncached_prompt_tokens"] / lv["output_tokens"]
                  for lv in levels or () if lv.get("uncached_prompt_tokens") is not None
                  and lv.get("output_tokens")}
    return {
        "what": "roofline ceiling of output TPM/GPU at each TPS/user floor: decode weights + "
                "live KV over the copy roof, prefill FLOPs over the matmul roof (see "
                "benchmarks/agentic/ceiling.py)",
        "inputs": {"from_run": run, "from_model": m.to_json(),
                   "from_workload": {**asdict(w), "prefill_flops_per_token": fpt},
                   "measured_uncached_per_output": measured_r},
        "tps_user_max": max_tps_user(m, w, card),
        "curve": pts,
        "fraction_of_ceiling": {
            f"{f:g}": fraction(by_floor[f], (headline or {}).get(f"{f:g}"), levels)
            for f in floors},
    }


def format_table(b: dict[str, Any], floors_only: bool = False) -> str:
    rows = [p for p in b["curve"] if not floors_only or
            f"{p['tps_user']:g}" in b["fraction_of_ceiling"]]
    lines = [f"{'TPS/user':>9} {'ceiling TPM/GPU':>15} {'N*':>7} {'step ms':>8} "
             f"{'interleaved':>11}  binds"]
    for p in rows:
        lines.append(f"{p['tps_user']:>9.1f} {p['output_tpm_per_gpu']:>15.0f} "
                     f"{p['n_star']:>7.2f} {p['step_ms'] or 0:>8.2f} "
                     f"{p['interleaved_tpm_per_gpu']:>11.0f}  {p['binds']}")
    for fr in b["fraction_of_ceiling"].values():
        lines.append(format_fraction(fr))
    return "\n".join(lines)


def format_fraction(fr: dict[str, Any]) -> str:
    head = f"fraction of ceiling at {fr['floor_tps_user']:g} TPS/user: "
    if fr["fraction"] is None:
        return head + f"null ({fr['reason']})"
    return head + (f"{fr['fraction']:.3f} ({fr['measured_tpm_per_gpu']:.0f} of "
                   f"{fr['ceiling_tpm_per_gpu']:.0f})")


# --- readers ---------------------------------------------------------------------------------

def workload_stats(sessions: list[Session], source: str = "given") -> WorkloadStats:
    """ctx, r and the mean prefix from every turn of the workload (see the module docstring)."""
    out = unc = 0
    ctx_sum = pre_sum = 0.0
    requests = 0
    for s in sessions:
        for t in s.turns:
            c, mk, u = t.context_tokens, t.max_tokens, min(t.new_tokens, t.context_tokens)
            requests += 1
            out += mk
            unc += u
            ctx_sum += mk * (c + (mk - 1) / 2.0)
            pre_sum += u * (c - u) + u * (u - 1) / 2.0
    if not out:
        raise ValueError("the workload generates no output tokens: no ceiling to compute")
    return WorkloadStats(len(sessions), requests, out, unc, ctx_sum / out, unc / out,
                         pre_sum / unc if unc else 0.0, source)


def workload_file_stats(path: str | Path) -> WorkloadStats:
    from . import workload as W
    _, sessions = W.load(path)
    return workload_stats(sessions, f"workload {path}")


def _attention_flops(m: Any) -> tuple[float, float]:
    """(decode, prefill) attention FLOPs per token per context position of one layer."""
    if hasattr(m, "kv_lora_rank"):                                # MLA
        heads = m.kv_b_proj.out_features // (m.dn + m.dv)
        return (2.0 * heads * (2 * m.kv_lora_rank + m.dr),
                2.0 * heads * (m.dn + m.dr + m.dv))
    if hasattr(m, "num_heads") and hasattr(m, "head_dim"):        # GQA / MHA
        f = 4.0 * m.num_heads * m.head_dim
        return f, f
    raise ValueError(f"attention module {type(m).__name__}: no FLOP count for it (known: GQA "
                     "with num_heads/head_dim, MLA with kv_lora_rank)")


def stats_of_module(net: Any, name: str, param_bytes: int = 2, kv_bytes: int = 2,
                    source: str = "given") -> ModelStats:
    """ModelStats of a model built on the meta device (CausalLM: embed_tokens, lm_head)."""
    from tscompile.models.layers import MoE
    from tscompile.runtime.kv_cache import attention_modules

    routed: dict[int, MoE] = {id(m): m for m in net.modules() if isinstance(m, MoE)}
    routed_params = {id(p) for m in routed.values() for p in (m.w13, m.w2)}
    embed = net.embed_tokens.weight
    lm_head = net.lm_head.weight
    tied = lm_head is embed
    total = step = matmul = 0
    for p in net.parameters():                   # shared tensors once
        n = p.numel()
        total += n
        if id(p) in routed_params or (p is embed and not tied):
            continue
        step += n
        if p.dim() >= 2:
            matmul += n
    groups: dict[tuple[int, int, float], int] = {}
    active = 0
    for m in routed.values():
        e = m.w13.shape[0]
        per = (m.w13.numel() + m.w2.numel()) / e
        groups[(e, m.top_k, per * param_bytes)] = groups.get((e, m.top_k, per * param_bytes),
                                                             0) + 1
        active += m.top_k * per
    attn = [m for _, m in attention_modules(net)]
    kv = 0
    ad = ap = 0.0
    for m in attn:
        kv += math.prod(m.kv_cache_shape(1, 1))
        d, p_ = _attention_flops(m)
        ad, ap = ad + d, ap + p_
    return ModelStats(
        name=name, dense_step_bytes=float(step * param_bytes),
        kv_bytes_per_token=float(kv * kv_bytes),
        decode_matmul_params=float(matmul + active),
        prefill_matmul_params=float(matmul + active - lm_head.numel()),
        attn_decode_flops_per_pos=ad, attn_prefill_flops_per_pos=ap,
        weight_bytes_total=float(total * param_bytes),
        moe=tuple(MoELayers(c, e, k, b) for (e, k, b), c in groups.items()), source=source)


def _module_with_preset(preset: str):
    from tscompile.models import BUILTIN, load_model_file
    found = [b for b in BUILTIN if preset in load_model_file(b).PRESETS]
    if len(found) != 1:
        raise ValueError(f"preset {preset!r} is in {found or 'no built-in model file'}: name the "
                         f"model file (--model-file {'/'.join(BUILTIN)})")
    return load_model_file(found[0])


def model_stats(preset: str | None = None, model_file: str | None = None,
                program: str | Path | None = None, param_bytes: int = 2,
                kv_bytes: int = 2) -> ModelStats:
    """From a preset (of `model_file`, or of the one built-in file that has it) or from a
    `.tsprog` (its model file and config, built again on the meta device)."""
    import torch

    from tscompile.models import build_config, load_model_file
    if program is not None:
        from tscompile.tsprog import read_tsprog
        prog = read_tsprog(program)
        info = prog.manifest["model"]
        try:
            module = importlib.import_module(info["module"])
        except ImportError:                      # a model file loaded by path: its copy
            tmp = Path(tempfile.mkdtemp()) / f"{info.get('name') or 'model'}.py"
            tmp.write_text(prog.model_source)
            module = load_model_file(tmp)
        cfg = module.CONFIG(**info["config"])
        name = f"{info.get('name')}:{info.get('preset') or 'config'}"
        source = f"program {program} (world {prog.world_size}; whole-model sizes)"
    else:
        if preset is None:
            raise ValueError("give a preset (--preset) or a program (--program)")
        module = load_model_file(model_file) if model_file else _module_with_preset(preset)
        cfg = build_config(module, preset=preset)
        name = f"{module.__name__.rsplit('.', 1)[-1]}:{preset}"
        source = f"preset {name}"
    with torch.device("meta"):
        net = module.MODEL(cfg)
    return stats_of_module(net, name, param_bytes, kv_bytes, source)


def measure_roofs() -> Roofs:
    """harness.roofs on this machine's GPU (CUDA)."""
    import torch

    from benchmarks.kernels.harness import roofs
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device to measure roofs on: pass --bw/--flops or --roofs")
    dev = torch.device("cuda")
    r = roofs(dev)
    props = torch.cuda.get_device_properties(dev)
    return Roofs(r["copy_GBps"] * 1e9, r["bf16_mm_TFLOPs"] * 1e12,
                 "measured (benchmarks.kernels.harness.roofs)", props.name,
                 float(props.total_memory), r)


def roofs_to_json(r: Roofs) -> dict[str, Any]:
    return {"copy_Bps": r.bw, "matmul_flops": r.flops, "source": r.source, "device": r.device,
            "memory_bytes": r.memory_bytes, "roofs": r.raw}


def load_roofs(path: str | Path) -> Roofs:
    """A JSON of `roofs_to_json` (the `roofs` command), or any with harness.roofs' dict under
    "roofs" (kernel harness and decode_step results)."""
    d = json.loads(Path(path).read_text())
    raw = d.get("roofs") or {}
    if "copy_Bps" in d:
        bw, fl = d["copy_Bps"], d["matmul_flops"]
    elif "copy_GBps" in raw:
        bw, fl = raw["copy_GBps"] * 1e9, raw["bf16_mm_TFLOPs"] * 1e12
    else:
        raise ValueError(f"{path}: no roofs (want copy_Bps/matmul_flops, or roofs.copy_GBps/"
                         "bf16_mm_TFLOPs as benchmarks.kernels.harness writes)")
    src = d.get("source") or "measured (benchmarks.kernels.harness.roofs)"
    return Roofs(float(bw), float(fl), f"{src}, from {path}", d.get("device"),
                 d.get("memory_bytes"), raw)
