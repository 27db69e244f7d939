"""Per-request draft length: speculate only as far as it pays, down to not at all.

What it is: a running estimate of the per-token acceptance probability `alpha` and a rule
that turns it, with a cost model of the verify step, into the next step's K in [0, k_max].
What it is not: the cost model itself (the scheduler's step-time model supplies it, a
function of K at the current batch) or the drafter.

Rule. With each draft token accepted with probability alpha given the ones before it were
(the usual i.i.d. model of Leviathan et al.), K draft tokens yield on average

    E[accepted | K] = alpha + alpha^2 + ... + alpha^K
    tokens per step = 1 + E[accepted | K]          (the verify step's bonus token is the 1)

and the step costs `cost(K)` (cost(0) = a plain decode step). K is the argmax of
tokens-per-step / cost(K); it must beat K = 0 by the factor `min_gain` (hysteresis, so a
break-even estimate does not flap). Napkin: at cost(K) = 1 + 0.05 K, alpha = 0.8 gives
K = 7 at 3.6 tokens/step for 1.35 cost (2.7x), alpha = 0.1 gives K = 1 at 1.1 / 1.05, and
alpha < 0.05 gives K = 0.

Estimate. Discounted counts: a draft of d tokens with a accepted is a successes out of
a + (1 if a < d) trials (the first rejection ends the trial); both counts decay by `decay`
per update, so alpha follows the request's current regime (re-emitting a file vs. writing
new code), and a Beta(prior) keeps it defined at the start. At K = 0 nothing is verified,
so the caller keeps scoring a free shadow draft of `probe_k` tokens against the tokens the
model actually produced (`update` with those counts): model-free drafting costs no GPU time,
and without it a request could never leave K = 0.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LinearStepCost:
    """Verify-step time with K draft tokens, in units of a plain decode step: a
    memory-bound decode reads the same weights and KV for q_len = K + 1, so the slope is
    small at batch 1 and grows with batch (take both from the step-time model)."""
    base: float = 1.0
    per_token: float = 0.05

    def __call__(self, k: int) -> float:
        return self.base + self.per_token * k


class AdaptiveDraftLength:
    def __init__(self, cost: Callable[[int], float] = LinearStepCost(), k_max: int = 7,
                 decay: float = 0.95, prior: tuple[float, float] = (0.5, 0.5),
                 min_gain: float = 1.02, probe_k: int = 1):
        if k_max < 0 or not 0.0 < decay <= 1.0 or min(prior) <= 0 or min_gain < 1.0:
            raise ValueError(f"AdaptiveDraftLength: need k_max >= 0 (got {k_max}), decay in "
                             f"(0, 1] (got {decay}), positive prior (got {prior}) and "
                             f"min_gain >= 1 (got {min_gain})")
        self.cost, self.k_max, self.decay = cost, k_max, decay
        self.prior, self.min_gain, self.probe_k = prior, min_gain, probe_k
        self.successes = 0.0
        self.trials = 0.0

    @property
    def alpha(self) -> float:
        a, b = self.prior
        return (self.successes + a) / (self.trials + a + b)

    def update(self, proposed: int, accepted: int) -> None:
        if not 0 <= accepted <= proposed:
            raise ValueError(f"AdaptiveDraftLength.update: accepted={accepted} must be in "
                             f"[0, proposed={proposed}]")
        if proposed == 0:
            return                        # nothing was drafted: no evidence either way
        self.successes = self.decay * self.successes + accepted
        self.trials = self.decay * self.trials + accepted + (1 if accepted < proposed else 0)

    def expected_accepted(self, k: int) -> float:
        a = self.alpha
        return sum(a ** i for i in range(1, k + 1))

    def choose(self) -> int:
        """The K for the next step (0: decode without speculation; then shadow-draft
        `probe_k` tokens)."""
        base = 1.0 / self.cost(0)
        best_k, best = 0, base * self.min_gain
        for k in range(1, self.k_max + 1):
            rate = (1.0 + self.expected_accepted(k)) / self.cost(k)
            if rate > best:
                best_k, best = k, rate
        return best_k
