"""Model outputs per split (cached in the artifact), calibration and the paper-style evaluation table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from dimee_models import artifact
from dimee_models.boundaries import choose_boundaries
from dimee_models.cost import PATHS, CostModel
from dimee_models.manifest import Exits, Manifest, PolicyRef
from dimee_models.policy import ALPHA_GRID as CASCADE_GRID
from dimee_models.policy import (EDGE_CLOUD, Calibration, Candidates, CloudOnlyPolicy, ExitOutputs, Mode, Outcome,
                                 Policy, calibrate, choose, load_policies, save_policies, score)
from dimee_models.risk import DEFAULT_DELTA, RiskBound
from dimee_models.tiers import TIER_NAMES, Tier
from dimee_models.train import batches, model_inputs


def split_outputs(directory: str | Path, part: str, manifest: Manifest | None = None) -> ExitOutputs:
    """Every exit's logits and the mobile embedding on a split, computed once and cached in the
    artifact (`outputs/<part>.safetensors`, listed in the manifest)."""
    if part not in ("calibration", "test"):
        raise ValueError(f"outputs are only computed for the calibration and test splits, not {part!r}")
    root = Path(directory)
    manifest = manifest or artifact.read_manifest(root)
    m, e = manifest.exits.mobile, manifest.exits.edge
    cache = root / "outputs" / f"{part}.safetensors"
    if cache.is_file():
        arrays = load_file(cache)
        if "z_layers" in arrays:  # older caches held one exit's embedding only
            return ExitOutputs(arrays["logits"], arrays["z_layers"][:, m - 1], arrays["labels"], m, e,
                               arrays["z_layers"])
    ds = artifact.load_split(root, part, manifest)
    model, tokenizer = artifact.load_full(root, manifest), artifact.load_tokenizer(root)
    logits, z = [], []
    with torch.inference_mode():
        for enc, _ in batches(ds, tokenizer, 64, manifest.max_length):
            outs = model(**model_inputs(enc))
            logits.append(torch.stack([o.logits for o in outs], dim=1))  # (B, L, C)
            z.append(torch.stack([o.pooled for o in outs], dim=1))  # (B, L, H): any layer can be the mobile exit
    arrays = {"logits": torch.cat(logits).numpy(), "z_layers": torch.cat(z).numpy(), "labels": np.asarray(ds.labels)}
    cache.parent.mkdir(exist_ok=True)
    save_file(arrays, cache)
    artifact.write_manifest(root, manifest)
    return ExitOutputs(arrays["logits"], arrays["z_layers"][:, m - 1], arrays["labels"], m, e, arrays["z_layers"])


# methods -------------------------------------------------------------------------------------------


def cascade_paths(conf: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Classic early exit over the tiers: stop at the first exit whose confidence clears the
    threshold, paying every hop on the way (cloud is reached through edge)."""
    tiers = np.where(conf[:, 0] >= threshold, Tier.MOBILE, np.where(conf[:, 1] >= threshold, Tier.EDGE, Tier.CLOUD))
    paths = np.array([Tier.MOBILE, Tier.EDGE, EDGE_CLOUD])[tiers]
    return tiers, paths


def _score_cascade(out: ExitOutputs, threshold: float, cost: CostModel) -> Outcome:
    tiers, paths = cascade_paths(out.tier_confidences, threshold)
    return score(out, tiers, cost, paths)


def calibrate_cascade(out: ExitOutputs, cost: CostModel, max_drop_pp: float,
                      delta: float | None = None) -> dict[str, float]:
    outcomes = [_score_cascade(out, t, cost) for t in CASCADE_GRID]
    ref = float((out.tier_predictions[:, 2] == out.labels).mean())
    choice = choose(outcomes, ref, max_drop_pp, delta=delta, path=list(range(len(CASCADE_GRID)))[::-1])
    return {"confidence_cascade": float(CASCADE_GRID[choice.by_reward]),
            "confidence_cascade_constrained": float(CASCADE_GRID[choice.constrained])}


