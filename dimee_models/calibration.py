"""Calibration: every policy kind's settings scored on the calibration split's cached exit
outputs (dimee_models/outputs.py), each kind's reward-best setting and the cheapest within the
accuracy budget (risk-controlled with a delta), the tier boundaries, the policy served by
default, and the policies saved in the artifact.

Thresholds are chosen on the calibration split with K-fold cross-fitting: every calibration
sample is routed by a policy fitted without it, so the choice is not tuned on its own fit.

Tier boundaries: which layer the mobile tier exits at, and the edge tier.

Every layer has a trained exit head and the cached outputs hold every exit's logits and pooled
representation, so any pair (m, e) can be scored without a forward pass. The two confidence
cascades (mobile -> edge -> cloud, and mobile -> cloud straight) are scored at every pair the
user's bounds allow, under the calibration's cost model (milliseconds from a cluster profile, or
the paper's abstract units).

Choosing the best of K certified settings on the same data would be a winner's curse: the choice
favours the candidate its data flattered. So the boundaries and the cascade kind are chosen on
other data, the training split's outputs (by the point estimate of the losses), and the guarantee
is certified on the whole calibration split, which the choice never saw, at the full delta (Learn
then Test with the choice made before the calibration data are seen). `dimee evaluate --resamples`
recalibrates every redraw the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.numpy import save_file

from dimee_models import artifact
from dimee_models.cost import PATHS, CostModel
from dimee_models.manifest import Exits, PolicyRef
from dimee_models.data import read_texts
from dimee_models.outputs import ExitOutputs, split_outputs, text_outputs
from dimee_models.policy_doc import PolicyDoc, Unlabeled
from dimee_models.policy import (EDGE_CLOUD, POLICY_JSON, POLICY_TENSORS, CascadePolicy, CentroidPolicy, CloudOnlyPolicy,
                                 DirectCascadePolicy, EscalatePolicy, LearnedPolicy, Policy, learned_scores,
                                 nearest_centroid, threshold_route)
from dimee_models.risk import DEFAULT_DELTA, RISK_PATH, RiskBound, fixed_sequence
from dimee_models.tiers import TIER_NAMES, Tier

ALPHA_GRID = np.round(np.concatenate([np.linspace(0.5, 0.9, 17), np.linspace(0.91, 1.0, 37)]), 4)
ESCALATE_GRID = np.round(np.linspace(0.4, 1.0, 25), 3)


# policy kinds --------------------------------------------------------------------------------------


def pools(conf: np.ndarray, alpha: float) -> np.ndarray:
    """EASY (0) if C_m >= alpha, MEDIUM (1) elif C_e >= alpha, else HARD (2); conf is (N, 3)."""
    return np.where(conf[:, 0] >= alpha, Tier.MOBILE, np.where(conf[:, 1] >= alpha, Tier.EDGE, Tier.CLOUD))


def centroids_of(z: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """(3, H) pool centroids; an empty pool gets NaN and is never chosen."""
    out = np.full((3, z.shape[1]), np.nan, dtype=np.float32)
    for tier in range(3):
        if (pool == tier).any():
            out[tier] = z[pool == tier].mean(0)
    return out


def fit_learned(x: np.ndarray, targets: np.ndarray, l2: float = 1e-2) -> dict[str, np.ndarray]:
    """Two L2-regularised logistic regressions on features x (targets (N, 2) in {0, 1}) by L-BFGS."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mean) / std, dtype=torch.float64)
    yt = torch.tensor(targets, dtype=torch.float64)
    w = torch.zeros(x.shape[1], 2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    as_np = {"weight": w.detach().numpy(), "bias": b.detach().numpy(), "mean": mean, "std": std}
    return {k: v.astype(np.float32) for k, v in as_np.items()}


# scoring an assignment ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    accuracy: float
    cost: float
    reward: float
    fractions: tuple[float, float, float]
    losses: float  # fraction of samples the final exit answers right and this assignment wrong
    n: int  # samples scored

    @property
    def loss_count(self) -> int:
        return round(self.losses * self.n)


def score(out: ExitOutputs, tiers: np.ndarray, cost: CostModel, paths: np.ndarray | None = None) -> Outcome:
    """Accuracy, mean cost and the DIMEE reward C_tier - mu * cost of answering on `tiers`.
    `paths` (indices into cost.PATHS) overrides the default path of each tier (cascades)."""
    n = len(tiers)
    preds = out.tier_predictions[np.arange(n), tiers]
    conf = out.tier_confidences[np.arange(n), tiers]
    costs = cost.costs_of(tiers if paths is None else paths, out.mobile_exit, out.edge_exit, out.num_layers)
    fractions = tuple(float((tiers == t).mean()) for t in range(3))
    accuracy = float((preds == out.labels).mean())
    losses = float(((preds != out.labels) & (out.tier_predictions[:, 2] == out.labels)).mean())
    return Outcome(accuracy, float(costs.mean()), float((conf - cost.mu * costs).mean()), fractions, losses, n)


@dataclass(frozen=True)
class Choice:
    by_reward: int  # index of the outcome with the best reward
    constrained: int  # index of the cheapest outcome within the accuracy budget (point estimate)


def choose(outcomes: list[Outcome], reference_accuracy: float, max_drop_pp: float, strict: bool = False) -> Choice:
    """The outcome with the best reward, and the cheapest outcome within the accuracy budget by the
    point estimate on the calibration split: the accuracy drop, or with `strict` the losses alone,
    so that samples the final exit gets wrong and a cheaper exit happens to get right cannot pay for
    errors; if nothing meets the budget, the most accurate outcome is taken (risk control instead:
    `certify`)."""
    best_reward = int(np.argmax([o.reward for o in outcomes]))
    drops = [o.losses if strict else reference_accuracy - o.accuracy for o in outcomes]
    feasible = [i for i, d in enumerate(drops) if d <= max_drop_pp / 100 + 1e-12]
    if feasible:
        constrained = min(feasible, key=lambda i: (outcomes[i].cost, -outcomes[i].accuracy))
    else:
        constrained = int(np.argmax([o.accuracy for o in outcomes]))
    return Choice(best_reward, constrained)


def disagreements(policy: Policy, out: ExitOutputs) -> int:
    """Samples of `out` (at the policy's exits) the policy answers otherwise than the final exit."""
    tiers, _ = policy.assign(out.z, out.probs(policy.mobile_exit), out.probs(policy.edge_exit))
    return int((out.tier_predictions[np.arange(len(tiers)), tiers] != out.tier_predictions[:, 2]).sum())


def certify(c: Candidates, max_drop_pp: float, delta: float,
            unlabeled: ExitOutputs | None = None) -> tuple[int, RiskBound]:
    """Risk control (dimee_models/risk.py): fixed-sequence testing along `c.path` (fixed before the
    data are seen, safest first) certifies the loss rate within the budget with probability >= 1 -
    delta; the index of the cheapest setting certified, and its bound. `unlabeled` rows (at the
    calibration's exits) add to the test, each counting when the setting's answer differs from the
    final exit's."""
    losses, n = [o.loss_count for o in c.outcomes], c.outcomes[0].n
    if unlabeled is not None:
        for i in c.path:
            losses[i] += disagreements(c.make(c.name, i, None), unlabeled)
        n += len(unlabeled.labels)
    return fixed_sequence(c.path, [o.cost for o in c.outcomes], losses, n, max_drop_pp / 100, delta,
                          0 if unlabeled is None else len(unlabeled.labels))


def folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


# calibration -------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Everything `calibrate` decided, with the curves behind each decision."""

    policies: dict[str, Policy]
    curves: dict[str, list[dict]]
    reference_accuracy: float
    warnings: list[str]
    boundaries: dict | None = None  # how the tier boundaries were chosen, when calibration chose them


@dataclass(frozen=True)
class Candidates:
    """One policy kind's threshold settings, scored on the calibration split: what `calibrate`
    chooses from (once per budget and delta, without refitting)."""

    name: str  # the name of its policies: dimee, dimee_learned, dimee_escalate, ... (+ _constrained)
    outcomes: list[Outcome]  # the grid's settings, then any that only risk control's path has
    grid: int  # how many of the outcomes are the grid's: the reward and the point estimate choose there
    strict: bool  # the point-estimate budget holds the losses alone (see `choose`)
    curve: list[dict]  # what policy.json stores of the grid's outcomes
    make: Callable[[str, int, RiskBound | None], Policy]  # (name, index of a setting, its bound) -> policy
    path: list[int]  # the settings risk control tests, in a fixed order from the safest (see `choose`)


def centroid_candidates(out: ExitOutputs, cost: CostModel, k: int, seed: int) -> Candidates:
    conf = out.tier_confidences
    oof = np.zeros((len(ALPHA_GRID), len(out.labels)), dtype=np.int64)
    for held in folds(len(out.labels), k, seed):
        fit = np.setdiff1d(np.arange(len(out.labels)), held)
        for a, alpha in enumerate(ALPHA_GRID):
            oof[a, held] = nearest_centroid(out.z[held], centroids_of(out.z[fit], pools(conf[fit], alpha)))
    outcomes = [score(out, oof[a], cost) for a in range(len(ALPHA_GRID))]
    curve = [{"alpha": float(al), **_outcome_json(o)} for al, o in zip(ALPHA_GRID, outcomes)]

    def make(name: str, i: int, risk: RiskBound | None) -> Policy:
        centroids = centroids_of(out.z, pools(conf, ALPHA_GRID[i]))
        return CentroidPolicy(name, out.mobile_exit, out.edge_exit, out.num_layers,
                              {"alpha": float(ALPHA_GRID[i])}, {"centroids": centroids}, risk)

    return Candidates("dimee", outcomes, len(outcomes), False, curve, make,
                      list(range(len(ALPHA_GRID)))[::-1])  # alpha from 1 down


def agreement_targets(out: ExitOutputs) -> np.ndarray:
    preds = out.tier_predictions
    return np.stack([preds[:, 0] == preds[:, 2], preds[:, 1] == preds[:, 2]], axis=1).astype(np.float64)


def cross_fitted_scores(x: np.ndarray, targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Every sample scored by regressions fitted without its fold."""
    scores = np.zeros(targets.shape)
    for held in folds(len(targets), k, seed):
        fit = np.setdiff1d(np.arange(len(targets)), held)
        scores[held] = learned_scores(fit_learned(x[fit], targets[fit]), x[held])
    return scores


def threshold_grid(scores: np.ndarray, points: int) -> np.ndarray:
    """Quantiles of the scores, plus one above every score (sends nobody to that tier)."""
    return np.append(np.unique(np.quantile(scores, np.linspace(0, 1, points))), 1.01)


def learned_candidates(out: ExitOutputs, cost: CostModel, k: int, seed: int,
                       cls: type[LearnedPolicy] = LearnedPolicy) -> Candidates:
    """The `learned` policy, or with cls=EscalatePolicy the `escalate` one (its own features, plus
    the edge-confidence threshold below which edge hands on to cloud)."""
    x = cls.features(out.z, out.probs(out.mobile_exit))
    targets = agreement_targets(out)
    scores = cross_fitted_scores(x, targets, k, seed)
    escalates = cls.escalates and escalation_can_help(out)
    if cls.escalates:
        grids = threshold_grid(scores[:, 0], 41), threshold_grid(scores[:, 1], 21), ESCALATE_GRID if escalates else np.zeros(1)
    else:
        grid = threshold_grid(scores, 41)
        grids = grid, grid, np.zeros(1)  # edge confidence is never below 0: no escalation
    outcomes = grid_outcomes(out, cost, scores[:, 0] >= grids[0][:, None], scores[:, 1] >= grids[1][:, None],
                             out.tier_confidences[:, 1] < grids[2][:, None])
    combos = [(tm, te, b)[:3 if cls.escalates else 2] for tm in grids[0] for te in grids[1] for b in grids[2]]
    params = fit_learned(x, targets)
    keys = ("mobile", "edge", "escalate")
    frontier = _pareto(list(zip(combos, outcomes)))
    curve = [{**{key: float(v) for key, v in zip(keys, c)}, **_outcome_json(o)} for c, o in frontier]
    n_grid = len(outcomes)
    # Risk control's path: one threshold t for the gates, from 1.01 down. Escalating, every sample
    # mobile does not keep goes to edge, which keeps those it is sure of (a cascade with a learned
    # first gate): through edge, cloud costs what it costs from mobile under the default costs.
    for t in RISK_PATH:
        combo = (t, 0.0, t if escalates else 0.0) if cls.escalates else (t, t)
        tiers = threshold_route(scores, combo[0], combo[1])
        up = (tiers == Tier.EDGE) & (out.tier_confidences[:, 1] < t) if escalates else np.zeros(len(tiers), bool)
        outcomes.append(score(out, np.where(up, Tier.CLOUD, tiers), cost, np.where(up, EDGE_CLOUD, tiers)))
        combos.append(combo)

    def make(name: str, i: int, risk: RiskBound | None) -> Policy:
        return cls(name, out.mobile_exit, out.edge_exit, out.num_layers,
                   {key: float(v) for key, v in zip(keys, combos[i])}, params, risk)

    return Candidates(f"dimee_{cls.kind}", outcomes, n_grid, cls.escalates, curve, make,
                      list(range(n_grid, len(outcomes))))


def grid_outcomes(out: ExitOutputs, cost: CostModel, mobile: np.ndarray, edge: np.ndarray,
                  up: np.ndarray) -> list[Outcome]:
    """The outcome of every threshold setting (a, c, b), in that (C) order, without routing each:
    a sample answers on mobile if mobile[a], else on edge if edge[c], else on cloud; an edge
    answer goes on to cloud if up[b]. mobile (A, N), edge (C, N), up (B, N) are bool. Sums over
    samples are matrix products of these indicators with per-sample quantities."""
    n = len(out.labels)
    tier_of_path = (Tier.MOBILE, Tier.EDGE, Tier.CLOUD, Tier.CLOUD)  # mobile, edge, cloud, edge_cloud
    correct = out.tier_predictions == out.labels[:, None]
    per_sample = {  # (4 paths, N) each
        "count": np.ones((4, n)),
        "correct": correct[:, tier_of_path].T.astype(np.float64),
        "conf": out.tier_confidences[:, tier_of_path].T.astype(np.float64),
        "loss": (~correct[:, tier_of_path] & correct[:, 2:3]).T.astype(np.float64),
    }
    m, e, u = mobile.astype(np.float64), edge.astype(np.float64), up.astype(np.float64)
    shape = (len(m), len(e), len(u))
    not_mobile_edge = ((1 - m)[:, None, :] * e[None]).reshape(-1, n)  # (A*C, N)
    sums = {}
    for key, q in per_sample.items():  # per path, broadcast to (A, C, B)
        sums[key] = np.stack(np.broadcast_arrays(
            (m @ q[0])[:, None, None],
            (not_mobile_edge @ ((1 - u) * q[1]).T).reshape(shape),
            ((1 - m) @ ((1 - e) * q[2]).T)[:, :, None],
            (not_mobile_edge @ (u * q[3]).T).reshape(shape),
        )).reshape(4, -1)  # (4 paths, A*C*B)
    path_cost = cost.path_costs(out.mobile_exit, out.edge_exit, out.num_layers)
    costs = np.array([path_cost[p] for p in PATHS[:4]]) @ sums["count"] / n
    accuracy, losses = sums["correct"].sum(0) / n, sums["loss"].sum(0) / n
    reward = sums["conf"].sum(0) / n - cost.mu * costs
    fractions = np.stack([sums["count"][0], sums["count"][1], sums["count"][2] + sums["count"][3]]) / n
    return [Outcome(float(accuracy[i]), float(costs[i]), float(reward[i]), tuple(float(f) for f in fractions[:, i]),
                    float(losses[i]), n) for i in range(len(costs))]


def escalation_can_help(out: ExitOutputs) -> bool:
    """With edge at the last layer, cloud would answer as edge did, one hop later: no escalation."""
    return out.edge_exit < out.num_layers


def cascade_candidates(out: ExitOutputs, cost: CostModel) -> Candidates:
    """Every (mobile, escalate) pair of confidence thresholds from RISK_PATH; risk control walks
    the diagonal, one threshold for both: the classic early exit, stopping at the first sure exit."""
    conf = out.tier_confidences
    grid = RISK_PATH[::-1]  # ascending: from "mobile keeps everything" to "mobile keeps nothing"
    up = grid if escalation_can_help(out) else np.zeros(1)
    outcomes = grid_outcomes(out, cost, conf[:, 0] >= grid[:, None], np.ones((1, len(conf)), bool),
                             conf[:, 1] < up[:, None])
    combos = [(tm, b) for tm in grid for b in up]
    curve = [{"mobile": float(c[0]), "escalate": float(c[1]), **_outcome_json(o)}
             for c, o in _pareto(list(zip(combos, outcomes)))]

    def make(name: str, i: int, risk: RiskBound | None) -> Policy:
        return CascadePolicy(name, out.mobile_exit, out.edge_exit, out.num_layers,
                             {"mobile": float(combos[i][0]), "escalate": float(combos[i][1])}, {}, risk)

    diagonal = [i * len(up) + min(i, len(up) - 1) for i in range(len(grid))][::-1]  # from 1.01 down
    return Candidates("dimee_cascade", outcomes, len(outcomes), True, curve, make, diagonal)


def direct_cascade_candidates(out: ExitOutputs, cost: CostModel) -> Candidates:
    """Every mobile threshold of RISK_PATH for the two-tier cascade; risk control walks it from 1.01 down."""
    conf = out.tier_confidences[:, 0]
    tiers = [np.where(conf >= t, Tier.MOBILE, Tier.CLOUD) for t in RISK_PATH]
    outcomes = [score(out, t, cost) for t in tiers]
    curve = [{"mobile": float(t), **_outcome_json(o)} for t, o in _pareto(list(zip(RISK_PATH, outcomes)))]

    def make(name: str, i: int, risk: RiskBound | None) -> Policy:
        return DirectCascadePolicy(name, out.mobile_exit, out.edge_exit, out.num_layers,
                                   {"mobile": float(RISK_PATH[i])}, {}, risk)

    return Candidates("dimee_direct_cascade", outcomes, len(outcomes), True, curve, make, list(range(len(RISK_PATH))))


def score_candidates(out: ExitOutputs, cost: CostModel, k: int = 5, seed: int = 0) -> list[Candidates]:
    """Every policy kind's settings scored on `out`: the expensive part of calibration."""
    return [centroid_candidates(out, cost, k, seed), learned_candidates(out, cost, k, seed),
            learned_candidates(out, cost, k, seed, cls=EscalatePolicy), cascade_candidates(out, cost),
            direct_cascade_candidates(out, cost)]


def calibrate(out: ExitOutputs, cost: CostModel, max_drop_pp: float = 0.3, k: int = 5, seed: int = 0,
              delta: float | None = None, candidates: list[Candidates] | None = None,
              unlabeled: ExitOutputs | None = None) -> Calibration:
    """Every policy kind's reward-best and constrained policy; `delta` makes the constrained
    choice risk-controlled (None: the point estimate on the calibration split), certified on `out`
    and the `unlabeled` rows too if given (`certify`). `candidates`:
    `score_candidates(out, cost, k, seed)` computed once for several budgets or deltas."""
    candidates = candidates or score_candidates(out, cost, k, seed)
    reference = float((out.tier_predictions[:, 2] == out.labels).mean())
    policies, curves, warnings = {}, {}, []
    for c in candidates:
        point = choose(c.outcomes[:c.grid], reference, max_drop_pp, c.strict)
        constrained, risk = point.constrained, None
        if delta is not None:
            constrained, risk = certify(c, max_drop_pp, delta, unlabeled)
        policies[c.name] = c.make(c.name, point.by_reward, None)
        policies[f"{c.name}_constrained"] = c.make(f"{c.name}_constrained", constrained, risk)
        curves[c.name] = c.curve
    for name, pol in policies.items():
        tiers, _ = pol.assign(out.z, out.probs(out.mobile_exit), out.probs(out.edge_exit))
        fractions = np.bincount(tiers, minlength=3) / len(out.labels)
        if fractions.max() >= 0.95:
            warnings.append(
                f"{name}: sends {fractions.max():.0%} of calibration samples to {Tier(int(fractions.argmax())).label}"
                f" (mu={cost.mu}); the reward may be dominated by cost or by confidence"
            )
    return Calibration(policies, curves, reference, warnings)


def _outcome_json(o: Outcome) -> dict:
    return {"accuracy": o.accuracy, "cost": o.cost, "reward": o.reward, "tier_fraction": dict(zip(TIER_NAMES, o.fractions))}


def _pareto(items: list[tuple]) -> list[tuple]:
    """Points not beaten on both accuracy and cost (keeps the stored curve small)."""
    ordered = sorted(items, key=lambda it: (it[1].cost, -it[1].accuracy))
    front, best = [], -1.0
    for item in ordered:
        if item[1].accuracy > best:
            front.append(item)
            best = item[1].accuracy
    return front


# tier boundaries ---------------------------------------------------------------------------------


def parse_layers(value: str) -> tuple[int, int]:
    """`--mobile-layers 1-4` (or `3`): an inclusive range of 1-based layers; ValueError names the problem."""
    lo, sep, hi = value.partition("-")
    try:
        bounds = (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ValueError(f"expected a layer or a range of layers like 1-4, got {value!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"expected layers from 1 up, lowest first, got {value!r}")
    return bounds


def boundary_pairs(num_layers: int, mobile: tuple[int, int] | None = None,
                   edge: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Every (m, e) with 1 <= m < e <= L within the bounds (None: any), shallowest first."""
    m_lo, m_hi = mobile or (1, num_layers - 1)
    e_lo, e_hi = edge or (1, num_layers)
    pairs = [(m, e) for m in range(m_lo, min(m_hi, num_layers - 1) + 1)
             for e in range(max(e_lo, m + 1), min(e_hi, num_layers) + 1)]
    if not pairs:
        raise ValueError(f"no tier boundaries within --mobile-layers {m_lo}-{m_hi} and --edge-layers {e_lo}-{e_hi} "
                         f"for a model of {num_layers} layers (1 <= mobile < edge <= {num_layers})")
    return pairs


@dataclass(frozen=True)
class BoundaryChoice:
    mobile_exit: int
    edge_exit: int
    policy: str  # the cascade that chose them: dimee_cascade or dimee_direct_cascade
    choice_rows: int  # training-split rows the choice was made on
    candidates: list[dict]  # each candidate's point estimate on those rows

    def to_json(self, pairs: list[tuple[int, int]]) -> dict:
        return {"pairs": [list(p) for p in pairs], "mobile": self.mobile_exit, "edge": self.edge_exit,
                "chosen_by": self.policy, "chosen_on": "train", "choice_rows": self.choice_rows,
                "candidates": self.candidates}


def choose_boundaries(choice: ExitOutputs, cost: CostModel, pairs: list[tuple[int, int]],
                      max_drop_pp: float) -> BoundaryChoice:
    """The pair and cascade kind whose cheapest setting within the budget (point estimate, losses
    alone) costs least on `choice` (the training split's outputs); ties go to the deeper mobile exit."""
    reference = float((choice.tier_predictions[:, 2] == choice.labels).mean())
    found = []
    for m, e in pairs:
        at = choice.at(m, e)
        first_of_m = not any(f["mobile"] == m for f in found)  # the two-tier cascade does not depend on e
        for c in [cascade_candidates(at, cost)] + ([direct_cascade_candidates(at, cost)] if first_of_m else []):
            o = c.outcomes[choose(c.outcomes[:c.grid], reference, max_drop_pp, c.strict).constrained]
            found.append({"policy": c.name, "mobile": m, "edge": e, "cost": o.cost, "losses": o.loss_count,
                          "tier_fraction": dict(zip(("mobile", "edge", "cloud"), o.fractions))})
    for m in {f["mobile"] for f in found}:  # the two-tier cascade never reaches edge: give it the best edge
        three = [f for f in found if f["mobile"] == m and f["policy"] == "dimee_cascade"]
        for f in found:
            if f["mobile"] == m and f["policy"] == "dimee_direct_cascade":
                f["edge"] = min(three, key=lambda t: t["cost"])["edge"]
    best = min(found, key=lambda f: (f["cost"], -f["mobile"]))
    return BoundaryChoice(best["mobile"], best["edge"], best["policy"], len(choice.labels), found)


# the served default ------------------------------------------------------------------------------


# With a guarantee, the served default is the first guaranteed policy in this order, fixed in
# advance: taking the cheapest of several guaranteed ones would take the one its calibration data
# flattered most, and it held the budget on fewer redraws than each kind alone (docs/METHOD.md §6).
# Where calibration chose the boundaries, the kind that chose them comes first.
GUARANTEED_PREFERENCE = ("dimee_cascade_constrained", "dimee_direct_cascade_constrained",
                         "dimee_escalate_constrained", "dimee_learned_constrained", "dimee_constrained")


def calibrate_all(out: ExitOutputs, cost: CostModel, max_drop_pp: float, delta: float | None, folds: int = 5,
                  seed: int = 0, default: str | None = None, candidates: list[Candidates] | None = None,
                  pairs: list[tuple[int, int]] | None = None, choice: ExitOutputs | None = None,
                  unlabeled: ExitOutputs | None = None) -> tuple[Calibration, str]:
    """Every policy kind calibrated on `out`, and the policy to serve by default: with
    the point estimate, the cheapest constrained policy on these outputs (never the test split);
    with a guarantee, the first guaranteed one of GUARANTEED_PREFERENCE (else the first); either,
    unless no split is cheaper than cloud-only (`no_split_if_cheaper`). With several boundary
    `pairs`, the `choice` outputs (the training split's) choose the tier boundaries first
    (`choose_boundaries`) and all of `out` is calibrated on, at the chosen exits
    (`Calibration.boundaries` says which). `unlabeled` outputs add to the guarantee (`certify`)."""
    chosen = None
    if pairs is not None and len(pairs) > 1:
        if choice is None:
            raise ValueError("choosing among several tier boundaries needs the outputs to choose on (the training split's)")
        chosen = choose_boundaries(choice, cost, pairs, max_drop_pp)
        out, candidates = out.at(chosen.mobile_exit, chosen.edge_exit), None
    elif pairs is not None and pairs[0] != out.tier_exits()[:2]:
        out, candidates = out.at(*pairs[0]), None
    cal = calibrate(out, cost, max_drop_pp, folds, seed, delta, candidates,
                    None if unlabeled is None else unlabeled.at(out.mobile_exit, out.edge_exit))
    if chosen is not None:
        cal.boundaries = chosen.to_json(pairs)
    if default is not None:
        if default not in cal.policies:
            raise ValueError(f"unknown policy {default!r}; choose one of {sorted(cal.policies)}")
        return cal, default
    if delta is None:
        constrained = [name for name in cal.policies if name.endswith("_constrained")]
        default = min(constrained, key=lambda name: policy_outcome(out, cal.policies[name], cost).cost)
    else:
        order = ((f"{chosen.policy}_constrained",) if chosen else ()) + GUARANTEED_PREFERENCE
        default = next((name for name in order if cal.policies[name].risk.guaranteed), order[0])
    return cal, no_split_if_cheaper(out, cal, cost, default, delta, max_drop_pp)


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


# persistence -------------------------------------------------------------------------------------


def save_policies(directory: Path, cal: Calibration, cost: CostModel, default: str, max_drop_pp: float,
                  **more) -> PolicyDoc:
    """Write policy.safetensors and policy.json (`more`: PolicyDoc's delta, folds, unlabeled)."""
    tensors = {f"{name}/{key}": value for name, pol in cal.policies.items() for key, value in pol.tensors.items()}
    save_file(tensors, directory / POLICY_TENSORS)
    doc = PolicyDoc(default=default, cost_model=cost, max_accuracy_drop_pp=max_drop_pp,
                    calibration_reference_accuracy=cal.reference_accuracy,
                    policies={name: pol.to_json() for name, pol in cal.policies.items()}, curves=cal.curves,
                    warnings=cal.warnings, boundaries=cal.boundaries or None, **more)
    (directory / POLICY_JSON).write_text(doc.to_json())
    return doc


def run_calibration(directory: Path, cost: CostModel, max_drop_pp: float, folds: int = 5, seed: int = 0,
                    default: str | None = None, delta: float | None = DEFAULT_DELTA,
                    pairs: list[tuple[int, int]] | None = None, unlabeled: Path | None = None) -> PolicyDoc:
    """Calibrate every policy kind on the calibration split and store the policies in the artifact; with
    boundary `pairs` (`boundary_pairs`), also the tier weight files cut at the chosen exits; with an
    `unlabeled` file of texts (`data.read_texts`), certified on those too."""
    manifest = artifact.read_manifest(directory)
    out = split_outputs(directory, "calibration", manifest)
    choice = split_outputs(directory, "train", manifest) if pairs is not None and len(pairs) > 1 else None
    texts, about = None, None
    if unlabeled is not None:
        if delta is None:
            raise ValueError("--unlabeled texts add to the guarantee: they need a --delta")
        texts = text_outputs(directory, read_texts(unlabeled), manifest)
        about = Unlabeled(file=str(Path(unlabeled).resolve()), rows=len(texts.labels))
    cal, default = calibrate_all(out, cost, max_drop_pp, delta, folds, seed, default, pairs=pairs, choice=choice,
                                 unlabeled=texts)
    exits = Exits(mobile=cal.policies[default].mobile_exit, edge=cal.policies[default].edge_exit)
    if exits != manifest.exits:
        tiers = artifact.write_tiers(directory, artifact.load_full(directory, manifest), exits.mobile, exits.edge)
        manifest = manifest.model_copy(update={"exits": exits, "tiers": tiers})
    doc = save_policies(directory, cal, cost, default, max_drop_pp, delta=delta, folds=folds, unlabeled=about)
    policy = PolicyRef(default=default, file="policy.json")
    artifact.write_manifest(directory, manifest.model_copy(update={"policy": policy}))
    return doc
