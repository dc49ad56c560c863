"""Shadow checks: after a request is answered, a random share (`shadow_rate`) of the samples it
routed early is run to the final exit and compared with what was answered; the counts feed the
live bound (deployments/live_risk.py), and with `shadow_log` the audited texts go to the head's
disk for `dimee calibrate --from-traffic`. They never compete with requests: at most one in flight
per ingress replica, none while the texts in flight are past `SHADOW_ROOM` of the text budget
(both dropped and counted)."""

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from ray import serve

from deployments import weights
from deployments.dispatch import Dispatcher
from deployments.live_risk import LiveGuard
from deployments.metrics import RouterMetrics
from deployments.schemas import HiddenArrays, Prediction, TierRequest
from deployments.settings import Settings
from dimee_models.tiers import Tier

log = logging.getLogger("ray.serve")
SHADOW_CALLS, SHADOW_ROOM = 1, 0.75


class ShadowAuditor:
    def __init__(self, tiers: Dispatcher, guard: LiveGuard, metrics: RouterMetrics,
                 background: Callable[[Awaitable], None]):
        self.tiers, self.guard, self.metrics, self.background = tiers, guard, metrics, background
        self.in_flight = 0
        self.rng = np.random.default_rng()

    def audit(self, answers: list[Prediction], hidden: HiddenArrays | None, s: Settings, at: int | None,
              texts: list[str], pairs: list[str] | None, texts_in_flight: int) -> None:
        """Shadow checks of a random `shadow_rate` share of one request's routed samples (degraded
        answers aside: they are no policy's). Whether a request's audit is dropped for room is decided
        before anything about its samples is looked at, so that dropping cannot bias the bound."""
        rows = [int(r) for r in np.flatnonzero(self.rng.random(len(answers)) < s.shadow_rate)
                if not answers[r].degraded]
        if not rows:
            return
        if self.in_flight >= SHADOW_CALLS or texts_in_flight > SHADOW_ROOM * s.max_texts_in_flight:
            self.metrics.shadow("dropped", len(rows))
            return
        self.in_flight += 1
        self.background(self.check(rows, answers, hidden, s, at, texts, pairs))

    async def check(self, rows: list[int], answers: list[Prediction], hidden: HiddenArrays | None, s: Settings,
                    at: int | None, texts: list[str], pairs: list[str] | None) -> None:
        """The final exit on the audited rows answered early, from the mobile hidden state (cloud runs
        the layers after mobile's), compared with what was answered; the counts go to the monitor."""
        # cloud's answers are the final exit's, unless computed from a rounded state or by an int8 slice
        early = [r for r in rows if answers[r].tier != Tier.CLOUD.label or s.wire.changes_states]
        try:
            final = {r: answers[r].label_id for r in rows}
            if early:
                request = TierRequest(self.tiers.mobile.store(hidden, early))
                reply = await asyncio.wait_for(self.tiers.handle(Tier.CLOUD, request).remote(request),
                                               s.hop_timeout_s)
                final.update(zip(early, (int(f) for f in reply.probs.argmax(-1))))
            disagreements = sum(final[r] != answers[r].label_id for r in early)
            await self.guard.record(s.watch, at, len(rows), disagreements)
            self.metrics.shadow("disagreed", disagreements)
            self.metrics.shadow("agreed", len(early) - disagreements)
            self.metrics.shadow("answered_on_cloud", len(rows) - len(early))
        except Exception as err:  # cloud's queue full or late, a failed replica, the monitor away: dropped
            self.metrics.shadow("dropped", len(rows))
            log.info("shadow check of %d samples dropped: %r", len(rows), err)
            return
        finally:
            self.in_flight -= 1
        if s.shadow_log:
            try:
                await self.log(s.shadow_log, rows, answers, final, texts, pairs)
            except Exception as err:  # the bound has the check; only the log lacks it
                log.warning("could not append to the shadow log %s: %r", s.shadow_log, err)

    @staticmethod
    async def log(directory: str, rows: list[int], answers: list[Prediction], final: dict[int, int],
                  texts: list[str], pairs: list[str] | None) -> None:
        """The audited texts, a random sample of the traffic, for `dimee calibrate --from-traffic`: one
        JSON line each in this replica's file of the shadow log directory, on the head's disk."""
        lines = [json.dumps({"text": texts[r], **({"text_pair": pairs[r]} if pairs else {}),
                             "answer": answers[r].label_id, "final": final[r], "tier": answers[r].tier,
                             "time": time.time()}) for r in rows]
        path = Path(directory) / f"shadow-{serve.get_replica_context().replica_id.unique_id}.jsonl"
        await weights.store().append.remote(str(path), "".join(line + "\n" for line in lines))