def oracle_tiers(out: ExitOutputs) -> np.ndarray:
    """The cheapest tier whose prediction is right (cloud when none is)."""
    correct = out.tier_predictions == out.labels[:, None]  # (N, 3)
    return np.where(correct[:, 0], Tier.MOBILE, np.where(correct[:, 1], Tier.EDGE, Tier.CLOUD))


def method_assignments(out: ExitOutputs, policies: dict[str, Policy], cascade: dict[str, float], seed: int = 0) -> dict:
    """name -> (tiers, paths) for every method of the table."""
    n = len(out.labels)
    direct = {t: np.full(n, t) for t in range(3)}
    rows = {
        "cloud_only": (direct[Tier.CLOUD], np.full(n, PATHS.index("cloud_only"))),
        "mobile_only": (direct[Tier.MOBILE], None),
        "edge_only": (direct[Tier.EDGE], None),
    }
    for name, threshold in cascade.items():
        rows[name] = cascade_paths(out.tier_confidences, threshold)
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


def evaluate(out: ExitOutputs, policies: dict[str, Policy], cascade: dict[str, float], cost: CostModel,
             latency: CostModel | None = None) -> dict:
    """Per method: accuracy, its drop against the final exit, the mean cost under `cost`; with a
    cost model in ms (`latency`), also the expected latency of a one-text request, mean and p50."""
    rows = method_assignments(out, policies, cascade)
    n = len(out.labels)
    exits = out.mobile_exit, out.edge_exit, out.num_layers
    base_cost = cost.path_costs(*exits)["cloud_only"]
    reference = out.tier_predictions[:, 2] == out.labels
    methods = {}
    for name, (tiers, paths) in rows.items():
        o: Outcome = score(out, tiers, cost, paths)
        correct = out.tier_predictions[np.arange(n), tiers] == out.labels
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

    from dimee_models.policy import ALPHA_GRID, centroids_of, nearest_centroid, pools

    dimee = [score(out, nearest_centroid(out.z, centroids_of(cal.z, pools(cal.tier_confidences, a))), cost)
             for a in ALPHA_GRID]
    cascade = [_score_cascade(out, t, cost) for t in CASCADE_GRID]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([o.cost for o in dimee], [o.accuracy for o in dimee], ".-", label="dimee (alpha sweep)")
    ax.plot([o.cost for o in cascade], [o.accuracy for o in cascade], ".-", label="confidence_cascade (sweep)")
    for name, marker in (("cloud_only", "s"), ("oracle", "*"), ("dimee_constrained", "o"),
                         ("dimee_learned_constrained", "D"), ("dimee_escalate_constrained", "P"),
                         ("confidence_cascade_constrained", "^")):
        if name in methods:
            ax.plot(methods[name]["cost"], methods[name]["accuracy"], marker, markersize=10, label=name)
    ax.set_xlabel("mean cost per sample")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the two commands ------------------------------------------------------------------------------------


# With a guarantee, the served default is the first guaranteed policy in this order, fixed in
# advance: taking the cheapest of several guaranteed ones would take the one its calibration data
# flattered most, and it held the budget on fewer redraws than each kind alone (docs/RESULTS.md §8).
# Where calibration chose the boundaries, the kind that chose them comes first.
GUARANTEED_PREFERENCE = ("dimee_cascade_constrained", "dimee_direct_cascade_constrained",
                         "dimee_escalate_constrained", "dimee_learned_constrained", "dimee_constrained")


