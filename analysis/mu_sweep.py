"""For which mu does the reward-based operating-point selection of DIMEE mean something?

For every artifact and mu (other costs at their CostModel defaults), calibrate the policies on the
calibration split's cached outputs (in memory only; nothing in the artifact is written), take the
reward-selected policies 'dimee' (nearest centroid) and 'dimee_learned', and report their
thresholds, their tier fractions on calibration, and their test accuracy, accuracy drop vs the final
exit and cost reduction vs cloud_only (o_2 + lambda_cloud * L). The test split only reports.

Reproduce (from the repository root, venv active):
    python -m analysis.mu_sweep artifacts/rt-polarity artifacts/trec6 \
        --json docs/results/mu-sweep.json | tee docs/results/mu-sweep.txt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dimee_models.cost import CostModel
from dimee_models.calibration import calibrate
from dimee_models.candidates import score
from dimee_models.outputs import split_outputs
from dimee_models.tiers import TIER_NAMES

ROUTERS = ("dimee", "dimee_learned")
DEFAULT_MU = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def fractions(out, policy) -> dict[str, float]:
    tiers = policy.route(out.z, out.probs(out.mobile_exit))
    return dict(zip(TIER_NAMES, (np.bincount(tiers, minlength=3) / len(tiers)).tolist()))


def sweep(directory: Path, mus: list[float], max_drop_pp: float) -> list[dict]:
    cal, test = split_outputs(directory, "calibration"), split_outputs(directory, "test")
    test_ref = float((test.tier_predictions[:, 2] == test.labels).mean())
    rows = []
    for mu in mus:
        cost = CostModel(mu=mu)
        base = cost.path_costs(test.mobile_exit, test.edge_exit, test.num_layers)["cloud_only"]
        policies = calibrate(cal, cost, max_drop_pp=max_drop_pp).policies
        for name in ROUTERS:
            pol = policies[name]
            o = score(test, pol.route(test.z, test.probs(test.mobile_exit)), cost)
            cal_frac = fractions(cal, pol)
            rows.append({
                "artifact": directory.name, "mu": mu, "policy": name, "thresholds": pol.thresholds,
                "calibration_fraction": cal_frac, "test_fraction": dict(zip(TIER_NAMES, o.fractions)),
                "degenerate": max(cal_frac.values()) >= 0.95,
                "test_accuracy": o.accuracy, "test_final_exit_accuracy": test_ref,
                "test_drop_pp": (test_ref - o.accuracy) * 100, "test_cost": o.cost,
                "test_cost_reduction": 1 - o.cost / base, "within_budget": (test_ref - o.accuracy) * 100 <= max_drop_pp,
            })
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'artifact':12s} {'mu':>5s} {'policy':14s} {'thresholds':22s} {'mobile':>7s} {'edge':>7s}"
            f" {'cloud':>7s} {'test acc':>8s} {'drop pp':>8s} {'saved':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        th = " ".join(f"{k}={v:.3f}" for k, v in r["thresholds"].items())
        f = r["calibration_fraction"]
        flag = " *" if r["degenerate"] else ""
        lines.append(f"{r['artifact']:12s} {r['mu']:5.2f} {r['policy']:14s} {th:22s} {f['mobile']:7.1%}"
                     f" {f['edge']:7.1%} {f['cloud']:7.1%} {r['test_accuracy']:8.4f} {r['test_drop_pp']:8.2f}"
                     f" {r['test_cost_reduction']:7.1%}{flag}")
    lines.append("fractions: calibration split; * = one tier >= 95% (degenerate); "
                 "drop and saved: test split, vs final exit and vs cloud_only (o_2 + lambda_cloud * L)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--mu", type=float, nargs="+", default=list(DEFAULT_MU))
    ap.add_argument("--max-accuracy-drop", type=float, default=0.3, help="budget in percentage points (default 0.3)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    start = time.perf_counter()
    rows = [r for d in args.artifacts for r in sweep(d, args.mu, args.max_accuracy_drop)]
    elapsed = time.perf_counter() - start
    print(table(rows))
    print(f"runtime {elapsed:.1f} s")
    args.json.write_text(json.dumps({"cost_model_defaults": CostModel().model_dump(), "max_accuracy_drop_pp": args.max_accuracy_drop,
                                     "runtime_s": elapsed, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
