"""Why the policies behave as they do: two measurements behind docs/RESULTS.md, "Offline: DIMEE against cloud-only on one test split".

1. How well each mobile-side estimate ranks "this exit agrees with the final exit" (AUC): the
   mobile confidence alone, the `learned` policy's regressions (z + the exit's probabilities) and
   the `escalate` policy's (the exit's probabilities only), cross-fitted on the calibration split.
2. Edge/final disagreements per split, and how many of them (and of the edge's losses: edge wrong,
   final right) an escalation threshold on the edge confidence sends on to cloud.

Reproduce (from the repository root, venv active):
    python -m analysis.policy_diagnostics artifacts/rt-polarity artifacts/trec6 | tee docs/results/policy-diagnostics.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dimee_models.candidates import agreement_targets, cross_fitted_scores
from dimee_models.outputs import split_outputs
from dimee_models.policy import policy_features

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pos, neg = scores[positive.astype(bool)], scores[~positive.astype(bool)]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def ranking(directory: Path) -> list[str]:
    cal = split_outputs(directory, "calibration")
    targets = agreement_targets(cal)
    probs = cal.probs(cal.mobile_exit)
    lines = [f"{directory.name}: AUC for 'agrees with the final exit' on calibration (n={len(targets)}, 5-fold cross-fitted)"]
    estimates = {"mobile confidence": np.stack([probs.max(-1)] * 2, axis=1)}
    for kind in ("learned", "escalate"):
        estimates[f"{kind} policy"] = cross_fitted_scores(policy_features(kind, cal.z, probs), targets, 5, 0)
    for name, scores in estimates.items():
        lines.append(f"  {name:18s} mobile exit {auc(scores[:, 0], targets[:, 0]):.3f}   "
                     f"edge exit {auc(scores[:, 1], targets[:, 1]):.3f}")
    return lines


def escalation(directory: Path) -> list[str]:
    lines = []
    for part in ("calibration", "test"):
        out = split_outputs(directory, part)
        preds, conf, labels = out.tier_predictions, out.tier_confidences[:, 1], out.labels
        disagree = preds[:, 1] != preds[:, 2]
        loss = (preds[:, 1] != labels) & (preds[:, 2] == labels)
        lines.append(f"{directory.name} {part} (n={len(labels)}): {disagree.sum()} edge/final disagreements, "
                     f"{loss.sum()} edge losses (edge wrong, final right)")
        for t in THRESHOLDS:
            up = conf < t
            lines.append(f"  escalate below {t:.1f}: {up.mean():6.1%} of samples go on, catching "
                         f"{(up & disagree).sum():3d}/{disagree.sum()} disagreements and {(up & loss).sum():3d}/{loss.sum()} losses")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    args = parser.parse_args()
    for directory in args.artifacts:
        if not (directory / "manifest.json").is_file():
            parser.error(f"{directory} is not an artifact (no manifest.json)")
        print("\n".join(ranking(directory) + escalation(directory)) + "\n")


if __name__ == "__main__":
    main()
