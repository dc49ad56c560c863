"""The ingress's calls to the tiers, one request at a time: the mobile exit in-process, then edge
and cloud for the samples the policy sends past mobile, escalation from edge to cloud, and what
stands in for a tier that fails or is late.

Every tier call has a timeout, and a request one deadline for all its calls. A failed or late edge
sends its samples to cloud (`fallback`); a failed or late cloud leaves them with the deepest exit
already computed (`degraded`). A *busy* tier is not a failed one: when its bounded queue is full,
Serve refuses the call at once and `TierBusy` ends the whole request (the ingress answers 503 with
Retry-After), so that clients back off instead of getting degraded answers. Tiers that Serve's
controller reports without a running replica are not called at all (a call there would wait out
its timeout).
"""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.metrics import RouterMetrics
from deployments.schemas import AppArgs, HiddenArrays, HiddenRef, Prediction, TierReply, TierRequest, Tokens
from deployments.settings import Settings
from deployments.tier import TierRunner
from dimee_models.policy import Plan
from dimee_models.tiers import Tier

log = logging.getLogger("ray.serve")


class TierBusy(Exception):
    """A tier's bounded queue is full: the request is refused whole, not answered degraded."""

    def __init__(self, tier: Tier):
        super().__init__(f"the {tier.label} tier is at capacity (its queue is full): retry later")
        self.tier = tier


@dataclasses.dataclass(frozen=True)
class RequestContext:
    """What every step of one admitted request shares."""

    plan: Plan
    settings: Settings
    deadline: float  # time.monotonic() by which every tier call has returned