def calibrate_all(out: ExitOutputs, cost: CostModel, max_drop_pp: float, delta: float | None, folds: int = 5,
                  seed: int = 0, default: str | None = None, candidates: list[Candidates] | None = None,
                  pairs: list[tuple[int, int]] | None = None) -> tuple[Calibration, dict[str, float], str]:
    """Every router and the cascade calibrated on `out`, and the policy to serve by default: with
    the point estimate, the cheapest constrained router on these outputs (never the test split);
    with a guarantee, the first guaranteed one of GUARANTEED_PREFERENCE (else the first); either,
    unless no split is cheaper than cloud-only (`no_split_if_cheaper`). With several boundary
    `pairs`, a share of `out` chooses the tier boundaries first (dimee_models/boundaries.py) and
    the rest is calibrated on, at the chosen exits (`Calibration.boundaries` says which)."""
    chosen = None
    if pairs is not None and len(pairs) > 1:
        chosen = choose_boundaries(out, cost, pairs, max_drop_pp, seed)
        out, candidates = out.take(chosen.certify_rows).at(chosen.mobile_exit, chosen.edge_exit), None
    elif pairs is not None and pairs[0] != out.tier_exits()[:2]:
        out, candidates = out.at(*pairs[0]), None
    cal = calibrate(out, cost, max_drop_pp, folds, seed, delta, candidates)
    if chosen is not None:
        cal.boundaries = chosen.to_json(pairs)
    cascade = calibrate_cascade(out, cost, max_drop_pp, delta)
    if default is not None:
        if default not in cal.policies:
            raise ValueError(f"unknown policy {default!r}; choose one of {sorted(cal.policies)}")
        return cal, cascade, default
    if delta is None:
        constrained = [name for name in cal.policies if name.endswith("_constrained")]
        default = min(constrained, key=lambda name: policy_outcome(out, cal.policies[name], cost).cost)
    else:
        order = ((f"{chosen.variant}_constrained",) if chosen else ()) + GUARANTEED_PREFERENCE
        default = next((name for name in order if cal.policies[name].risk.guaranteed), order[0])
    return cal, cascade, no_split_if_cheaper(out, cal, cost, default, delta, max_drop_pp)


NO_SPLIT = "dimee_cloud_only"


def no_split_if_cheaper(out: ExitOutputs, cal: Calibration, cost: CostModel, default: str, delta: float | None,
                        max_drop_pp: float) -> str:
    """`default`, unless on the calibration split it costs no less than cloud-only: then a policy
    that sends every text to cloud (added to `cal` as NO_SPLIT) is served instead."""
    chosen = policy_outcome(out, cal.policies[default], cost).cost
    baseline = cost.path_costs(*out.tier_exits())["cloud_only"]
    if chosen < baseline:
        return default
    # It answers every sample with the final exit, so it loses none: the bound is 0, not estimated.
    risk = None if delta is None else RiskBound(delta, max_drop_pp, len(out.labels), 0, 0.0, True)
    cal.policies[NO_SPLIT] = CloudOnlyPolicy(NO_SPLIT, out.mobile_exit, out.edge_exit, out.num_layers, {}, {}, risk)
    cal.warnings.append(f"no DIMEE policy costs less than cloud-only under this cost model: {default} costs "
                        f"{chosen:.4g} against {baseline:.4g} ({cost.unit}) per sample on the calibration split, so "
                        f"{NO_SPLIT} (every text to cloud) is served by default")
    return NO_SPLIT


def policy_outcome(out: ExitOutputs, policy: Policy, cost: CostModel) -> Outcome:
    tiers, paths = policy.assign(out.z, out.probs(out.mobile_exit), out.probs(out.edge_exit))
    return score(out, tiers, cost, paths)


