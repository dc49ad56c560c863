"""The ingress's metrics: Serve's counters and histograms for Prometheus (their names and tags are
what deployments/grafana/dimee.json reads), and this replica's counts since it started, for /v1/info."""

import collections

import numpy as np
from ray.serve import metrics

from deployments.schemas import Prediction
from dimee_models.tiers import Tier


class RouterMetrics:
    def __init__(self):
        self.requests = metrics.Counter("dimee_requests", "classify requests, by mode", tag_keys=("mode",))
        self.answers = metrics.Counter("dimee_answers", "predictions by answering tier and outcome "
                                       "(normal, fallback, degraded, escalated)", tag_keys=("mode", "tier", "outcome"))
        self.decisions = metrics.Counter("dimee_routing_decisions", "tier chosen by the DIMEE policy, per sample",
                                         tag_keys=("tier",))
        self.hop_failures = metrics.Counter("dimee_hop_failures", "tier calls that failed or timed out",
                                            tag_keys=("tier", "reason"))
        self.shed_requests = metrics.Counter("dimee_shed_requests", "requests refused with 503: the ingress's texts "
                                             "in flight (tier=ingress) or an edge or cloud queue was full",
                                             tag_keys=("tier",))
        self.shadow_checks = metrics.Counter(
            "dimee_shadow_checks", "audited samples (shadow checks): agreed or disagreed with the final exit, "
            "answered on cloud (no check needed), or dropped (no room, or the check failed)", tag_keys=("outcome",))
        self.answer_cost = metrics.Histogram(
            "dimee_answer_cost", "each answer's cost under the active cost model (unit: abstract, or ms per text "
            "at one text per request from a cluster profile): mean = sum / count, to compare with the prediction",
            boundaries=[0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500], tag_keys=("mode", "unit"))
        # since this replica started: shed and failed calls; answers and summed cost by (mode, unit)
        self.counts = {"shed": collections.Counter(), "hop_failures": collections.Counter(),
                       "answers": collections.Counter(), "cost": collections.Counter(), "shadow": collections.Counter()}

    def request(self, mode: str) -> None:
        self.requests.inc(tags={"mode": mode})

    def answered(self, mode: str, answers: list[Prediction], unit: str) -> None:
        for answer in answers:
            outcome = ("degraded" if answer.degraded else "fallback" if answer.fallback
                       else "escalated" if answer.escalated else "normal")
            self.answers.inc(tags={"mode": mode, "tier": answer.tier, "outcome": outcome})
            self.answer_cost.observe(answer.cost, tags={"mode": mode, "unit": unit})
            self.counts["answers"][mode, unit] += 1
            self.counts["cost"][mode, unit] += answer.cost

    def decided(self, tiers: np.ndarray) -> None:
        """The tier the policy chose per sample."""
        for tier, count in zip(*np.unique(tiers, return_counts=True)):
            self.decisions.inc(int(count), tags={"tier": Tier(tier).label})

    def shed(self, where: str) -> None:
        self.shed_requests.inc(tags={"tier": where})
        self.counts["shed"][where] += 1

    def shadow(self, outcome: str, samples: int) -> None:
        if samples:
            self.shadow_checks.inc(samples, tags={"outcome": outcome})
            self.counts["shadow"][outcome] += samples

    def hop_failed(self, tier: Tier, reason: str) -> None:
        self.hop_failures.inc(tags={"tier": tier.label, "reason": reason})
        self.counts["hop_failures"][tier.label, reason] += 1

    def since_start(self) -> dict:
        """/v1/info's counts: busy tiers (503) apart from failed ones (fallback), and the served cost."""
        return {
            "shed": dict(self.counts["shed"]),
            "shadow_checks": dict(self.counts["shadow"]),
            "hop_failures": {f"{tier}/{reason}": n for (tier, reason), n in self.counts["hop_failures"].items()},
            "served_cost": {f"{mode}/{unit}": {"answers": n, "mean": self.counts["cost"][mode, unit] / n}
                            for (mode, unit), n in self.counts["answers"].items()},
        }
