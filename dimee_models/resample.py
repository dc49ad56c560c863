"""Calibration judged over resampled splits instead of one: the calibration and test outputs are
pooled, the partition is redrawn K times (seeded, the original sizes), every method is
recalibrated on each calibration part and scored on its test part. A budget that holds on one
test split by luck shows here as the share of redraws on which it holds."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from dimee_models.cost import CostModel
from dimee_models.calibration import calibrate_all
from dimee_models.candidates import score, score_candidates
from dimee_models.evaluate import method_assignments
from dimee_models.data import read_labels, read_texts
from dimee_models.outputs import ExitOutputs, split_outputs, text_outputs
from dimee_models.policy import load_policies


def partitions(n_calibration: int, n_test: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K seeded redraws of (calibration rows, test rows) of the pooled n_calibration + n_test rows."""
    rng = np.random.default_rng(seed)
    draws = [rng.permutation(n_calibration + n_test) for _ in range(k)]
    return [(d[:n_calibration], d[n_calibration:]) for d in draws]


def redraws_unlabeled(unlabeled: ExitOutputs | None) -> bool:
    """Whether `resampled` redraws the unlabelled texts with the labelled splits: their labels are
    known (an experiment's held-out texts), so they can be test rows on another redraw."""
    return unlabeled is not None and bool((unlabeled.labels >= 0).all())


def summarize(drops_pp: np.ndarray, cuts: np.ndarray, oracle_cuts: np.ndarray, budget_pp: float) -> dict:
    return {
        "k": len(drops_pp),
        "within_budget_share": float((drops_pp <= budget_pp + 1e-9).mean()),
        "cost_reduction_mean": float(cuts.mean()),
        "cost_reduction_p10": float(np.percentile(cuts, 10)),
        "cost_reduction_p90": float(np.percentile(cuts, 90)),
        "accuracy_drop_pp_mean": float(drops_pp.mean()),
        "accuracy_drop_pp_p10": float(np.percentile(drops_pp, 10)),
        "accuracy_drop_pp_p90": float(np.percentile(drops_pp, 90)),
        # the method's saving over the oracle's on the same redraw: routing quality apart from exit quality
        "oracle_share_mean": float((cuts / np.maximum(oracle_cuts, 1e-12)).mean()),
    }


def resampled(calibration: ExitOutputs, test: ExitOutputs, cost: CostModel, max_drop_pp: float,
              deltas: list[float | None], k: int, seed: int = 0, folds: int = 5,
              pairs: list[tuple[int, int]] | None = None, choice: ExitOutputs | None = None,
              unlabeled: ExitOutputs | None = None, prefer: str | None = None) -> dict:
    """{delta: {"methods": {name: summary}, "default_choices": {policy: redraws}}}; the method
    `served_default` is whichever policy the default chooser picked on each redraw. With boundary
    `pairs`, each redraw is calibrated at the boundaries the `choice` outputs (the training split's)
    choose, as `dimee calibrate` does (counted in `default_choices` as name@m/e). `unlabeled`
    outputs add to every redraw's guarantee, as they did to the artifact's. Where their labels are
    known (`redraws_unlabeled`), each redraw draws them from the pool too: the guarantee is over
    the draw of every text it certifies on, and fixed texts would judge it on one draw of them."""
    pooled = calibration.concat(test)
    redraw = redraws_unlabeled(unlabeled)
    if redraw:
        pooled = pooled.concat(unlabeled)
    n_cal, n_unlabeled = len(calibration.labels), len(unlabeled.labels) if redraw else 0
    base = cost.path_costs(test.mobile_exit, test.edge_exit, test.num_layers)["cloud_only"]
    found = {delta: defaultdict(list) for delta in deltas}  # delta -> method -> [(drop pp, cut)]
    choices = {delta: Counter() for delta in deltas}
    for cal_rows, rest in partitions(n_cal, len(pooled.labels) - n_cal, k, seed):
        cal_part, test_part = pooled.take(cal_rows), pooled.take(rest[n_unlabeled:])
        if redraw:
            drawn = pooled.take(rest[:n_unlabeled])
            unlabeled = replace(drawn, labels=np.full(n_unlabeled, -1))  # certified by agreement alone
        candidates = score_candidates(cal_part, cost, folds, seed) if pairs is None else None
        reference = float((test_part.reference == test_part.labels).mean())
        for delta in deltas:
            cal, default = calibrate_all(cal_part, cost, max_drop_pp, delta, folds, seed,
                                         candidates=candidates, pairs=pairs, choice=choice, unlabeled=unlabeled,
                                         prefer=prefer)
            served = cal.policies[default]
            choices[delta][f"{default}@{served.mobile_exit}/{served.edge_exit}" if pairs else default] += 1
            rows = method_assignments(test_part.at(served.mobile_exit, served.edge_exit), cal.policies, seed)
            rows["served_default"] = rows[default]
            for name, (tiers, paths) in rows.items():
                o = score(test_part.at(served.mobile_exit, served.edge_exit), tiers, cost, paths)
                found[delta][name].append(((reference - o.accuracy) * 100, 1 - o.cost / base))
    report = {}
    for delta in deltas:
        oracle_cuts = np.array([cut for _, cut in found[delta]["oracle"]])
        report[delta] = {
            "methods": {name: summarize(np.array([d for d, _ in v]), np.array([c for _, c in v]), oracle_cuts,
                                        max_drop_pp) for name, v in found[delta].items()},
            "default_choices": dict(choices[delta].most_common()),
        }
    return report


