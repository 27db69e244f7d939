"""The step-time model the decode-floor scheduler sizes prefill with: what one engine step
costs on this card, as a function of its decode rows, their context and its prefill chunks.

What it is: `StepTimeModel` (six non-negative coefficients, the C++ planner's
`tsc::StepTimeModel`, runtime/csrc/scheduler.h), a fit of those coefficients to timed steps
(`fit`: non-negative least squares, then scaled up so that it over-predicts every profiled
step: a floor planned from it holds on the profile), and `profile`, which times the rank's
real steps (graphs where a bucket holds them, as in serving) at start-up. JSON in and out
(`tsrun --step-time-model FILE`, `--save-step-time-model FILE`), so a card profiled once can
skip the profile.
What it is not: the planner (runtime/csrc/scheduler.cpp sizes each step's chunks from it),
or a promise about steps unlike the profiled ones (it extrapolates linearly).

    t(step) = base + per_decode * D + per_kv_token * sum(decode context)
              + [step has prefill] * (prefill_base + per_prefill_token * P
                                      + per_prefill_attn * sum_chunks c * (prefix + c / 2))
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from tscompile.kernels import build_metadata
from tscompile.runtime.step_io import StepInputs

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    base: float = 0.0
    per_decode: float = 0.0
    per_kv_token: float = 0.0
    prefill_base: float = 0.0
    per_prefill_token: float = 0.0
    per_prefill_attn: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise ValueError(f"step-time model: {f.name} must be a finite number >= 0, "
                                 f"got {v!r}")

    def predict(self, decode_context: Sequence[int], chunks: Sequence[tuple[int, int]]) -> float:
        """Seconds of a step: `decode_context` the decodes' context lengths (after the step),
        `chunks` (prefix, tokens) of each prefill chunk."""
        return float(np.dot(asdict_values(self), features(decode_context, chunks)))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StepTimeModel:
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"step-time model: expected the keys {sorted(names)}, got {got}")
        return cls(**{k: float(v) for k, v in d.items()})

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--step-time-model {path}: {e}") from e
        return cls.from_dict(d.get("model", d) if isinstance(d, dict) else d)

    def save(self, path: str | Path, samples: Sequence[Sample] = ()) -> None:
        Path(path).write_text(json.dumps(
            {"model": self.to_dict(), "samples": [asdict(s) for s in samples]}, indent=1))


def asdict_values(m: StepTimeModel) -> np.ndarray:
    return np.array([getattr(m, f.name) for f in fields(m)], dtype=np.float64)


def features(decode_context: Sequence[int], chunks: Sequence[tuple[int, int]]) -> np.ndarray:
    """The step's feature vector, in the coefficients' order."""
    has = 1.0 if chunks else 0.0
    return np.array([1.0, len(decode_context), float(sum(decode_context)), has,
                     float(sum(c for _, c in chunks)),
                     float(sum(c * (p + c / 2) for p, c in chunks))], dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Sample:
    decode_context: tuple[int, ...]
    chunks: tuple[tuple[int, int], ...]
    seconds: float


def fit(samples: Sequence[Sample]) -> StepTimeModel:
    """Non-negative least squares on relative error (every step weighs alike, short or
    long), then scaled so the model predicts at least every sample's measured time."""
    if len(samples) < 2:
        raise ValueError(f"step-time model: need >= 2 profiled steps, got {len(samples)}")
    x = np.stack([features(s.decode_context, s.chunks) for s in samples])
    y = np.array([s.seconds for s in samples])
    if (y <= 0).any():
        raise ValueError("step-time model: profiled step times must be positive")
    xw, yw = x / y[:, None], np.ones_like(y)
    active = [j for j in range(x.shape[1]) if x[:, j].any()]
    coef = np.zeros(x.shape[1])
    while active:                       # drop the most negative coefficient, refit
        sol, *_ = np.linalg.lstsq(xw[:, active], yw, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    pred = x @ coef
    if (pred <= 0).any():               # degenerate: a constant at the slowest step
        coef[:] = 0
        coef[0] = y.max()
        pred = x @ coef
    coef *= max(1.0, float((y / pred).max()))
    return StepTimeModel(*coef.tolist())


def synthetic_step(decode_context: Sequence[int], chunks: Sequence[tuple[int, int]],
                   page_size: int, num_blocks: int, vocab_size: int) -> StepInputs:
    """A step of the given shape over blocks 0.. (their contents are whatever the pool holds:
    a profile runs before any request, so nothing live is overwritten). Each sequence takes
    fresh blocks; raises if the pool is too small for the shape."""
    lens = list(decode_context) + [p + c for p, c in chunks]
    q = [1] * len(decode_context) + [c for _, c in chunks]
    tables, nxt = [], 0
    for n in lens:
        k = -(-n // page_size)
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
    if nxt > num_blocks:
        raise ValueError(f"profile step needs {nxt} KV blocks, the pool has {num_blocks}")
    meta = build_metadata(q, lens, tables, page_size)
    g = torch.Generator().manual_seed(len(lens) * 7919 + sum(lens))
    ids = torch.randint(0, vocab_size, (sum(q),), generator=g)
    pos = [n - 1 for n in decode_context]
    for p, c in chunks:
        pos += list(range(p, p + c))
    return StepInputs(ids, torch.tensor(pos, dtype=torch.int64), meta)


def profile_shapes(max_decodes: int, max_prefill: int, max_context: int,
                   pool_tokens: int | None = None
                   ) -> list[tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]:
    """The profiled step shapes: decode batches x contexts, chunks alone, over a prefix and
    beside decodes, within the engine's limits and a KV pool of `pool_tokens` (small
    enough to profile in seconds)."""
    pool = pool_tokens or max_decodes * max_context
    ds = sorted({1, max(1, max_decodes // 4), max_decodes})
    hi = max(1, min(max_context - 1, pool // max_decodes - 16))
    ctxs = sorted({min(hi, 256), hi})
    ps = sorted({min(max_prefill, 128), max(1, max_prefill // 2), max_prefill})
    shapes: list[tuple[tuple[int, ...], tuple[tuple[int, int], ...]]] = []
    for d in ds:
        for ctx in ctxs:
            shapes.append(((ctx,) * d, ()))
    for p in ps:
        shapes.append(((), ((0, p),)))
        prefix = min(max_context - p - 1, pool - p - 16, 4 * max_prefill)
        if prefix > 0:
            shapes.append(((), ((prefix, p),)))
        for d in (ds[0], ds[-1]):
            ctx = max(1, min(ctxs[0], (pool - p - 16) // d - 16))
            shapes.append(((ctx,) * d, ((0, p),)))
    return shapes


def profile(run: Callable[[StepInputs], torch.Tensor], *, max_decodes: int, max_prefill: int,
            max_context: int, page_size: int, num_blocks: int, vocab_size: int,
            device: torch.device, reps: int = 3) -> tuple[StepTimeModel, list[Sample]]:
    """Time `run` (the rank's forward: graphs where a bucket holds the step) on the profile
    shapes that fit the pool, the median of `reps` after one warm run; fit the model."""
    samples = []
    t0 = time.perf_counter()
    for dec, chunks in profile_shapes(max_decodes, max_prefill, max_context,
                                      num_blocks * page_size):
        try:
            step = synthetic_step(dec, chunks, page_size, num_blocks, vocab_size)
        except ValueError:
            continue                    # the pool cannot hold this shape
        ts = []
        for i in range(reps + 1):
            _sync(device)
            s = time.perf_counter()
            run(step)
            _sync(device)
            if i:
                ts.append(time.perf_counter() - s)
        samples.append(Sample(tuple(dec), tuple(chunks), float(np.median(ts))))
    model = fit(samples)
    log.info("step-time model from %d profiled steps in %.1f s: %s", len(samples),
             time.perf_counter() - t0,
             ", ".join(f"{k}={v:.3g}" for k, v in model.to_dict().items()))
    return model, samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
