"""Risk control: choose thresholds whose loss rate on new data is within the budget, with
probability at least 1 - delta over the calibration data.

A sample's loss is 1 when the final exit answers it right and the policy's answer is wrong, so
the loss rate bounds the accuracy drop against cloud-only from above. An unlabelled sample counts
1 when the policy's answer differs from the final exit's, which is 1 whenever a loss is: so each
such count is a Bernoulli variable whose mean is at least the loss rate, their sum over labelled
and unlabelled samples together is stochastically at least Bin(n, loss rate), and the same test
stays valid with both kinds of sample in n. The choice is Learn then
Test (Angelopoulos et al. 2021, as CALM and "Fast yet Safe" apply it to early exits) with
fixed-sequence testing: settings are tested along a path fixed in advance, from the safest on;
each test rejects "loss rate > budget" when the binomial tail P(Bin(n, budget) <= losses) is at
most delta; testing stops at the first setting it cannot reject, and the cheapest setting
rejected before it is chosen. The family-wise error is at most delta because each test is at
level delta and none runs after a failure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

DEFAULT_DELTA = 0.1  # `dimee calibrate --delta`: the budget holds on new data with probability >= 90%
# The path of a threshold applied alike to every gate of a policy, from "nobody passes" down;
# dense near 1, where a tight budget stops.
RISK_PATH = np.round(np.concatenate([[1.01], np.linspace(1.0, 0.9, 41), np.linspace(0.89, 0.0, 90)]), 4)


@lru_cache(maxsize=4096)
def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed in log space (n in the thousands underflows a direct product)."""
    if p <= 0 or k >= n:
        return 1.0
    if p >= 1:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p + (n - j) * log_q
             for j in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def loss_ucb(losses: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson upper bound on the loss rate at confidence 1 - delta: the p at
    which P(Bin(n, p) <= losses) = delta, by bisection (the tail falls as p grows)."""
    lo, hi = losses / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(losses, n, mid) > delta else (lo, mid)
    return hi


@dataclass(frozen=True)
class RiskBound:
    """What the risk-controlled choice guarantees for one chosen setting (stored in policy.json)."""

    delta: float
    budget_pp: float
    n: int  # calibration samples
    losses: int  # of them, answered right by the final exit and wrong by the chosen setting (unlabelled: differently)
    loss_ucb_pp: float  # upper confidence bound on the loss rate, percentage points
    guaranteed: bool  # False: no setting passed, the safest one was taken
    unlabeled: int = 0  # of the n samples, those without a label: certified by agreement with the final exit

    def to_json(self) -> dict:
        return asdict(self)


def fixed_sequence(order: list[int], costs: list[float], losses: list[int], n: int, budget: float,
                   delta: float, unlabeled: int = 0) -> tuple[int, RiskBound]:
    """Index of the cheapest setting that fixed-sequence testing along `order` (safest first, fixed
    before the losses are seen) certifies for the budget (a fraction), and its bound; if even the
    first fails, the first, marked not guaranteed."""
    chosen, passed = order[0], False
    for i in order:
        if binomial_cdf(losses[i], n, budget) > delta:
            break
        if not passed or costs[i] < costs[chosen]:
            chosen, passed = i, True
    bound = RiskBound(delta, budget * 100, n, losses[chosen], loss_ucb(losses[chosen], n, delta) * 100, passed,
                      unlabeled)
    return chosen, bound


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def mixture_log_wealth(ones: int, n: int, p: float, prior_mean: float) -> float:
    """ln M_n(p), Robbins' mixture martingale for n Bernoulli observations with `ones` ones against
    the rate p: the Beta(1, b) mixture's likelihood (prior mean `prior_mean`) over p's. Under rate p
    its expectation is 1 at every n, so by Ville's inequality it reaches 1/delta at any n, ever,
    with probability at most delta."""
    b = (1 - prior_mean) / prior_mean
    log_p = ones * math.log(p) if ones else 0.0
    log_q = (n - ones) * math.log1p(-p) if n > ones else 0.0
    return _log_beta(1 + ones, b + n - ones) - _log_beta(1, b) - log_p - log_q


def confidence_sequence(ones: int, n: int, delta: float, prior_mean: float) -> tuple[float, float]:
    """(lower, upper) bound on a Bernoulli rate after n observations, valid at every n at once with
    probability >= 1 - delta (a confidence sequence: watched continuously, it is wrong at some n
    with probability <= delta, where a fixed-n interval recomputed at every sample is not): the
    rates whose mixture martingale is below 1/delta. The martingale is convex in p with its
    minimum (<= 1) at ones / n, so each end is found by bisection."""
    if n == 0:
        return 0.0, 1.0
    level, mid = math.log(1 / delta), ones / n

    def end(inside: float, outside: float) -> float:
        for _ in range(60):
            p = (inside + outside) / 2
            inside, outside = (p, outside) if mixture_log_wealth(ones, n, p, prior_mean) < level else (inside, p)
        return outside

    low = 0.0 if ones == 0 else end(mid, 1e-12)
    high = 1.0 if ones == n else end(mid, 1 - 1e-12)
    return low, high