def add_resampled(result: dict, directory: Path, calibration: ExitOutputs, test: ExitOutputs, k: int,
                  seed: int = 0) -> dict:
    """`dimee evaluate --resamples K`: the evaluation `result` with each method's summary over K
    redraws, recalibrated as the artifact was (its budget, delta, folds, boundary candidates, unlabelled
    texts, and its cost model if in ms, as `dimee up` calibrates, else the result's abstract one)."""
    _, doc = load_policies(directory)
    delta, budget = doc.delta, doc.max_accuracy_drop_pp
    pairs = [tuple(p) for p in doc.boundaries["pairs"]] if doc.boundaries is not None else None
    stored = doc.cost_model
    cost = stored if stored.unit == "ms" else CostModel(**result["cost_model"])
    choice = split_outputs(directory, "train") if pairs is not None else None
    prefer = None
    if doc.wire.rounds:
        # The exits and the wire were chosen on the training split, the same in every redraw; the
        # outputs (`calibration`, `test`) are those served over the wire, at those exits only.
        pairs, choice = [(test.mobile_exit, test.edge_exit)], None
        prefer = doc.boundaries["chosen_by"] if doc.boundaries is not None else None
    unlabeled = None
    if doc.unlabeled is not None:
        file = doc.unlabeled.file
        unlabeled = text_outputs(directory, read_texts(file), wire=doc.wire).at(test.mobile_exit, test.edge_exit)
        labels = read_labels(file)
        if labels is not None:
            unlabeled = replace(unlabeled, labels=np.asarray(labels))
    found = resampled(calibration, test, cost, budget, [delta], k, seed, doc.folds or 5, pairs, choice,
                      unlabeled, prefer)[delta]
    methods = {name: {**row, "resampled": found["methods"][name]} if name in found["methods"] else row
               for name, row in result["methods"].items()}
    return {**result, "methods": methods, "resampled": {
        "k": k, "seed": seed, "delta": delta, "budget_pp": budget, "cost_unit": cost.unit,
        "unlabeled": None if unlabeled is None else "redrawn" if redraws_unlabeled(unlabeled) else "fixed",
        "served_default": found["methods"]["served_default"], "default_choices": found["default_choices"]}}


def format_resampled(result: dict) -> str:
    r = result["resampled"]
    unlabeled = {"fixed": "; the unlabelled texts the same in every redraw",
                 "redrawn": "; the unlabelled texts (labels known) redrawn with them"}.get(r.get("unlabeled"), "")
    lines = [f"over {r['k']} redraws of the calibration/test partition (seed {r['seed']}), recalibrated with "
             f"delta {r['delta']} and a budget of {r['budget_pp']} pp; saved: {r.get('cost_unit', 'abstract')} cost"
             + unlabeled,
             f"{'method':34s} {'within':>7s} {'saved':>7s} {'p10-p90':>15s} {'drop pp':>8s} {'p90':>6s}"
             f" {'/oracle':>8s}"]
    rows = [(name, m["resampled"]) for name, m in result["methods"].items() if "resampled" in m]
    for name, s in rows + [("served_default", r["served_default"])]:
        spread = f"{s['cost_reduction_p10']:.1%}-{s['cost_reduction_p90']:.1%}"
        lines.append(f"{name:34s} {s['within_budget_share']:7.0%} {s['cost_reduction_mean']:7.1%} {spread:>15s}"
                     f" {s['accuracy_drop_pp_mean']:8.2f} {s['accuracy_drop_pp_p90']:6.2f}"
                     f" {s['oracle_share_mean']:8.1%}")
    lines.append("served_default: the policy the default chooser picked on each redraw: "
                 + ", ".join(f"{name} {n}" for name, n in r["default_choices"].items()))
    return "\n".join(lines)