class Dispatcher:
    def __init__(self, edge: DeploymentHandle, cloud: DeploymentHandle, args: AppArgs, mobile: TierRunner,
                 mobile_batch: Callable[[TierRequest], Awaitable[TierReply]], labels: list[str],
                 metrics: RouterMetrics, background: Callable[[Awaitable], None]):
        # Set here, not by the environment of whichever process built the app (a handle carries that).
        self.handles = {t: h.options(_by_reference=args.transport == "actor") for t, h in ((Tier.EDGE, edge),
                                                                                          (Tier.CLOUD, cloud))}
        # A call whose request or reply may carry an ObjectRef (a hidden state in the object store)
        # goes by Ray actor call: Serve's gRPC transport pickles it outside Ray's serializer, and Ray
        # then pins the object for the life of the process (out-of-band serialization: a leak).
        self.ref_handles = {t: h.options(_by_reference=True) for t, h in ((Tier.EDGE, edge), (Tier.CLOUD, cloud))}
        self.mobile, self.mobile_batch, self.labels = mobile, mobile_batch, labels
        self.metrics, self.background = metrics, background
        self.no_replica: set[Tier] = set()
        self.no_replica_checked = 0.0
        self.replicas_read: asyncio.Future | None = None  # the one read of Serve's controller in flight

    def handle(self, tier: Tier, request: TierRequest) -> DeploymentHandle:
        by_ref = isinstance(request.input, HiddenRef) or request.keep_hidden  # a kept state may come back by ref
        return (self.ref_handles if by_ref else self.handles)[tier]

    async def run(self, tokens: Tokens, ctx: RequestContext) -> tuple[list[Prediction], HiddenArrays | None]:
        """The answers, and the mobile hidden state if the mobile slice ran (for shadow checks)."""
        plan, s = ctx.plan, ctx.settings
        if plan.skips_mobile:
            if plan.decides:
                self.metrics.decided(np.full(len(tokens.input_ids), Tier.CLOUD))
            cloud = await self.call(Tier.CLOUD, TierRequest(tokens), ctx)
            if cloud is not None:
                return self.answer(cloud, Tier.CLOUD, s.path_cost["cloud_only"]), None
            mobile = await self.mobile_batch(TierRequest(tokens))
            return self.answer(mobile, Tier.MOBILE, s.path_cost["mobile"], degraded=True), None
        mobile = await self.mobile_batch(TierRequest(tokens, keep_hidden=plan.keeps_hidden))
        tiers = plan.tiers(mobile.z, mobile.probs)
        if plan.decides:
            self.metrics.decided(tiers)
        answers = self.answer(mobile, Tier.MOBILE, s.path_cost["mobile"])
        on_mobile = list(answers)  # what a degraded sample falls back to
        offloaded = [(tier, np.flatnonzero(tiers == tier).tolist()) for tier in (Tier.EDGE, Tier.CLOUD)]
        calls = [asyncio.ensure_future(self.offload(tier, rows, mobile, on_mobile, ctx, tokens))
                 for tier, rows in offloaded if rows]
        try:
            results = await asyncio.gather(*calls)
        except TierBusy:  # the request gets 503, so the other tier's call is not needed
            for c in calls:
                c.cancel()
            raise
        for rows, predictions in results:
            for row, prediction in zip(rows, predictions):
                answers[row] = prediction
        return answers, mobile.hidden

    async def offload(self, tier: Tier, rows: list[int], mobile: TierReply, on_mobile: list[Prediction],
                      ctx: RequestContext, tokens: Tokens) -> tuple[list[int], list[Prediction]]:
        """Rows the policy sent past mobile: edge (else cloud, as fallback) or cloud; if neither
        answers, the mobile exit's predictions, marked degraded. Only these rows' hidden state is
        sent on (in the wire's format), or for cloud their token ids where the wire carries those."""
        plan, costs, wire = ctx.plan, ctx.settings.path_cost, ctx.settings.wire
        if tier is Tier.CLOUD and plan.decides and wire.carrier == "tokens":
            sent = tokens.take(rows)
        else:
            sent = self.mobile.store(mobile.hidden, rows, wire.format)
        if tier is Tier.EDGE:
            # edge keeps the hidden state of the rows cloud will need, if the plan escalates
            request = TierRequest(sent, keep_hidden=plan.escalate_below is not None, keep_below=plan.escalate_below,
                                  wire=wire.format)
            reply = await self.call(Tier.EDGE, request, ctx)
            if reply is not None:
                return rows, await self.escalate(reply, self.answer(reply, Tier.EDGE, costs["edge"]), ctx)
        reply = await self.call(Tier.CLOUD, TierRequest(sent), ctx)
        if reply is not None:
            return rows, self.answer(reply, Tier.CLOUD, costs["cloud"], fallback=tier is Tier.EDGE)
        return rows, [on_mobile[row].model_copy(update={"degraded": True}) for row in rows]

    async def escalate(self, edge: TierReply, answers: list[Prediction], ctx: RequestContext) -> list[Prediction]:
        """Edge's answers, with those it is too unsure of replaced by cloud's, computed from the
        hidden state edge kept of exactly those rows; if cloud fails, edge's answers stay, marked
        degraded."""
        unsure = np.flatnonzero(ctx.plan.escalated(edge.probs)).tolist()
        if not unsure:
            return answers
        reply = await self.call(Tier.CLOUD, TierRequest(edge.hidden), ctx)
        cloud = (self.answer(reply, Tier.CLOUD, ctx.settings.path_cost["edge_cloud"], escalated=True)
                 if reply is not None else [answers[row].model_copy(update={"degraded": True}) for row in unsure])
        for row, prediction in zip(unsure, cloud):
            answers[row] = prediction
        return answers

    async def call(self, tier: Tier, request: TierRequest, ctx: RequestContext) -> TierReply | None:
        """One tier call within the hop timeout and what is left of the request's deadline; None if it
        failed or was late (the caller falls back, so a fallback never starts a fresh wait)."""
        self.refresh_no_replica()
        timeout_s = min(ctx.settings.hop_timeout_s, ctx.deadline - time.monotonic())
        reason = "unavailable" if tier in self.no_replica else "deadline"
        if timeout_s > 0 and reason != "unavailable":
            began = time.perf_counter()
            try:
                return await asyncio.wait_for(self.handle(tier, request).remote(request), timeout_s)
            except BackPressureError:
                raise TierBusy(tier) from None
            except asyncio.TimeoutError:
                reason = "timeout"
            except Exception as err:  # a dead replica, a deployment being replaced, an error in the tier: all fall back
                reason = "error"
                log.warning("%s tier call failed after %.0f ms: %r", tier.label,
                            (time.perf_counter() - began) * 1000, err)
        self.metrics.hop_failed(tier, reason)
        return None

    def answer(self, reply: TierReply, tier: Tier, cost: float, fallback: bool = False,
               degraded: bool = False, escalated: bool = False) -> list[Prediction]:
        predictions = []
        for probs in reply.probs:
            label_id = int(probs.argmax())
            predictions.append(Prediction(
                label=self.labels[label_id], label_id=label_id, confidence=float(probs.max()), tier=tier.label,
                exit_layer=reply.exit_layer, cost=round(cost, 6), fallback=fallback, degraded=degraded,
                escalated=escalated,
            ))
        return predictions

    def refresh_no_replica(self, every_s: float = 1.0) -> None:
        """Start a background refresh of the tiers without a running replica, at most every `every_s`."""
        if time.monotonic() - self.no_replica_checked < every_s:
            return
        self.no_replica_checked = time.monotonic()

        async def refresh() -> None:
            live = await self.replica_counts()
            # the controller unreachable: keep calling every tier
            self.no_replica = set() if live is None else {t for t, n in live.items() if n == 0}
        self.background(refresh())

    @staticmethod
    def live_replicas() -> dict[Tier, int]:
        """Running replicas per tier, as Serve's controller sees them; a controller started again
        (the head back) reports the replicas it takes up as RECOVERING: they answer meanwhile."""
        return {Tier.of_deployment(d): sum(state.replica_states.get(s, 0) for s in ("RUNNING", "RECOVERING"))
                for app in serve.status().applications.values() for d, state in app.deployments.items()
                if Tier.of_deployment(d) is not None}

    async def replica_counts(self, timeout_s: float = 2.0) -> dict[Tier, int] | None:
        """`live_replicas`, or None if Serve's controller did not answer within `timeout_s` (its head
        is away: the tiers keep serving). One read at a time: a read that hangs until the head is
        back must not take a thread of every request that asks meanwhile."""
        if self.replicas_read is None or self.replicas_read.done():
            self.replicas_read = asyncio.ensure_future(asyncio.to_thread(self.live_replicas))
            self.replicas_read.add_done_callback(lambda read: read.cancelled() or read.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(self.replicas_read), timeout_s)
        except Exception as err:  # late, or the controller refused: the caller goes on without it
            log.warning("could not read the replicas per tier from Serve's controller: %r", err)
            return None
