"""The risk-controlled choice: the binomial tail, the bound, fixed-sequence testing, and a seeded
synthetic case where the point estimate breaks the budget on new data and the bound does not."""

import math

import numpy as np
import pytest

from dimee_models.candidates import Outcome, choose
from dimee_models.risk import binomial_cdf, fixed_sequence, loss_ucb


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.1), (3, 20, 0.25), (7, 7, 0.5), (2, 2114, 0.003), (40, 1000, 0.05)])
def test_binomial_cdf_matches_the_sum_of_the_mass_function(k, n, p):
    exact = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))
    assert binomial_cdf(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def test_loss_ucb_is_the_clopper_pearson_bound():
    assert loss_ucb(0, 100, 0.1) == pytest.approx(1 - 0.1 ** (1 / 100), rel=1e-9)  # closed form for 0 losses
    u = loss_ucb(5, 1000, 0.1)
    assert binomial_cdf(5, 1000, u) == pytest.approx(0.1, rel=1e-6) and u > 5 / 1000
    assert loss_ucb(5, 1000, 0.05) > u > loss_ucb(5, 1000, 0.2)  # more confidence, a wider bound


def test_fixed_sequence_stops_at_the_first_setting_it_cannot_certify():
    # path 0 (safest) .. 3; setting 2 fails, so 3 is never tested although its losses would pass
    costs, losses = [1.0, 0.8, 0.6, 0.4], [0, 0, 9, 0]
    chosen, bound = fixed_sequence([0, 1, 2, 3], costs, losses, 1000, 0.01, 0.1)
    assert chosen == 1 and bound.guaranteed and bound.losses == 0
    chosen, _ = fixed_sequence([3, 2, 1, 0], costs, losses, 1000, 0.01, 0.1)  # the path, not the cost, decides
    assert chosen == 3
    chosen, bound = fixed_sequence([1, 0], [0.5, 1.0], [20, 30], 1000, 0.01, 0.1)  # the first fails: not guaranteed
    assert chosen == 1 and not bound.guaranteed


def test_the_bound_holds_on_new_data_where_the_point_estimate_does_not():
    """Settings j = 0..29 get cheaper as their true loss rate r_j grows past the 1% budget (at
    j = 10). A calibration draw of n samples sees each setting's losses (nested: a sample lost at
    j is lost at every cheaper setting). Over 400 seeded draws, the point estimate picks a setting
    whose true loss rate is over budget about half the time; the delta = 0.1 choice in at most
    10% of draws (the guarantee), and still saves."""
    budget, delta, n = 0.01, 0.1, 2000
    rates = np.linspace(0.0, 0.03, 30)  # r_10 = 1.03% > budget: settings 0..9 are within it
    costs = list(np.linspace(1.0, 0.4, 30))
    rng = np.random.default_rng(0)
    over_point, over_bound, chosen_bound = 0, 0, []
    for _ in range(400):
        u = rng.random(n)
        losses = [(u < r).mean() for r in rates]
        outcomes = [Outcome(0.9, c, 0.0, (0, 0, 1), loss, n) for c, loss in zip(costs, losses)]
        point = choose(outcomes, 0.9, budget * 100, strict=True).constrained
        bound, risk = fixed_sequence(list(range(30)), costs, [o.loss_count for o in outcomes], n, budget, delta)
        over_point += rates[point] > budget
        over_bound += rates[bound] > budget
        chosen_bound.append(bound)
        assert risk.guaranteed
    assert over_point / 400 > 0.3
    assert over_bound / 400 <= delta
    assert np.mean(chosen_bound) > 3  # the bound is not the trivial "always the safest"
