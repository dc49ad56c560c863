"""DIMEE routing policies: decide per sample, from what the mobile tier computed, where to answer.

Four policy kinds share one interface, used by offline evaluation and by the serving ingress alike:
`Policy.route(z, mobile_probs) -> tier ids` (0 mobile, 1 edge, 2 cloud) decides on mobile, and
`Policy.escalate(edge_probs)` says which samples answered on edge go on to cloud after all.
`Policy.plan(mode)` puts both together for one request's mode (and whether it skips the mobile
slice), for the serving ingress and offline prediction alike.

- `centroid` (the method of docs/METHOD.md, "The centroid policy (our reading of DIMEE)"): pools EASY / MEDIUM / HARD from confidence
  thresholds at alpha, one centroid of the mobile embedding z per pool, nearest centroid wins.
- `learned` (ours): two logistic regressions on mobile-side features (z and the mobile
  exit's probabilities) estimate whether the mobile exit and the edge exit would agree with the
  final exit; thresholds on those estimates.
- `escalate` (ours): the same regressions on the mobile exit's probabilities alone (z made
  them worse: docs/DECISIONS.md, "Policies"), and an edge that is unsure (edge confidence below a threshold)
  hands its layer-e hidden state on to cloud.
- `cascade`: the confidence cascade served: the mobile exit keeps what it is sure of, edge the
  rest, and edge hands on to cloud what it is unsure of (the escalate policy's path, with the
  exits' own confidences as gates).

Here is what serving needs: the kinds, their features and `load_policies`, on numpy alone (no
torch). Fitting and choosing them is calibration's (dimee_models/calibration.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from safetensors.numpy import load_file

from dimee_models.cost import PATHS
from dimee_models.policy_doc import PolicyDoc
from dimee_models.risk import RISK_PATH, RiskBound
from dimee_models.tiers import Tier
from dimee_models.wire import Wire

# A request's mode: route with the served `Policy`, or a baseline that sends every sample to one tier.
Mode = Literal["dimee", "cloud_only", "mobile_only", "edge_only"]
EDGE_CLOUD = PATHS.index("edge_cloud")  # tier ids double as the PATHS indices of their own paths
POLICY_JSON, POLICY_TENSORS = "policy.json", "policy.safetensors"


@dataclass(frozen=True)
class Policy:
    """A calibrated policy, stored in the artifact; one subclass per kind (`POLICY_KINDS`)."""

    kind: ClassVar[str]
    escalates: ClassVar[bool] = False  # an edge answer may go on to cloud (edge's confidence decides)
    from_tokens: ClassVar[bool] = False  # DIMEE's routing sends the token ids to cloud: no mobile slice runs
    # the thresholds risk control's path moves together (calibration.py); none: a policy with no such path
    path_gates: ClassVar[tuple[str, ...]] = ()
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

    def plan(self, mode: Mode) -> Plan:
        """Everything a request in `mode` needs: the one decision the serving ingress and offline
        prediction share."""
        decides = mode == "dimee"
        return Plan(self, mode, skips_mobile=mode == "cloud_only" or (decides and self.from_tokens),
                    decides=decides, keeps_hidden=mode != "mobile_only",
                    escalate_below=self.thresholds["escalate"] if decides and self.escalates else None)

    def assign(self, z: np.ndarray, mobile_probs: np.ndarray, edge_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(answering tier, path index into cost.PATHS) per sample, escalations included."""
        tiers = self.route(z, mobile_probs)
        up = (tiers == Tier.EDGE) & self.escalate(edge_probs)
        return np.where(up, Tier.CLOUD, tiers), np.where(up, EDGE_CLOUD, tiers)

    def path_index(self) -> int | None:
        """Where the calibrated thresholds sit on risk control's path (RISK_PATH), or None: no path
        (centroid, cloud-only), or thresholds not set by risk control."""
        if not self.path_gates or self.risk is None:
            return None
        [at] = np.flatnonzero(np.isclose(RISK_PATH, self.thresholds["mobile"])).tolist() or [None]
        return at

    def at_path(self, index: int) -> Policy:
        """This policy with its path's gates at RISK_PATH[index] (a safer setting at a lower index;
        index 0 answers nothing early). A gate off the path where calibration chose (a cascade's
        escalation where it cannot help, at 0) stays where it is."""
        moving = [g for g in self.path_gates if self.thresholds[g] == self.thresholds["mobile"]]
        thresholds = {**self.thresholds, **{g: float(RISK_PATH[index]) for g in moving}}
        return dataclasses.replace(self, thresholds=thresholds)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "exits": {"mobile": self.mobile_exit, "edge": self.edge_exit, "num_layers": self.num_layers},
            "thresholds": self.thresholds,
            **({"risk": self.risk.to_json()} if self.risk else {}),
        }


