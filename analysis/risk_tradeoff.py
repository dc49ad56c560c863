"""What the accuracy guarantee costs: saving against the share of redraws within the budget, per delta.

For every artifact, pool its calibration and test outputs, redraw the partition K times (the
original sizes, seeded), recalibrate every method on each calibration part with each delta (and
`none`, the point estimate), and score it on the test part (dimee_models/resample.py). The
default cost model; nothing in the artifact is written.

Then, what a larger calibration split would buy: at N calibration samples the bound certifies at
most k*(N) losses (the largest k with P(Bin(N, budget) <= k) <= delta), an empirical loss rate of
k*/N. The saving at that loss rate is estimated on the pooled outputs (calibration + test) by the
cheapest setting of each policy whose pooled loss rate is within it: an estimate, not a test.

Reproduce (from the repository root, venv active):
    python -m analysis.risk_tradeoff artifacts/rt-polarity artifacts/trec6 --resamples 50 \
        --json docs/results/risk/minilm.json | tee docs/results/risk/minilm.txt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dimee_models.cli import delta_arg
from dimee_models.cost import CostModel
from dimee_models.candidates import choose, score_candidates
from dimee_models.outputs import ExitOutputs, split_outputs
from dimee_models.resample import resampled
from dimee_models.risk import binomial_cdf

SIZES = (1000, 2000, 5000, 10000, 20000, 50000)

SHOWN = ("served_default", "dimee_cascade_constrained", "dimee_escalate_constrained", "dimee_learned_constrained",
         "dimee_constrained", "oracle")


def table(name: str, report: dict, budget_pp: float, k: int) -> str:
    lines = [f"{name}: {k} redraws, budget {budget_pp} pp",
             f"{'delta':>6s} {'method':32s} {'within':>7s} {'saved':>7s} {'p10-p90':>13s} {'drop':>6s} {'p90':>6s}"
             f" {'/oracle':>8s}"]
    for delta, found in report.items():
        for method in SHOWN:
            s = found["methods"][method]
            spread = f"{s['cost_reduction_p10']:.1%}-{s['cost_reduction_p90']:.1%}"
            lines.append(f"{str(delta):>6s} {method:32s} {s['within_budget_share']:7.0%} {s['cost_reduction_mean']:7.1%}"
                         f" {spread:>13s} {s['accuracy_drop_pp_mean']:6.2f} {s['accuracy_drop_pp_p90']:6.2f}"
                         f" {s['oracle_share_mean']:8.1%}")
        lines.append(f"{'':>6s} served_default picked: {found['default_choices']}")
    return "\n".join(lines)


def certified_losses(n: int, budget: float, delta: float) -> int:
    """k*(n): the most losses of n that the bound still certifies (-1: not even 0)."""
    k = -1
    while binomial_cdf(k + 1, n, budget) <= delta:
        k += 1
    return k


def by_calibration_size(pooled: ExitOutputs, cost: CostModel, budget_pp: float, delta: float) -> list[dict]:
    candidates = score_candidates(pooled, cost)
    base = cost.path_costs(pooled.mobile_exit, pooled.edge_exit, pooled.num_layers)["cloud_only"]
    rows = []
    for n in SIZES:
        k = certified_losses(n, budget_pp / 100, delta)
        rate = max(k, 0) / n
        cuts = {c.name: 1 - c.outcomes[choose(c.outcomes, 0.0, rate * 100, strict=True).constrained].cost / base
                for c in candidates} if k >= 0 else {}
        rows.append({"calibration_size": n, "certified_losses": k, "loss_rate_pp": rate * 100, "estimated_cut": cuts})
    return rows


def size_table(rows: list[dict], delta: float) -> str:
    lines = [f"calibration size -> certified loss rate (delta {delta}) -> estimated saving on the pooled outputs",
             f"{'N':>7s} {'k*':>5s} {'rate pp':>8s}  " + "  ".join(f"{v:>16s}" for v in rows[-1]["estimated_cut"])]
    for r in rows:
        lines.append(f"{r['calibration_size']:7d} {r['certified_losses']:5d} {r['loss_rate_pp']:8.3f}  "
                     + "  ".join(f"{c:16.1%}" for c in r["estimated_cut"].values()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--resamples", type=int, default=50)
    parser.add_argument("--deltas", default="0.05,0.1,0.2,none", help="comma-separated; none = point estimate")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    deltas = [delta_arg(d) for d in args.deltas.split(",")]
    doc = {"resamples": args.resamples, "seed": args.seed, "budget_pp": args.max_accuracy_drop, "artifacts": {}}
    for directory in args.artifacts:
        started = time.time()
        cal, test = split_outputs(directory, "calibration"), split_outputs(directory, "test")
        report = resampled(cal, test, CostModel(), args.max_accuracy_drop, deltas, args.resamples, args.seed)
        print(table(directory.name, report, args.max_accuracy_drop, args.resamples))
        sizes = by_calibration_size(cal.concat(test), CostModel(), args.max_accuracy_drop, 0.1)
        print(size_table(sizes, 0.1))
        print(f"({time.time() - started:.0f} s; calibration {len(cal.labels)}, test {len(test.labels)} samples)\n")
        doc["artifacts"][directory.name] = {"n_calibration": len(cal.labels), "n_test": len(test.labels),
                                            "by_delta": {str(d): r for d, r in report.items()},
                                            "by_calibration_size": sizes}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
