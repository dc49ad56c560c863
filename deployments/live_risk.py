"""The live bound: shadow checks from every ingress replica, aggregated by one small Serve
deployment, turned into a confidence sequence on the served policy's risk, and the response to drift.

Each ingress audits a random share (`shadow_rate`) of the samples it routes: an audited sample
counts 1 when it was answered early (mobile or edge) and the final exit, run afterwards by the
shadow check, answers otherwise; one cloud answered counts 0 at no cost (cloud is the final exit).
The mean of these counts is the share of all routed traffic whose answer differs from the final
exit's, which bounds the accuracy drop against cloud-only from above (docs/METHOD.md); so no
scaling by the early share is needed. The confidence sequence (dimee_models/risk.py) stays valid
while it is read after every sample. So that months of good traffic do not dilute a drift, a
sequence covers at most `WINDOW` samples and the next starts afresh; the k-th sequence runs at
delta / (k (k + 1)), so all of them together are wrong anywhere with probability at most delta.

States: `ok`; `alarm` when the lower end of the sequence is above the budget (the drop is over the
budget with confidence 1 - delta; a chance alarm on traffic within the budget has probability at
most delta); `tightened` when, with `on_drift: tighten`, the router serves a safer setting than the
calibrated one. Tightening steps back along risk control's path (dimee_models/risk.RISK_PATH,
every gate of the policy at one threshold) halfway to "nobody answers early", and starts a new
sequence there; each further alarm halves again. Once the setting served has shown itself within
the budget (the upper end below it) on enough samples, it steps forward on probation, halfway back
to the calibrated setting; a probation that alarms steps back and doubles the samples the next
probation waits for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from dimee_models.policy import Policy
from dimee_models.risk import RISK_PATH, confidence_sequence

log = logging.getLogger("ray.serve")
STATES = ("ok", "tightened", "alarm")
FIRST_PROBATION = 1000  # samples a tightened setting is watched before the first step forward
WINDOW = 5000  # samples per sequence
KEPT_CHANGES = 20


class LiveRisk:
    """The state machine, apart from Serve (unit-tested as is). `watch` identifies what the ingress
    serves: {policy, thresholds, path_index (the calibrated setting's index into RISK_PATH, or None
    where the policy has no path to step along), budget_pp, delta, on_drift}."""

    def __init__(self):
        self.watch: dict | None = None
        self.changes: list[dict] = []

    def start(self, watch: dict) -> None:
        self.watch, self.at = watch, watch["path_index"]
        self.probation, self.on_probation = FIRST_PROBATION, False
        self.sequence = 0
        self.restart()

    def restart(self) -> None:
        self.sequence += 1
        self.samples = self.disagreements = 0
        self.low = 0.0
        self.high = 1.0

    def record(self, watch: dict, at: int | None, samples: int, disagreements: int) -> dict:
        """Counts from one ingress, made at path index `at`; counts made at another setting than the
        one now served (a replica that has not yet heard of a step) are not this sequence's."""
        if watch != self.watch:
            self.start(watch)
        if at == self.at:
            if self.samples >= WINDOW:
                self.restart()
            self.samples += samples
            self.disagreements += disagreements
            budget = watch["budget_pp"] / 100
            self.low, self.high = confidence_sequence(self.disagreements, self.samples, self.delta(), budget)
            self.respond(budget)
        return self.state()

    def delta(self) -> float:
        return self.watch["delta"] / (self.sequence * (self.sequence + 1))

    def respond(self, budget: float) -> None:
        steppable = self.watch["on_drift"] == "tighten" and self.at is not None
        calibrated = self.watch["path_index"]
        if self.low > budget and steppable and self.at > 0:
            if self.on_probation:
                self.probation *= 2
            self.move(self.at // 2, "the live bound's lower end crossed the budget", probation=False)
        elif steppable and self.at < calibrated and self.high <= budget and self.samples >= self.probation:
            self.move((self.at + calibrated + 1) // 2, "the setting served stayed within the budget; on probation",
                      probation=True)

    def move(self, to: int, why: str, probation: bool) -> None:
        change = {"time": time.time(), "from": float(RISK_PATH[self.at]), "to": float(RISK_PATH[to]), "why": why,
                  "samples": self.samples, "disagreements": self.disagreements,
                  "lcb_pp": 100 * self.low, "ucb_pp": 100 * self.high}
        log.warning("live risk: threshold %.4f -> %.4f: %s (%d of %d samples disagreed)", change["from"],
                    change["to"], why, self.disagreements, self.samples)
        self.changes = (self.changes + [change])[-KEPT_CHANGES:]
        self.at, self.on_probation = to, probation
        self.restart()

    def state(self) -> dict:
        """/v1/info's `live_risk`; `path_index` is the setting every ingress should serve."""
        if self.watch is None:
            return {"state": "ok", "samples": 0, "disagreements": 0, "path_index": None}
        budget_pp = self.watch["budget_pp"]
        calibrated = self.watch["path_index"]
        state = ("tightened" if calibrated is not None and self.at < calibrated
                 else "alarm" if 100 * self.low > budget_pp else "ok")
        return {
            "state": state, "samples": self.samples, "disagreements": self.disagreements,
            "ucb_pp": 100 * self.high, "lcb_pp": 100 * self.low, "budget_pp": budget_pp,
            "delta": self.watch["delta"], "sequence": self.sequence, "sequence_delta": self.delta(),
            "on_drift": self.watch["on_drift"], "path_index": self.at,
            "threshold": None if self.at is None else float(RISK_PATH[self.at]),
            "calibrated_threshold": None if calibrated is None else float(RISK_PATH[calibrated]),
            "changes": self.changes, "watch": self.watch,
        }

    @classmethod
    def fresh(cls, watch: dict) -> dict:
        """The state of a watch with no shadow check yet."""
        live = cls()
        live.start(watch)
        return live.state()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class RiskMonitor:
    """One replica per application: every ingress replica's shadow checks in one sequence.
    Restarted by Serve if it dies; the sequence then starts afresh (the calibrated setting and its
    offline guarantee hold meanwhile)."""

    def __init__(self):
        self.live = LiveRisk()
        self.gauges = {name: metrics.Gauge(f"dimee_live_risk_{name}", text) for name, text in (
            ("ucb_pp", "upper end of the live bound on the served answers' disagreement with the final exit, pp"),
            ("lcb_pp", "lower end of the live bound, pp: above the budget means drift (state alarm or tightened)"),
            ("budget_pp", "the accuracy budget the served policy was certified for, pp"),
            ("samples", "shadow-checked samples in the live bound's sequence"),
            ("state", "0 ok, 1 tightened, 2 alarm"),
            ("threshold", "the risk path threshold served (1.01: nothing answered early)"))}

    def record(self, watch: dict, at: int | None, samples: int, disagreements: int) -> dict:
        state = self.live.record(watch, at, samples, disagreements)
        for name, gauge in self.gauges.items():
            value = STATES.index(state["state"]) if name == "state" else state.get(name)
            if value is not None:
                gauge.set(value)
        return state

    def state(self) -> dict:
        return self.live.state()


class LiveGuard:
    """The ingress's side of the live bound: its last copy of the monitor's state (read in the
    background, at most every second, so a request never waits on the monitor) and the policy to
    route with, the calibrated one or the setting the bound stepped to."""

    def __init__(self, monitor: DeploymentHandle, background: Callable[[Awaitable], None]):
        self.monitor, self.background = monitor, background
        self.live: dict = {"state": "ok", "samples": 0, "disagreements": 0, "path_index": None}
        self.checked = 0.0
        self.stepped: tuple[Policy, int, Policy] | None = None  # (calibrated policy, path index, the policy there)

    def refresh(self, watch: dict, every_s: float = 1.0) -> None:
        if time.monotonic() - self.checked >= every_s:
            self.checked = time.monotonic()
            self.background(self.read(watch))

    async def read(self, watch: dict) -> dict:
        """The live bound on the settings `watch` (this replica's last copy if the monitor cannot be reached)."""
        try:
            self.live = await asyncio.wait_for(self.monitor.state.remote(), 10)
        except Exception as err:
            log.warning("could not read the live bound from the monitor: %r", err)
        live = self.live if self.live.get("watch") == watch else LiveRisk.fresh(watch)
        return {k: v for k, v in live.items() if k != "watch"}

    async def record(self, watch: dict, at: int | None, samples: int, disagreements: int) -> None:
        self.live = await asyncio.wait_for(self.monitor.record.remote(watch, at, samples, disagreements), 10)

    def routing_policy(self, policy: Policy, watch: dict) -> tuple[Policy, int | None]:
        """The policy to route with and its index on the risk path: the calibrated `policy`, or the
        setting the live bound stepped to while it watches these settings."""
        at = self.live.get("path_index")
        if self.live.get("watch") != watch or at is None or at == watch["path_index"]:
            return policy, watch["path_index"]
        if self.stepped is None or self.stepped[0] is not policy or self.stepped[1] != at:
            self.stepped = (policy, at, policy.at_path(at))
        return self.stepped[2], at