def run_calibration(directory: Path, cost: CostModel, max_drop_pp: float, folds: int = 5, seed: int = 0,
                    default: str | None = None, delta: float | None = DEFAULT_DELTA,
                    pairs: list[tuple[int, int]] | None = None) -> dict:
    """Calibrate every router on the calibration split and store the policies in the artifact; with
    boundary `pairs` (boundaries.boundary_pairs), also the tier weight files cut at the chosen exits."""
    manifest = artifact.read_manifest(directory)
    out = split_outputs(directory, "calibration", manifest)
    cal, cascade, default = calibrate_all(out, cost, max_drop_pp, delta, folds, seed, default, pairs=pairs)
    exits = Exits(mobile=cal.policies[default].mobile_exit, edge=cal.policies[default].edge_exit)
    if exits != manifest.exits:
        tiers = artifact.write_tiers(directory, artifact.load_full(directory, manifest), exits.mobile, exits.edge)
        manifest = manifest.model_copy(update={"exits": exits, "tiers": tiers})
    doc = save_policies(directory, cal, cost, default, max_drop_pp, {"delta": delta, "folds": folds,
                                                                     "cascade_thresholds": cascade})
    policy = PolicyRef(default=default, file="policy.json")
    artifact.write_manifest(directory, manifest.model_copy(update={"policy": policy}))
    return doc


def run_evaluation(directory: Path, cost: CostModel | None = None,
                   latency: CostModel | None = None) -> tuple[dict, ExitOutputs, ExitOutputs]:
    """The evaluation table on the test split with the stored policies. Costs are in the paper's
    abstract model: `cost`, else the stored one (thresholds were chosen for it), else, for policies
    calibrated in ms, the default. Latency is reported with `latency` (a cost model in ms), else
    with the stored model if it is in ms."""
    manifest = artifact.read_manifest(directory)
    policies, doc = load_policies(directory)
    stored = CostModel(**doc["cost_model"])
    cost = cost or (stored if stored.unit == "abstract" else CostModel())
    latency = latency or (stored if stored.unit == "ms" else None)
    if cost.unit != "abstract" or (latency is not None and latency.unit != "ms"):
        raise ValueError("the evaluation's cost model must be in abstract units and its latency model in ms")
    test_out = split_outputs(directory, "test", manifest)
    methods = evaluate(test_out, policies, doc["cascade_thresholds"], cost, latency)
    result = {"dataset": manifest.dataset.name, "split": "test", "n": int(len(test_out.labels)),
              "cost_model": cost.model_dump(), "methods": methods}
    if latency is not None:
        result["latency_model"] = latency.model_dump()
    return result, split_outputs(directory, "calibration", manifest), test_out


def predict_texts(directory: str | Path, texts: list[str], mode: Mode = "dimee", pairs: list[str] | None = None,
                  policy_name: str | None = None) -> list[dict]:
    """What the server answers for these texts in `mode`, computed offline from the full model
    with the same plan (`Policy.plan`, then `Policy.escalates_in`):
    [{"tier", "label_id", "confidence", "exit_layer", "escalated"}] in input order."""
    from dimee_models.data import TextDataset
    manifest = artifact.read_manifest(directory)
    exits = manifest.tier_exits
    ds = TextDataset("texts", texts, [0] * len(texts), manifest.labels, pairs)
    model, tokenizer = artifact.load_full(directory, manifest), artifact.load_tokenizer(directory)
    with torch.inference_mode():
        (enc, _), = batches(ds, tokenizer, len(texts), manifest.max_length)
        outs = model(**model_inputs(enc))
    probs = {tier: outs[layer - 1].logits.softmax(-1).numpy() for tier, layer in exits.items()}
    policies, doc = load_policies(directory)
    policy = policies[policy_name or doc["default"]]
    tiers = policy.plan(mode, outs[exits[Tier.MOBILE] - 1].pooled.numpy(), probs[Tier.MOBILE])
    escalated = (tiers == Tier.EDGE) & (policy.escalate(probs[Tier.EDGE]) if policy.escalates_in(mode) else False)
    tiers = np.where(escalated, Tier.CLOUD, tiers)
    return [{"tier": Tier(t).label, "label_id": int(probs[t][i].argmax()), "confidence": float(probs[t][i].max()),
             "exit_layer": exits[t], "escalated": bool(escalated[i])}
            for i, t in enumerate(tiers)]
