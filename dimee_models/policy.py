"""DIMEE routing policies: decide per sample, from what the mobile tier computed, where to answer.

Four routers share one interface, used by offline evaluation and by the serving router alike:
`Policy.route(z, mobile_probs) -> tier ids` (0 mobile, 1 edge, 2 cloud) decides on mobile, and
`Policy.escalate(edge_probs)` says which samples answered on edge go on to cloud after all.

- `centroid` (the method of docs/METHOD.md section 5): pools EASY / MEDIUM / HARD from confidence
  thresholds at alpha, one centroid of the mobile embedding z per pool, nearest centroid wins.
- `learned` (our variant): two logistic regressions on mobile-side features (z and the mobile
  exit's probabilities) estimate whether the mobile exit and the edge exit would agree with the
  final exit; thresholds on those estimates.
- `escalate` (our variant): the same regressions on the mobile exit's probabilities alone (z made
  them worse: docs/RESULTS.md), and an edge that is unsure (edge confidence below a threshold)
  hands its layer-e hidden state on to cloud.
- `cascade`: the confidence cascade served: the mobile exit keeps what it is sure of, edge the
  rest, and edge hands on to cloud what it is unsure of (the escalate policy's path, with the
  exits' own confidences as gates).

Thresholds are chosen on the calibration split with K-fold cross-fitting: every calibration
sample is routed by a router fitted without it, so the choice is not tuned on its own fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, ClassVar, Literal

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from dimee_models.cost import PATHS, CostModel
from dimee_models.risk import RISK_PATH, RiskBound, fixed_sequence
from dimee_models.tiers import TIER_NAMES, Tier

# A request's mode: route with the served `Policy`, or a baseline that sends every sample to one tier.
Mode = Literal["dimee", "cloud_only", "mobile_only", "edge_only"]
EDGE_CLOUD = PATHS.index("edge_cloud")  # tier ids double as the PATHS indices of their own paths
ALPHA_GRID = np.round(np.concatenate([np.linspace(0.5, 0.9, 17), np.linspace(0.91, 1.0, 37)]), 4)
ESCALATE_GRID = np.round(np.linspace(0.4, 1.0, 25), 3)


@dataclass(frozen=True)
class ExitOutputs:
    """The model's outputs on one split, as arrays: everything routing and evaluation read."""

    logits: np.ndarray  # (N, L, C) every exit
    z: np.ndarray  # (N, H) pooled layer-m representation (the mobile embedding)
    labels: np.ndarray  # (N,)
    mobile_exit: int
    edge_exit: int
    # (N, L, H) every layer's pooled representation, when cached: lets the tier boundaries move
    z_layers: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    def probs(self, layer: int) -> np.ndarray:
        logits = self.logits[:, layer - 1]
        exp = np.exp(logits - logits.max(-1, keepdims=True))
        return exp / exp.sum(-1, keepdims=True)  # (N, C)

    @cached_property
    def tier_predictions(self) -> np.ndarray:
        """(N, 3) predicted label id at the mobile, edge and final exits."""
        return np.stack([self.logits[:, k - 1].argmax(-1) for k in self.tier_exits()], axis=1)

    @cached_property
    def tier_confidences(self) -> np.ndarray:
        return np.stack([self.probs(k).max(-1) for k in self.tier_exits()], axis=1)  # (N, 3)

    def tier_exits(self) -> tuple[int, int, int]:
        return self.mobile_exit, self.edge_exit, self.num_layers

    def take(self, rows: np.ndarray) -> ExitOutputs:
        return ExitOutputs(self.logits[rows], self.z[rows], self.labels[rows], self.mobile_exit, self.edge_exit,
                           None if self.z_layers is None else self.z_layers[rows])

    def concat(self, other: ExitOutputs) -> ExitOutputs:
        layers = (None if self.z_layers is None or other.z_layers is None
                  else np.concatenate([self.z_layers, other.z_layers]))
        return ExitOutputs(np.concatenate([self.logits, other.logits]), np.concatenate([self.z, other.z]),
                           np.concatenate([self.labels, other.labels]), self.mobile_exit, self.edge_exit, layers)

    def at(self, mobile_exit: int, edge_exit: int) -> ExitOutputs:
        """The same outputs with the tier boundaries at other exits (edge may run to the last layer)."""
        if (mobile_exit, edge_exit) == (self.mobile_exit, self.edge_exit):
            return self
        if not 1 <= mobile_exit < edge_exit <= self.num_layers:
            raise ValueError(f"exits must satisfy 1 <= mobile ({mobile_exit}) < edge ({edge_exit}) <= "
                             f"{self.num_layers}")
        if mobile_exit != self.mobile_exit and self.z_layers is None:
            raise ValueError("these outputs hold the mobile embedding of one exit only: recompute them to move it")
        z = self.z if mobile_exit == self.mobile_exit else self.z_layers[:, mobile_exit - 1]
        return ExitOutputs(self.logits, z, self.labels, mobile_exit, edge_exit, self.z_layers)


