"""The paper-style evaluation on the test split: every stored policy and the baselines, their
accuracy, cost and latency, as a table and a plot; and offline, what the server answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dimee_models import artifact
from dimee_models.candidates import ALPHA_GRID, Outcome, centroids_of, escalation_can_help, pools, score
from dimee_models.cost import PATHS, CostModel
from dimee_models.outputs import ExitOutputs, OutputSource, softmax, split_outputs
from dimee_models.policy import CascadePolicy, Mode, Policy, load_policies, nearest_centroid
from dimee_models.risk import RISK_PATH
from dimee_models.manifest import Manifest
from dimee_models.tiers import TIER_NAMES, Tier
from dimee_models.wire import Wire


def oracle_tiers(out: ExitOutputs) -> np.ndarray:
    """The cheapest tier whose prediction is right (cloud when none is)."""
    correct = out.tier_predictions == out.labels[:, None]  # (N, 3)
    return np.where(correct[:, 0], Tier.MOBILE, np.where(correct[:, 1], Tier.EDGE, Tier.CLOUD))


def method_assignments(out: ExitOutputs, policies: dict[str, Policy], seed: int = 0) -> dict:
    """name -> (tiers, paths) for every method of the table: the baselines and every stored policy."""
    n = len(out.labels)
    direct = {t: np.full(n, t) for t in range(3)}
    rows = {
        "cloud_only": (direct[Tier.CLOUD], np.full(n, PATHS.index("cloud_only"))),
        "mobile_only": (direct[Tier.MOBILE], None),
        "edge_only": (direct[Tier.EDGE], None),
    }
    mobile_probs, edge_probs = out.probs(out.mobile_exit), out.probs(out.edge_exit)
    for name, policy in policies.items():
        rows[name] = policy.assign(out.z, mobile_probs, edge_probs)
    if "dimee" in rows:
        fractions = np.bincount(rows["dimee"][0], minlength=3) / n
        rows["random"] = (np.random.default_rng(seed).choice(3, size=n, p=fractions), None)
    rows["oracle"] = (oracle_tiers(out), None)
    return rows


def bootstrap_drop_ci(correct: np.ndarray, reference: np.ndarray, rounds: int = 1000, seed: int = 0) -> list[float]:
    """95% paired bootstrap interval of the accuracy drop in percentage points."""
    idx = np.random.default_rng(seed).integers(0, len(correct), size=(rounds, len(correct)))
    drops = (reference[idx].mean(1) - correct[idx].mean(1)) * 100
    return [float(np.percentile(drops, 2.5)), float(np.percentile(drops, 97.5))]


def evaluate(out: ExitOutputs, policies: dict[str, Policy], cost: CostModel,
             latency: CostModel | None = None) -> dict:
    """Per method: accuracy, its drop against the final exit, the mean cost under `cost`; with a
    cost model in ms (`latency`), also the expected latency of a one-text request, mean and p50."""
    rows = method_assignments(out, policies)
    n = len(out.labels)
    exits = out.mobile_exit, out.edge_exit, out.num_layers
    base_cost = cost.path_costs(*exits)["cloud_only"]
    reference = out.reference == out.labels
    methods = {}
    for name, (tiers, paths) in rows.items():
        o: Outcome = score(out, tiers, cost, paths)
        correct = out.answers(tiers if paths is None else paths) == out.labels
        methods[name] = {
            "accuracy": o.accuracy,
            "accuracy_drop_pp": float(reference.mean() - o.accuracy) * 100,
            "accuracy_drop_pp_ci95": bootstrap_drop_ci(correct, reference),
            "cost": o.cost,
            "cost_reduction": 1 - o.cost / base_cost,
            "tier_fraction": dict(zip(TIER_NAMES, o.fractions)),
        }
        if latency is not None:
            ms = latency.costs_of(tiers if paths is None else paths, *exits)
            methods[name]["latency_ms"] = {"mean": float(ms.mean()), "p50": float(np.median(ms)),
                                           "saved": 1 - float(ms.mean()) / latency.path_costs(*exits)["cloud_only"]}
    return methods


def format_table(doc: dict) -> str:
    latency = "latency_model" in doc
    lines = [
        f"{doc['dataset']} / {doc['split']} (n={doc['n']}); cost model {json.dumps(doc['cost_model'])}",
        "baseline cloud_only = raw input shipped to the cloud, full model there (o_2 + lambda_cloud * L)",
        *([f"latency (ms, one text per request) from the profile's cost model {json.dumps(doc['latency_model'])}"]
          if latency else []),
        f"{'method':34s} {'acc':>7s} {'drop pp':>8s} {'95% CI':>15s} {'cost':>7s} {'saved':>7s}"
        f" {'mobile':>7s} {'edge':>7s} {'cloud':>7s}" + (f" {'ms mean':>8s} {'ms p50':>7s} {'ms saved':>8s}"
                                                           if latency else ""),
    ]
    for name, r in doc["methods"].items():
        lo, hi = r["accuracy_drop_pp_ci95"]
        f = r["tier_fraction"]
        ms = r.get("latency_ms")
        lines.append(
            f"{name:34s} {r['accuracy']:7.4f} {r['accuracy_drop_pp']:8.2f} {f'[{lo:.2f}, {hi:.2f}]':>15s}"
            f" {r['cost']:7.3f} {r['cost_reduction']:7.1%} {f['mobile']:7.1%} {f['edge']:7.1%} {f['cloud']:7.1%}"
            + (f" {ms['mean']:8.1f} {ms['p50']:7.1f} {ms['saved']:8.1%}" if ms else "")
        )
    return "\n".join(lines)


def plot(path: Path, cal: ExitOutputs, out: ExitOutputs, cost: CostModel, methods: dict) -> None:
    """Accuracy against mean cost on the test split as the threshold sweeps (centroids of each
    alpha fitted on the calibration split, as calibration does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dimee = [score(out, nearest_centroid(out.z, centroids_of(cal.z, pools(cal.tier_confidences, a))), cost)
             for a in ALPHA_GRID]
    mobile_probs, edge_probs = out.probs(out.mobile_exit), out.probs(out.edge_exit)
    up = escalation_can_help(out)  # as the served cascade: one threshold for both gates, as risk control walks it
    sweep = [CascadePolicy("sweep", out.mobile_exit, out.edge_exit, out.num_layers,
                           {"mobile": t, "escalate": t if up else 0.0}, {}) for t in RISK_PATH]
    cascade = [score(out, tiers, cost, paths)
               for tiers, paths in (policy.assign(out.z, mobile_probs, edge_probs) for policy in sweep)]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([o.cost for o in dimee], [o.accuracy for o in dimee], ".-", label="dimee (alpha sweep)")
    ax.plot([o.cost for o in cascade], [o.accuracy for o in cascade], ".-", label="dimee_cascade (one threshold sweep)")
    for name, marker in (("cloud_only", "s"), ("oracle", "*"), ("dimee_constrained", "o"),
                         ("dimee_learned_constrained", "D"), ("dimee_escalate_constrained", "P"),
                         ("dimee_cascade_constrained", "^")):
        if name in methods:
            ax.plot(methods[name]["cost"], methods[name]["accuracy"], marker, markersize=10, label=name)
    ax.set_xlabel("mean cost per sample")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_evaluation(directory: Path, cost: CostModel | None = None,
                   latency: CostModel | None = None) -> tuple[dict, ExitOutputs, ExitOutputs]:
    """The evaluation table on the test split with the stored policies. Costs are in the paper's
    abstract model: `cost`, else the stored one (thresholds were chosen for it), else, for policies
    calibrated in ms, the default. Latency is reported with `latency` (a cost model in ms), else
    with the stored model if it is in ms."""
    manifest = artifact.read_manifest(directory)
    policies, doc = load_policies(directory)
    stored = doc.cost_model
    cost = cost or (stored if stored.unit == "abstract" else CostModel())
    latency = latency or (stored if stored.unit == "ms" else None)
    if cost.unit != "abstract" or (latency is not None and latency.unit != "ms"):
        raise ValueError("the evaluation's cost model must be in abstract units and its latency model in ms")
    test_out, cal_out = (served_split(directory, part, manifest, doc.wire) for part in ("test", "calibration"))
    methods = evaluate(test_out, policies, cost, latency)
    result = {"dataset": manifest.dataset.name, "split": "test", "n": int(len(test_out.labels)),
              "cost_model": cost.model_dump(), "methods": methods}
    if latency is not None:
        result["latency_model"] = latency.model_dump()
    return result, cal_out, test_out


def served_split(directory: Path, part: str, manifest: Manifest, wire: Wire) -> ExitOutputs:
    """A split's outputs as the artifact serves them: at its exits, over its links' `wire`."""
    out = split_outputs(directory, part, manifest)
    return OutputSource(directory, manifest).wire_split(part, out.mobile_exit, out.edge_exit, wire)


def predict_texts(directory: str | Path, texts: list[str], mode: Mode = "dimee", pairs: list[str] | None = None,
                  policy_name: str | None = None) -> list[dict]:
    """What the server answers for these texts in `mode`, computed offline from the full model
    with the same plan (`Policy.plan`):
    [{"tier", "label_id", "confidence", "exit_layer", "escalated"}] in input order."""
    from dimee_models.data import TextDataset

    manifest = artifact.read_manifest(directory)
    policies, doc = load_policies(directory)
    policy = policies[policy_name or doc.default]
    plan = policy.plan(mode)
    out = OutputSource(directory, manifest).served(
        TextDataset("texts", texts, [0] * len(texts), manifest.labels, pairs), doc.wire)
    n, exits = len(texts), out.tier_exits()
    if plan.skips_mobile:
        tiers, paths = np.full(n, Tier.CLOUD), np.full(n, PATHS.index("cloud_only"))
    else:
        tiers = plan.tiers(out.z, out.probs(out.mobile_exit))
        escalated = (tiers == Tier.EDGE) & plan.escalated(out.probs(out.edge_exit))
        tiers, paths = np.where(escalated, Tier.CLOUD, tiers), np.where(escalated, PATHS.index("edge_cloud"), tiers)
    probs = [softmax(logits) for logits in out.path_logits()]
    return [{"tier": Tier(t).label, "label_id": int(probs[p][i].argmax()), "confidence": float(probs[p][i].max()),
             "exit_layer": exits[t], "escalated": bool(p == PATHS.index("edge_cloud"))}
            for i, (t, p) in enumerate(zip(tiers, paths))]
