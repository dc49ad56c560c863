"""How often the live bound alarms by chance: seeded Bernoulli streams of shadow checks at a rate
within the budget (at it: the worst case), each watched after every sample as the monitor watches
it (windows of deployments.live_risk.WINDOW samples, the k-th at delta / (k (k + 1))). Beside it,
the fixed-n bound the confidence sequence replaces: Clopper-Pearson's lower end recomputed after
every sample. An alarm: the lower end above the budget at any sample of the stream.

Reproduce (seconds to minutes; no cluster):
    python -m analysis.live_bound_simulation --streams 1000 --samples 20000 --out docs/results/live-risk/simulation.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from deployments.live_risk import WINDOW
from dimee_models.risk import DEFAULT_DELTA, binomial_cdf, mixture_log_wealth

_log_wealth = np.frompyfunc(mixture_log_wealth, 4, 1)


def alarms_of_sequence(x: np.ndarray, budget: float, delta: float) -> bool:
    """Any sample at which the monitor's lower end is above the budget: the mixture martingale at
    the budget past 1/delta_k, with the window's rate above the budget."""
    for k, start in enumerate(range(0, len(x), WINDOW), start=1):
        ones = np.cumsum(x[start:start + WINDOW])
        n = np.arange(1, len(ones) + 1)
        above = ones > budget * n
        if above.any():
            wealth = _log_wealth(ones[above], n[above], budget, budget).astype(float)
            if (wealth >= math.log(k * (k + 1) / delta)).any():
                return True
    return False


def alarms_of_fixed_n(x: np.ndarray, budget: float, delta: float) -> bool:
    """Clopper-Pearson's lower end, recomputed after every sample, above the budget at some sample:
    P(Bin(n, budget) >= ones) <= delta."""
    ones = np.cumsum(x)
    n = np.arange(1, len(x) + 1)
    # between two ones the lower end only falls: it is highest where a one has just come
    for i in np.flatnonzero(x & (ones > budget * n)):
        if 1 - binomial_cdf(int(ones[i]) - 1, int(n[i]), budget) <= delta:
            return True
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--samples", type=int, default=20000, help="shadow-checked samples per stream")
    p.add_argument("--budget-pp", type=float, default=0.3)
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    budget = args.budget_pp / 100
    rng = np.random.default_rng(args.seed)
    report = {"streams": args.streams, "samples": args.samples, "budget_pp": args.budget_pp, "delta": args.delta,
              "window": WINDOW, "seed": args.seed, "rates": []}
    for share in (1.0, 0.5):
        rate = share * budget
        sequence = fixed = 0
        for _ in range(args.streams):
            x = rng.random(args.samples) < rate
            sequence += alarms_of_sequence(x, budget, args.delta)
            fixed += alarms_of_fixed_n(x, budget, args.delta)
        row = {"rate_pp": 100 * rate, "false_alarm_rate": sequence / args.streams,
               "fixed_n_false_alarm_rate": fixed / args.streams}
        report["rates"].append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