@dataclass(frozen=True)
class Plan:
    """How a request in one mode is served with `policy`, from `Policy.plan`."""

    policy: Policy
    mode: Mode
    skips_mobile: bool  # the token ids go to cloud: no sample runs the mobile slice
    decides: bool  # the policy routes (mode dimee), so its choices are counted as routing decisions
    keeps_hidden: bool  # mobile keeps its hidden state, for the samples that go on to edge or cloud
    escalate_below: float | None  # edge keeps the hidden state of rows below this confidence, for cloud

    def tiers(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        """Where each sample goes once the mobile slice has run, (N,) tier ids."""
        if self.decides:
            return self.policy.route(z, mobile_probs)
        return np.full(len(mobile_probs), {"mobile_only": Tier.MOBILE, "edge_only": Tier.EDGE,
                                           "cloud_only": Tier.CLOUD}[self.mode])

    def escalated(self, edge_probs: np.ndarray) -> np.ndarray:
        """(N,) bool: the edge answers that go on to cloud; none unless this plan escalates."""
        if self.escalate_below is None:
            return np.zeros(len(edge_probs), dtype=bool)
        return self.policy.escalate(edge_probs)


class CentroidPolicy(Policy):
    """The paper's method as we reconstructed it: the nearest centroid of the mobile embedding z."""

    kind = "centroid"

    def route(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return nearest_centroid(z, self.tensors["centroids"])


class LearnedPolicy(Policy):
    """Ours: thresholds on two regressions' estimates that the mobile and the edge exit agree
    with the final exit, from z and the mobile exit's probabilities."""

    kind = "learned"
    path_gates = ("mobile", "edge")

    @staticmethod
    def features(z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return embedding_features(z, mobile_probs)

    def route(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        scores = learned_scores(self.tensors, self.features(z, mobile_probs))
        return threshold_route(scores, self.thresholds["mobile"], self.thresholds["edge"])


class EscalatePolicy(LearnedPolicy):
    """Ours: the same regressions on the mobile exit's own view, and an unsure edge hands on to cloud."""

    kind = "escalate"
    escalates = True
    path_gates = ("mobile", "escalate")

    @staticmethod
    def features(z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return exit_features(mobile_probs)


class CascadePolicy(Policy):
    """The confidence cascade as a served policy: mobile keeps a sample its exit is sure of, edge
    every other, and edge hands on to cloud what it is unsure of. No model of its own: under risk
    control its first gate, the exit's own confidence, saves more than the regressions' estimate."""

    kind = "cascade"
    escalates = True
    path_gates = ("mobile", "escalate")

    def route(self, z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
        return np.where(mobile_probs.max(-1) >= self.thresholds["mobile"], Tier.MOBILE, Tier.EDGE)


class DirectCascadePolicy(Policy):
    """The confidence cascade over two tiers: mobile keeps a sample its exit is sure of and sends
    every other straight to cloud (edge then serves nobody). Where an edge hop buys less than it
    costs (edge near cloud, or every hop on loopback), it is the cheaper split."""

    kind = "direct_cascade"
    path_gates = ("mobile",)

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


# routing -----------------------------------------------------------------------------------------


def nearest_centroid(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    dist = ((z[:, None, :] - centroids[None]) ** 2).sum(-1)  # (N, 3)
    dist = np.where(np.isnan(dist), np.inf, dist)
    return dist.argmin(-1)


def embedding_features(z: np.ndarray, mobile_probs: np.ndarray) -> np.ndarray:
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


def learned_scores(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """(N, 2): estimated probability that the mobile / edge exit agrees with the final exit."""
    x = (x - params["mean"]) / params["std"]
    return 1.0 / (1.0 + np.exp(-(x @ params["weight"] + params["bias"])))


def threshold_route(scores: np.ndarray, t_mobile: float, t_edge: float) -> np.ndarray:
    return np.where(scores[:, 0] >= t_mobile, Tier.MOBILE, np.where(scores[:, 1] >= t_edge, Tier.EDGE, Tier.CLOUD))


# persistence -------------------------------------------------------------------------------------


def served_wire(directory: str | Path) -> Wire:
    """The wire policy.json was certified on (float32 hidden states where nothing is calibrated yet)."""
    path = Path(directory) / POLICY_JSON
    return PolicyDoc.model_validate_json(path.read_text()).wire if path.is_file() else Wire()


def load_policies(directory: str | Path) -> tuple[dict[str, Policy], PolicyDoc]:
    """All stored policies by name, and the policy document (default name, cost model, curves)."""
    root = Path(directory)
    if not (root / POLICY_JSON).is_file():
        raise FileNotFoundError(f"{root} has no calibrated policy; run `dimee calibrate {root}` first")
    doc = PolicyDoc.model_validate_json((root / POLICY_JSON).read_text())
    tensors = load_file(root / POLICY_TENSORS)
    policies = {}
    for name, p in doc.policies.items():
        own = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
        ex = p["exits"]
        risk = RiskBound(**p["risk"]) if "risk" in p else None
        policies[name] = POLICY_KINDS[p["kind"]](name, ex["mobile"], ex["edge"], ex["num_layers"], p["thresholds"],
                                                 own, risk)
    return policies, doc
