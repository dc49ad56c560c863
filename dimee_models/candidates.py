"""Each policy kind's candidate settings, scored on cached exit outputs (dimee_models/outputs.py)
without a forward pass: the grids, the cross-fitted scores (every sample routed by a policy fitted
without it), each setting's accuracy, cost, reward and losses, and risk control's path. What to
serve of them is calibration's (dimee_models/calibration.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dimee_models.cost import PATHS, CostModel
from dimee_models.outputs import ExitOutputs
from dimee_models.policy import (EDGE_CLOUD, CascadePolicy, CentroidPolicy, DirectCascadePolicy, EscalatePolicy,
                                 LearnedPolicy, Policy, learned_scores, nearest_centroid, threshold_route)
from dimee_models.risk import RISK_PATH, RiskBound
from dimee_models.tiers import TIER_NAMES, Tier

ALPHA_GRID = np.round(np.concatenate([np.linspace(0.5, 0.9, 17), np.linspace(0.91, 1.0, 37)]), 4)

ESCALATE_GRID = np.round(np.linspace(0.4, 1.0, 25), 3)


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
    paths = tiers if paths is None else paths  # a tier's id is the index of its own path
    preds = out.answers(paths)
    conf = out.path_confidences[np.arange(n), paths]
    costs = cost.costs_of(paths, out.mobile_exit, out.edge_exit, out.num_layers)
    fractions = tuple(float((tiers == t).mean()) for t in range(3))
    accuracy = float((preds == out.labels).mean())
    losses = float(((preds != out.labels) & (out.reference == out.labels)).mean())
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

def folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)

@dataclass(frozen=True)
class Candidates:
    """One policy kind's threshold settings, scored on the calibration split: what `calibrate`
    chooses from (once per budget and delta, without refitting)."""

    name: str  # the name of its policies: dimee, dimee_learned, dimee_escalate, ... (+ _constrained)
    kind: type[Policy]
    out: ExitOutputs  # what was scored: its exits are the policies'
    outcomes: list[Outcome]  # the grid's settings, then any that only risk control's path has
    grid: int  # how many of the outcomes are the grid's: the reward and the point estimate choose there
    strict: bool  # the point-estimate budget holds the losses alone (see `choose`)
    curve: list[dict]  # what policy.json stores of the grid's outcomes
    settings: list[dict[str, float]]  # each outcome's thresholds
    path: list[int]  # the settings risk control tests, in a fixed order from the safest (see `choose`)
    tensors: Callable[[int], dict[str, np.ndarray]] = lambda i: {}  # a setting's fitted arrays, if any

    def make(self, name: str, i: int, risk: RiskBound | None) -> Policy:
        """The policy of setting `i`, named `name`, with its bound."""
        out = self.out
        return self.kind(name, out.mobile_exit, out.edge_exit, out.num_layers, self.settings[i], self.tensors(i), risk)

def centroid_candidates(out: ExitOutputs, cost: CostModel, k: int = 5, seed: int = 0) -> Candidates:
    conf = out.tier_confidences
    oof = np.zeros((len(ALPHA_GRID), len(out.labels)), dtype=np.int64)
    for held in folds(len(out.labels), k, seed):
        fit = np.setdiff1d(np.arange(len(out.labels)), held)
        for a, alpha in enumerate(ALPHA_GRID):
            oof[a, held] = nearest_centroid(out.z[held], centroids_of(out.z[fit], pools(conf[fit], alpha)))
    outcomes = [score(out, oof[a], cost) for a in range(len(ALPHA_GRID))]
    curve = [{"alpha": float(al), **_outcome_json(o)} for al, o in zip(ALPHA_GRID, outcomes)]
    return Candidates("dimee", CentroidPolicy, out, outcomes, len(outcomes), False, curve,
                      [{"alpha": float(al)} for al in ALPHA_GRID], list(range(len(ALPHA_GRID)))[::-1],  # alpha from 1 down
                      lambda i: {"centroids": centroids_of(out.z, pools(conf, ALPHA_GRID[i]))})

def agreement_targets(out: ExitOutputs) -> np.ndarray:
    preds = out.tier_predictions
    return np.stack([preds[:, 0] == out.reference, preds[:, 1] == out.reference], axis=1).astype(np.float64)

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

def learned_candidates(out: ExitOutputs, cost: CostModel, k: int = 5, seed: int = 0,
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
    return Candidates(f"dimee_{cls.kind}", cls, out, outcomes, n_grid, cls.escalates, curve,
                      [{key: float(v) for key, v in zip(keys, c)} for c in combos], list(range(n_grid, len(outcomes))),
                      lambda i: params)


def escalate_candidates(out: ExitOutputs, cost: CostModel, k: int = 5, seed: int = 0) -> Candidates:
    return learned_candidates(out, cost, k, seed, cls=EscalatePolicy)

def grid_outcomes(out: ExitOutputs, cost: CostModel, mobile: np.ndarray, edge: np.ndarray,
                  up: np.ndarray) -> list[Outcome]:
    """The outcome of every threshold setting (a, c, b), in that (C) order, without routing each:
    a sample answers on mobile if mobile[a], else on edge if edge[c], else on cloud; an edge
    answer goes on to cloud if up[b]. mobile (A, N), edge (C, N), up (B, N) are bool. Sums over
    samples are matrix products of these indicators with per-sample quantities."""
    n = len(out.labels)
    correct = out.path_predictions[:, :4] == out.labels[:, None]  # mobile, edge, cloud, edge_cloud
    per_sample = {  # (4 paths, N) each
        "count": np.ones((4, n)),
        "correct": correct.T.astype(np.float64),
        "conf": out.path_confidences[:, :4].T.astype(np.float64),
        "loss": (~correct & (out.reference == out.labels)[:, None]).T.astype(np.float64),
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

def cascade_candidates(out: ExitOutputs, cost: CostModel, k: int = 5, seed: int = 0) -> Candidates:
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
    diagonal = [i * len(up) + min(i, len(up) - 1) for i in range(len(grid))][::-1]  # from 1.01 down
    return Candidates("dimee_cascade", CascadePolicy, out, outcomes, len(outcomes), True, curve,
                      [{"mobile": float(tm), "escalate": float(b)} for tm, b in combos], diagonal)

def direct_cascade_candidates(out: ExitOutputs, cost: CostModel, k: int = 5, seed: int = 0) -> Candidates:
    """Every mobile threshold of RISK_PATH for the two-tier cascade; risk control walks it from 1.01 down."""
    conf = out.tier_confidences[:, 0]
    tiers = [np.where(conf >= t, Tier.MOBILE, Tier.CLOUD) for t in RISK_PATH]
    outcomes = [score(out, t, cost) for t in tiers]
    curve = [{"mobile": float(t), **_outcome_json(o)} for t, o in _pareto(list(zip(RISK_PATH, outcomes)))]
    return Candidates("dimee_direct_cascade", DirectCascadePolicy, out, outcomes, len(outcomes), True, curve,
                      [{"mobile": float(t)} for t in RISK_PATH], list(range(len(RISK_PATH))))

# Every policy kind calibration fits, as the builder of its candidates: a new kind is its Policy
# class (dimee_models/policy.py, with its POLICY_KINDS entry) and its builder here, listed.
KINDS: tuple[Callable[[ExitOutputs, CostModel, int, int], Candidates], ...] = (
    centroid_candidates, learned_candidates, escalate_candidates, cascade_candidates, direct_cascade_candidates)


def score_candidates(out: ExitOutputs, cost: CostModel, k: int = 5, seed: int = 0) -> list[Candidates]:
    """Every policy kind's settings scored on `out`: the expensive part of calibration."""
    return [candidates(out, cost, k, seed) for candidates in KINDS]

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