@dataclass(frozen=True)
class Policy:
    """A calibrated router, stored in the artifact; one subclass per kind (`POLICY_KINDS`)."""

    kind: ClassVar[str]
    escalates: ClassVar[bool] = False  # an edge answer may go on to cloud (edge's confidence decides)
    from_tokens: ClassVar[bool] = False  # DIMEE's routing sends the token ids to cloud: no mobile slice runs
    name: str
    mobile_exit: int
    edge_exit: int
    num_layers: int
    thresholds: dict[str, float]  # centroid: {"alpha"}; learned: {"mobile", "edge"}; escalate: + {"escalate"};
    # cascade: {"mobile", "escalate"}
    tensors: dict[str, np.ndarray] = field(repr=False)
    risk: RiskBound | None = None  # the constrained policies' guarantee, when calibrated with a delta

    def route(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        """Tier id per sample, (N, H), (N, C) -> (N,); deterministic and vectorised."""
        raise NotImplementedError

    def escalate(self, edge_probs: np.ndarray) -> np.ndarray:
        """(N,) bool: samples answered on edge whose edge exit is too unsure, so cloud answers."""
        if not self.escalates:
            return np.zeros(len(edge_probs), dtype=bool)
        return edge_probs.max(-1) < self.thresholds["escalate"]

    def escalates_in(self, mode: Mode) -> bool:
        """Whether edge's unsure samples go on to cloud in `mode`: only DIMEE's own routing does it."""
        return mode == "dimee" and self.escalates

    def skips_mobile(self, mode: Mode) -> bool:
        """Whether a request in `mode` goes to cloud as token ids, without the mobile slice."""
        return mode == "cloud_only" or (mode == "dimee" and self.from_tokens)

    def plan(self, mode: Mode, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        """Where each sample goes once the mobile slice has run, in `mode`: the one decision the
        serving ingress and offline prediction share (`cloud_only` sends the tokens to cloud instead,
        so its samples never reach the mobile slice). Escalation follows where `escalates_in(mode)`."""
        if mode == "dimee":
            return self.route(z, mobile_probs)
        return np.full(len(mobile_probs), {"mobile_only": Tier.MOBILE, "edge_only": Tier.EDGE,
                                           "cloud_only": Tier.CLOUD}[mode])

    def assign(self, z: np.ndarray, mobile_probs: np.ndarray, edge_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(answering tier, path index into cost.PATHS) per sample, escalations included."""
        tiers = self.route(z, mobile_probs)
        up = (tiers == Tier.EDGE) & self.escalate(edge_probs)
        return np.where(up, Tier.CLOUD, tiers), np.where(up, EDGE_CLOUD, tiers)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "exits": {"mobile": self.mobile_exit, "edge": self.edge_exit, "num_layers": self.num_layers},
            "thresholds": self.thresholds,
            **({"risk": self.risk.to_json()} if self.risk else {}),
        }


class CentroidPolicy(Policy):
    """The paper's method as we reconstructed it: the nearest centroid of the mobile embedding z."""

    kind = "centroid"

    def route(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return nearest_centroid(z, self.tensors["centroids"])


class LearnedPolicy(Policy):
    """Ours: thresholds on two regressions' estimates that the mobile and the edge exit agree
    with the final exit, from z and the mobile exit's probabilities."""

    kind = "learned"

    @staticmethod
    def features(z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return router_features(z, mobile_probs)

    def route(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        scores = learned_scores(self.tensors, self.features(z, mobile_probs))
        return threshold_route(scores, self.thresholds["mobile"], self.thresholds["edge"])


class EscalatePolicy(LearnedPolicy):
    """Ours: the same regressions on the mobile exit's own view, and an unsure edge hands on to cloud."""

    kind = "escalate"
    escalates = True

    @staticmethod
    def features(z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return exit_features(mobile_probs)


class CascadePolicy(Policy):
    """The confidence cascade as a served policy: mobile keeps a sample its exit is sure of, edge
    every other, and edge hands on to cloud what it is unsure of. No model of its own: under risk
    control its first gate, the exit's own confidence, saves more than the regressions' estimate."""

    kind = "cascade"
    escalates = True

    def route(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return np.where(mobile_probs.max(-1) >= self.thresholds["mobile"], Tier.MOBILE, Tier.EDGE)


class DirectCascadePolicy(Policy):
    """The confidence cascade over two tiers: mobile keeps a sample its exit is sure of and sends
    every other straight to cloud (edge then serves nobody). Where an edge hop buys less than it
    costs (edge near cloud, or every hop on loopback), it is the cheaper split."""

    kind = "direct_cascade"

    def route(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return np.where(mobile_probs.max(-1) >= self.thresholds["mobile"], Tier.MOBILE, Tier.CLOUD)


class CloudOnlyPolicy(Policy):
    """No split: every text goes to cloud as token ids, as cloud-only serving does. Calibration
    serves it by default where no DIMEE policy costs less than cloud-only under its cost model
    (measured latency on a cluster whose hops cost more than the layers they save, say)."""

    kind = "cloud_only"
    from_tokens = True

    def route(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return np.full(len(mobile_probs), Tier.CLOUD)

    def assign(self, z: np.ndarray, mobile_probs: np.ndarray, edge_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.route(z, mobile_probs), np.full(len(mobile_probs), PATHS.index("cloud_only"))


POLICY_KINDS: dict[str, type[Policy]] = {cls.kind: cls for cls in (CentroidPolicy, LearnedPolicy, EscalatePolicy,
                                                                   CascadePolicy, DirectCascadePolicy,
                                                                   CloudOnlyPolicy)}


# routers -----------------------------------------------------------------------------------------


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


def nearest_centroid(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    dist = ((z[:, None, :] - centroids[None]) ** 2).sum(-1)  # (N, 3)
    dist = np.where(np.isnan(dist), np.inf, dist)
    return dist.argmin(-1)


def router_features(z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
    """Mobile-side features: the embedding, the exit's probabilities, its confidence and entropy."""
    entropy = -(mobile_probs * np.log(np.clip(mobile_probs, 1e-12, 1.0))).sum(-1, keepdims=True)
    return np.concatenate([z, mobile_probs, mobile_probs.max(-1, keepdims=True), entropy], axis=1)


def exit_features(mobile_probs: np.ndarray) -> np.ndarray:
    """The mobile exit's own view: probabilities, confidence, top-two margin, entropy."""
    top = np.sort(mobile_probs, -1)
    margin = top[:, -1:] - top[:, -2:-1] if top.shape[1] > 1 else np.zeros_like(top)
    entropy = -(mobile_probs * np.log(np.clip(mobile_probs, 1e-12, 1.0))).sum(-1, keepdims=True)
    return np.concatenate([mobile_probs, top[:, -1:], margin, entropy], axis=1)


def policy_features(kind: str, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
    return POLICY_KINDS[kind].features(z, mobile_probs)


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


def learned_scores(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """(N, 2): estimated probability that the mobile / edge exit agrees with the final exit."""
    x = (x - params["mean"]) / params["std"]
    return 1.0 / (1.0 + np.exp(-(x @ params["weight"] + params["bias"])))


def threshold_route(scores: np.ndarray, t_mobile: float, t_edge: float) -> np.ndarray:
    return np.where(scores[:, 0] >= t_mobile, Tier.MOBILE, np.where(scores[:, 1] >= t_edge, Tier.EDGE, Tier.CLOUD))


# scoring an assignment ----------------------------------------------------------------------------


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
    constrained: int  # index of the cheapest outcome within the accuracy budget
    risk: RiskBound | None  # what the risk-controlled choice guarantees (None: point estimate)


def choose(outcomes: list[Outcome], reference_accuracy: float, max_drop_pp: float, strict: bool = False,
           delta: float | None = None, path: list[int] | None = None) -> Choice:
    """The outcome with the best reward, and the cheapest outcome within the accuracy budget.
    With `delta`, "within" is risk-controlled (dimee_models/risk.py): fixed-sequence testing
    along `path` (indices of outcomes, safest first, fixed before the data are seen) certifies
    the loss rate within the budget with probability >= 1 - delta. Without, it is the point estimate on the
    calibration split: the accuracy drop, or with `strict` the losses alone, so that samples the
    final exit gets wrong and a cheaper exit happens to get right cannot pay for errors; if nothing
    meets the budget, the most accurate outcome is taken."""
    best_reward = int(np.argmax([o.reward for o in outcomes]))
    if delta is not None:
        constrained, bound = fixed_sequence(path, [o.cost for o in outcomes], [o.loss_count for o in outcomes],
                                            outcomes[0].n, max_drop_pp / 100, delta)
        return Choice(best_reward, constrained, bound)
    drops = [o.losses if strict else reference_accuracy - o.accuracy for o in outcomes]
    feasible = [i for i, d in enumerate(drops) if d <= max_drop_pp / 100 + 1e-12]
    if feasible:
        constrained = min(feasible, key=lambda i: (outcomes[i].cost, -outcomes[i].accuracy))
    else:
        constrained = int(np.argmax([o.accuracy for o in outcomes]))
    return Choice(best_reward, constrained, None)


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
    """One router kind's threshold settings, scored on the calibration split: what `calibrate`
    chooses from (once per budget and delta, without refitting)."""

    variant: str  # the name of its policies: dimee, dimee_learned, dimee_escalate (+ _constrained)
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
    """The `learned` router, or with cls=EscalatePolicy the `escalate` one (its own features, plus
    the edge-confidence threshold below which edge hands on to cloud)."""
    x = cls.features(out.z, out.probs(out.mobile_exit))
    targets = agreement_targets(out)
    scores = cross_fitted_scores(x, targets, k, seed)
    if cls.escalates:
        grids = threshold_grid(scores[:, 0], 41), threshold_grid(scores[:, 1], 21), ESCALATE_GRID
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
        combo = (t, 0.0, t) if cls.escalates else (t, t)
        tiers = threshold_route(scores, combo[0], combo[1])
        up = (tiers == Tier.EDGE) & (out.tier_confidences[:, 1] < t) if cls.escalates else np.zeros(len(tiers), bool)
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


def cascade_candidates(out: ExitOutputs, cost: CostModel) -> Candidates:
    """Every (mobile, escalate) pair of confidence thresholds from RISK_PATH; risk control walks
    the diagonal, one threshold for both (the offline `confidence_cascade` of dimee_models/evaluate.py)."""
    conf = out.tier_confidences
    grid = RISK_PATH[::-1]  # ascending: from "mobile keeps everything" to "mobile keeps nothing"
    outcomes = grid_outcomes(out, cost, conf[:, 0] >= grid[:, None], np.ones((1, len(conf)), bool),
                             conf[:, 1] < grid[:, None])
    combos = [(tm, b) for tm in grid for b in grid]
    curve = [{"mobile": float(c[0]), "escalate": float(c[1]), **_outcome_json(o)}
             for c, o in _pareto(list(zip(combos, outcomes)))]

    def make(name: str, i: int, risk: RiskBound | None) -> Policy:
        return CascadePolicy(name, out.mobile_exit, out.edge_exit, out.num_layers,
                             {"mobile": float(combos[i][0]), "escalate": float(combos[i][1])}, {}, risk)

    diagonal = [i * len(grid) + i for i in range(len(grid))][::-1]  # from 1.01 down
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
    """Every router kind's settings scored on `out`: the expensive part of calibration."""
    return [centroid_candidates(out, cost, k, seed), learned_candidates(out, cost, k, seed),
            learned_candidates(out, cost, k, seed, cls=EscalatePolicy), cascade_candidates(out, cost),
            direct_cascade_candidates(out, cost)]


def calibrate(out: ExitOutputs, cost: CostModel, max_drop_pp: float = 0.3, k: int = 5, seed: int = 0,
              delta: float | None = None, candidates: list[Candidates] | None = None) -> Calibration:
    """Every router kind's reward-best and constrained policy; `delta` makes the constrained
    choice risk-controlled (None: the point estimate on the calibration split). `candidates`:
    `score_candidates(out, cost, k, seed)` computed once for several budgets or deltas."""
    candidates = candidates or score_candidates(out, cost, k, seed)
    reference = float((out.tier_predictions[:, 2] == out.labels).mean())
    policies, curves, warnings = {}, {}, []
    for c in candidates:
        point = choose(c.outcomes[:c.grid], reference, max_drop_pp, c.strict)
        constrained, risk = point.constrained, None
        if delta is not None:
            controlled = choose(c.outcomes, reference, max_drop_pp, delta=delta, path=c.path)
            constrained, risk = controlled.constrained, controlled.risk
        policies[c.variant] = c.make(c.variant, point.by_reward, None)
        policies[f"{c.variant}_constrained"] = c.make(f"{c.variant}_constrained", constrained, risk)
        curves[c.variant] = c.curve
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


# persistence -------------------------------------------------------------------------------------

POLICY_JSON, POLICY_TENSORS = "policy.json", "policy.safetensors"


def save_policies(directory: Path, cal: Calibration, cost: CostModel, default: str, max_drop_pp: float,
                  extra: dict | None = None) -> dict:
    """Write policy.safetensors and policy.json (`extra`: more fields for the JSON, e.g. the
    cascade thresholds that evaluation compares against)."""
    tensors = {f"{name}/{key}": value for name, pol in cal.policies.items() for key, value in pol.tensors.items()}
    save_file(tensors, directory / POLICY_TENSORS)
    doc = {
        "default": default,
        "cost_model": cost.model_dump(),
        "max_accuracy_drop_pp": max_drop_pp,
        "calibration_reference_accuracy": cal.reference_accuracy,
        "policies": {name: pol.to_json() for name, pol in cal.policies.items()},
        "curves": cal.curves,
        "warnings": cal.warnings,
        **({"boundaries": cal.boundaries} if cal.boundaries else {}),
        **(extra or {}),
    }
    (directory / POLICY_JSON).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def load_policies(directory: str | Path) -> tuple[dict[str, Policy], dict]:
    """All stored policies by name, and the policy document (default name, cost model, curves)."""
    root = Path(directory)
    if not (root / POLICY_JSON).is_file():
        raise FileNotFoundError(f"{root} has no calibrated policy; run `dimee calibrate {root}` first")
    doc = json.loads((root / POLICY_JSON).read_text())
    tensors = load_file(root / POLICY_TENSORS)
    policies = {}
    for name, p in doc["policies"].items():
        own = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
        ex = p["exits"]
        risk = RiskBound(**p["risk"]) if "risk" in p else None
        policies[name] = POLICY_KINDS[p["kind"]](name, ex["mobile"], ex["edge"], ex["num_layers"], p["thresholds"],
                                                 own, risk)
    return policies, doc
