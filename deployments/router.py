"""The ingress, which is the mobile tier: it runs on the mobile nodes, validates and tokenizes,
runs embeddings + layers 1..m and the mobile exit in-process, applies the DIMEE policy per sample,
sends MEDIUM samples to edge and HARD samples to cloud, and puts the answers back in input order.
An EASY sample is answered without a single tier hop, as on the device in the paper. With an
escalating policy, the samples edge is unsure of go on to cloud.

Hidden states leave this process only as references into Ray's object store (mobile to edge or
cloud; edge to cloud on escalation): the tier that needs one fetches it from the process that
computed it.

A share of the samples answered early is checked afterwards against the final exit (shadow checks,
deployments/live_risk.py): the live bound on the served risk, and the step back to a safer setting
when it shows drift.

Every tier call has a timeout, and a request one deadline for all its calls. A failed or late
edge sends its samples to cloud (`fallback`); a failed or late cloud leaves them with the deepest
exit already computed (`degraded`). A *busy* tier is not a failed one: when its bounded queue is
full, Serve refuses the call at once and the whole request gets 503 with Retry-After, so that
clients back off instead of getting degraded answers. Live settings (policy, thresholds, cost
model, timeouts) come from Serve's `user_config` and change without a restart.
"""

import asyncio
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.http import check_api_key, read_classify, validation_detail
from deployments.live_risk import LiveRisk
from deployments.metrics import RouterMetrics
from deployments.schemas import (AppArgs, ClassifyRequest, ClassifyResponse, HiddenArrays, HiddenRef, Prediction,
                                 RouterConfig, TierReply, TierRequest, Tokens)
from deployments import weights
from deployments.tier import TierRunner, fetched_runner, threads_from_cpu_share
from dimee_models import artifact
from dimee_models.cost import CostModel
from dimee_models.manifest import Manifest, public_model_name
from dimee_models.policy import CentroidPolicy, Mode, Plan, Policy, load_policies
from dimee_models.risk import DEFAULT_DELTA
from dimee_models.tiers import Tier

log = logging.getLogger("ray.serve")
api = FastAPI(title="DIMEE-Serve", description="Early-exit text classification across mobile, edge and cloud tiers")


@api.exception_handler(RequestValidationError)
async def one_sentence_422(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Every error body is {"detail": "<one sentence>"}, FastAPI's own 422s included."""
    return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)


TIER_WEIGHTS = ("mobile.safetensors", "edge.safetensors", "cloud.safetensors")
# Shadow checks never compete with requests: at most one in flight per replica, none while the
# texts in flight are past this share of the text budget (both dropped and counted).
SHADOW_CALLS, SHADOW_ROOM = 1, 0.75


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a request routes with; replaced as a whole by `reconfigure`, read once per request."""

    policy: Policy
    cost: CostModel
    path_cost: dict[str, float]
    hop_timeout_s: float
    request_timeout_s: float
    max_texts_in_flight: int
    boundaries: dict  # where the served artifact's model is cut and why, for /v1/info
    shadow_rate: float
    shadow_log: str | None
    watch: dict  # what the live bound watches (deployments/live_risk.py): the policy, its path, budget, delta


def build_settings(config: RouterConfig, args: AppArgs, manifest: Manifest, directory: Path) -> Settings:
    """Settings from a validated config, checked against the served artifact (its files fetched to
    `directory`); ValueError says what is wrong."""
    source = config.policy_artifact or args.artifact
    if config.policy_artifact:
        directory, _ = weights.fetch(config.policy_artifact, "policy")  # each file checked against its manifest
        other = artifact.read_manifest(directory, verify=False)
        if any(other.files.get(f) != manifest.files[f] for f in TIER_WEIGHTS):
            raise ValueError(f"policy_artifact {source} holds other weights than the served artifact: "
                             "only a recalibrated copy of the same model can be switched to live")
    policies, doc = load_policies(directory)
    name = config.policy or args.policy or doc["default"]
    if name not in policies:
        raise ValueError(f"policy {name!r} is not in {source}; it has {sorted(policies)}")
    policy = policies[name]
    if config.thresholds is not None:
        if isinstance(policy, CentroidPolicy):
            raise ValueError(f"policy {name!r} routes by nearest centroid and has no thresholds to set")
        if set(config.thresholds) != set(policy.thresholds):
            raise ValueError(f"thresholds must set exactly {sorted(policy.thresholds)}, got {sorted(config.thresholds)}")
        # the stored guarantee was for the calibrated thresholds, not these
        policy = dataclasses.replace(policy, thresholds=dict(config.thresholds), risk=None)
    cost = config.cost_model or CostModel(**doc["cost_model"])
    risk = policy.risk
    watch = {"artifact": str(source), "policy": name, "thresholds": policy.thresholds,
             "path_index": policy.path_index(), "on_drift": config.on_drift,
             "budget_pp": risk.budget_pp if risk else doc["max_accuracy_drop_pp"],
             "delta": risk.delta if risk else doc.get("delta") or DEFAULT_DELTA}
    return Settings(policy, cost, cost.path_costs(manifest.exits.mobile, manifest.exits.edge, manifest.num_layers),
                    config.hop_timeout_s, config.request_timeout_s, config.max_texts_in_flight,
                    boundaries_info(doc, manifest.num_layers), config.shadow_rate, config.shadow_log, watch)


def boundaries_info(doc: dict, num_layers: int) -> dict:
    """/v1/info's account of where the model is cut: at training, or by calibration (the kind that
    chose the pair, its expected cost per sample on the choice rows against cloud-only's)."""
    chosen = doc.get("boundaries")
    if chosen is None:
        return {"chosen_by": "training"}
    cost = CostModel(**doc["cost_model"])
    # artifacts tuned before the rename call a candidate's policy "variant"
    [best] = [c for c in chosen["candidates"] if (c.get("policy", c.get("variant")), c["mobile"], c["edge"])
              == (chosen["chosen_by"], chosen["mobile"], chosen["edge"])]
    return {"chosen_by": "calibration", "policy": chosen["chosen_by"], "candidates": len(chosen["candidates"]),
            "chosen_on": chosen.get("chosen_on", "calibration"), "unit": cost.unit, "expected_cost": best["cost"],
            "cloud_only_cost": cost.path_costs(chosen["mobile"], chosen["edge"], num_layers)["cloud_only"]}


async def measure_tiers(mobile: TierRunner, handle, rows: list[list[int]]) -> dict[str, float]:
    """Run by the ingress: `rows` (token ids) as one request through every tier call it can make, each
    by the handle `handle(tier, request)` serving picks; the mobile, edge and cloud compute and each
    hop's overhead, in ms, and hidden-state bytes per token."""

    async def call(tier: Tier, request: TierRequest):
        began = time.perf_counter()
        reply = await asyncio.wait_for(handle(tier, request).remote(request), 60)
        return (time.perf_counter() - began) * 1000, reply.compute_ms, reply

    async def from_store(tier: Tier, hidden: HiddenArrays, **keep):
        """A hop as the router makes it: the hidden state stored, then the tier called at once."""
        began = time.perf_counter()
        stored = mobile.store(hidden)
        store_ms = (time.perf_counter() - began) * 1000
        round_trip, compute_ms, reply = await call(tier, TierRequest(stored, **keep))
        return store_ms + round_trip - compute_ms, compute_ms, reply, stored

    began = time.perf_counter()
    await asyncio.wait_for(handle(Tier.EDGE, TierRequest(Tokens(rows))).describe.remote(), 60)
    noop = (time.perf_counter() - began) * 1000
    [local] = await mobile.forward([TierRequest(Tokens(rows), keep_hidden=True)])
    ingress_edge, edge_ms, _, stored = await from_store(Tier.EDGE, local.hidden)
    keeping, _, kept, _ = await from_store(Tier.EDGE, local.hidden, keep_hidden=True, keep_below=1.01)
    escalate_rt, escalate_ms, _ = await call(Tier.CLOUD, TierRequest(kept.hidden))  # at once, as on escalation
    ingress_cloud, _, _, _ = await from_store(Tier.CLOUD, local.hidden)
    tokens_rt, cloud_ms, _ = await call(Tier.CLOUD, TierRequest(Tokens(rows)))
    return {
        "noop": noop, "mobile_ms": local.compute_ms, "edge_ms": edge_ms, "cloud_ms": cloud_ms,
        "ingress_edge": ingress_edge, "ingress_cloud": ingress_cloud, "ingress_cloud_tokens": tokens_rt - cloud_ms,
        # edge storing its hidden state for cloud, then cloud fetching it
        "edge_cloud": keeping - ingress_edge + escalate_rt - escalate_ms,
        "hidden_bytes_per_token": stored.nbytes / sum(len(row) for row in rows),
    }


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(self, edge: DeploymentHandle, cloud: DeploymentHandle, monitor: DeploymentHandle, args: AppArgs):
        # Set here, not by the environment of whichever process built the app (a handle carries that).
        self.handles = {t: h.options(_by_reference=args.transport == "actor") for t, h in ((Tier.EDGE, edge),
                                                                                          (Tier.CLOUD, cloud))}
        # A call whose request or reply may carry an ObjectRef (a hidden state in the object store)
        # goes by Ray actor call: Serve's gRPC transport pickles it outside Ray's serializer, and Ray
        # then pins the object for the life of the process (out-of-band serialization: a leak, RESULTS §7).
        self.ref_handles = {t: h.options(_by_reference=True) for t, h in ((Tier.EDGE, edge), (Tier.CLOUD, cloud))}
        self.args = args
        threads_from_cpu_share()
        self.mobile = fetched_runner(args.artifact, Tier.MOBILE)  # with the tokenizer and the policies
        self.mobile_batch.set_max_batch_size(args.mobile.max_batch_size)
        self.mobile_batch.set_batch_wait_timeout_s(args.mobile.batch_wait_timeout_s)
        self.api_key = args.api_key.get_secret_value() if args.api_key else None
        self.directory = Path(self.mobile.artifact_dir)
        self.manifest = artifact.read_manifest(self.directory, verify=False)
        self.tokenizer = artifact.load_tokenizer(self.directory)
        self.exit_layers = {tier.label: layer for tier, layer in self.manifest.tier_exits.items()}
        self.labels = self.manifest.labels
        self.model_name = public_model_name(self.manifest.backbone, self.manifest.dataset.name)
        self.config_error: str | None = None
        self.settings = build_settings(RouterConfig(), args, self.manifest, self.directory)
        self.metrics = RouterMetrics()
        self.texts_in_flight = 0
        # Tiers Serve's controller reports with no running replica (a lost node, a replica being
        # replaced) are not called: a call there waits out its timeout; refreshed in the background.
        self.no_replica: set[Tier] = set()
        self.no_replica_checked = 0.0
        self.replicas_read: asyncio.Future | None = None  # the one read of Serve's controller in flight
        self.monitor = monitor
        self.live: dict = {"state": "ok", "samples": 0, "disagreements": 0, "path_index": None}
        self.live_checked = 0.0
        self.stepped: tuple[Policy, int, Policy] | None = None  # (calibrated policy, path index, the policy there)
        self.shadow_in_flight = 0
        self.background_tasks: set[asyncio.Task] = set()
        self.rng = np.random.default_rng()

    def reconfigure(self, config: dict) -> None:
        """Serve's `user_config`. A bad one is refused, logged and shown in /v1/info while the previous
        settings keep serving: raising here would make Serve restart the replica."""
        try:
            self.settings = build_settings(RouterConfig.model_validate(config or {}), self.args, self.manifest,
                                           self.directory)
            self.config_error = None
        except (ValueError, OSError) as err:
            self.config_error = f"user_config refused, the previous settings stay: {err}"
            log.error(self.config_error)

    def check_health(self) -> None:
        """Serve's periodic health check: the mobile slice's weights are loaded and run."""
        self.mobile.check_health()

    def describe(self) -> dict:
        return {**self.mobile.describe(), "max_batch_size": self.args.mobile.max_batch_size}

    async def profile(self, rows: list[list[int]]) -> dict[str, float]:
        """`dimee profile`'s measurement of the tier calls, made here where a request's hops start
        (a Serve handle call, not an HTTP route)."""
        return await measure_tiers(self.mobile, self.handle, rows)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def mobile_batch(self, requests: list[TierRequest]) -> list[TierReply]:
        """The mobile slice, in this process; requests arriving together share one forward pass."""
        return await self.mobile.forward(requests)

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

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """200 while this ingress answers; `degraded` names the tiers with no live replica, whose
        samples are answered by fallback (edge) or from an earlier exit (cloud) meanwhile, says when
        Serve's controller does not answer (the head is away), and shows the live bound when it is
        not `ok` (drift: tightened or alarm)."""
        replicas = await self.replica_counts()
        down = [t.label for t, n in sorted(replicas.items()) if n == 0] if replicas is not None else []
        live = await self.live_risk()
        return {"status": "degraded" if down or replicas is None or live["state"] != "ok" else "ok",
                "no_live_replica": down, **({"serve_controller": "unreachable"} if replicas is None else {}),
                **({"live_risk": live} if live["state"] != "ok" else {})}

    @api.get("/v1/info")
    async def info(self, request: Request) -> dict:
        check_api_key(self.api_key, request.headers)
        replicas = await self.replica_counts()
        s = self.settings
        policy, _ = self.routing_policy(s)
        return {
            "model": self.model_name,
            "labels": self.labels,
            "exit_layers": self.exit_layers,
            "boundaries": s.boundaries,
            "policy": {"name": policy.name, "kind": policy.kind, "thresholds": policy.thresholds,
                       "risk": policy.risk.to_json() if policy.risk else None},
            "cost_model": s.cost.model_dump(),
            "hop_timeout_s": s.hop_timeout_s,
            "request_timeout_s": s.request_timeout_s,
            "max_texts_in_flight": s.max_texts_in_flight,
            "shadow_rate": s.shadow_rate,
            "live_risk": await self.live_risk(),
            "texts_in_flight": self.texts_in_flight,
            "config_error": self.config_error,
            "replicas": None if replicas is None else {t.label: n for t, n in replicas.items()},  # None: the head is away
            "no_live_replica": [t.label for t, n in sorted((replicas or {}).items()) if n == 0],
            **self.metrics.since_start(),  # this replica's counts since it started
        }

    async def live_risk(self) -> dict:
        """The live bound as the monitor has it now (this replica's last copy if it cannot be reached)."""
        try:
            self.live = await asyncio.wait_for(self.monitor.state.remote(), 10)
        except Exception as err:
            log.warning("could not read the live bound from the monitor: %r", err)
        watch = self.settings.watch
        live = self.live if self.live.get("watch") == watch else LiveRisk.fresh(watch)
        return {k: v for k, v in live.items() if k != "watch"}

    # The body is parsed by hand (deployments/http.py) for one-sentence errors; the schema is declared
    # here so that /docs still shows it.
    @api.post("/v1/classify", response_model=ClassifyResponse, openapi_extra={"requestBody": {
        "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}}, "required": True}})
    async def classify(self, request: Request) -> ClassifyResponse:
        check_api_key(self.api_key, request.headers)
        body, tokens, cut = await read_classify(request, self.tokenizer, max_body_bytes=self.args.max_body_bytes,
                                                max_texts=self.args.max_texts, max_length=self.manifest.max_length,
                                                text_pair=self.manifest.text_pair)
        s = self.settings
        deadline = time.monotonic() + s.request_timeout_s
        # Admission by texts, the unit the tiers' work grows with (Serve's bounded queues count
        # requests): past the budget, refuse now rather than answer late or degraded.
        n = len(body.texts)
        if self.texts_in_flight and self.texts_in_flight + n > s.max_texts_in_flight:
            raise self.refuse("ingress", f"the service is at capacity ({self.texts_in_flight} texts in progress, "
                                         f"the limit is {s.max_texts_in_flight}): retry later")
        self.texts_in_flight += n
        try:
            answers = await self.classify_admitted(body.mode, tokens, cut, s, deadline, body.texts, body.text_pairs)
        finally:
            self.texts_in_flight -= n
        return ClassifyResponse(predictions=answers, model=self.model_name)

    async def classify_admitted(self, mode: Mode, tokens: Tokens, cut: list[bool], s: Settings, deadline: float,
                                texts: list[str], pairs: list[str] | None) -> list[Prediction]:
        self.metrics.request(mode)
        self.refresh_live()
        policy, at = self.routing_policy(s)
        plan = policy.plan(mode)
        answers, hidden = await self.run_mode(plan, tokens, s, deadline)
        if plan.decides:
            self.audit(answers, hidden, s, at, texts, pairs)
        for answer, was_cut in zip(answers, cut):
            answer.truncated = was_cut
        self.metrics.answered(mode, answers, s.cost.unit)
        return answers

    def handle(self, tier: Tier, request: TierRequest) -> DeploymentHandle:
        by_ref = isinstance(request.input, HiddenRef) or request.keep_hidden  # a kept state may come back by ref
        return (self.ref_handles if by_ref else self.handles)[tier]

    def refuse(self, where: str, detail: str) -> HTTPException:
        """503 with Retry-After for a request the cluster has no room for now, counted by where."""
        self.metrics.shed(where)
        return HTTPException(503, detail, headers={"Retry-After": str(self.args.retry_after_s)})

    async def call(self, tier: Tier, request: TierRequest, s: Settings, deadline: float) -> TierReply | None:
        """One tier call within the hop timeout and what is left of the request's deadline; None if it
        failed or was late (the caller falls back, so a fallback never starts a fresh wait). A tier
        whose queue is full raises 503 for the whole request."""
        self.refresh_no_replica()
        timeout_s = min(s.hop_timeout_s, deadline - time.monotonic())
        reason = "unavailable" if tier in self.no_replica else "deadline"
        if timeout_s > 0 and reason != "unavailable":
            began = time.perf_counter()
            try:
                return await asyncio.wait_for(self.handle(tier, request).remote(request), timeout_s)
            except BackPressureError:
                raise self.refuse(tier.label, f"the {tier.label} tier is at capacity (its queue is full): "
                                              "retry later") from None
            except asyncio.TimeoutError:
                reason = "timeout"
            except Exception as err:  # a dead replica, a deployment being replaced, an error in the tier: all fall back
                reason = "error"
                log.warning("%s tier call failed after %.0f ms: %r", tier.label,
                            (time.perf_counter() - began) * 1000, err)
        self.metrics.hop_failed(tier, reason)
        return None

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

    async def run_mode(self, plan: Plan, tokens: Tokens, s: Settings,
                       deadline: float) -> tuple[list[Prediction], HiddenArrays | None]:
        """The answers, and the mobile hidden state if the mobile slice ran (for shadow checks)."""
        if plan.skips_mobile:
            if plan.decides:
                self.metrics.decided(np.full(len(tokens.input_ids), Tier.CLOUD))
            cloud = await self.call(Tier.CLOUD, TierRequest(tokens), s, deadline)
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
        calls = [asyncio.ensure_future(self.offload(tier, rows, mobile, on_mobile, plan, s, deadline))
                 for tier, rows in offloaded if rows]
        try:
            results = await asyncio.gather(*calls)
        except HTTPException:  # a busy tier: the request gets 503, so the other tier's call is not needed
            for c in calls:
                c.cancel()
            raise
        for rows, predictions in results:
            for row, prediction in zip(rows, predictions):
                answers[row] = prediction
        return answers, mobile.hidden

    def routing_policy(self, s: Settings) -> tuple[Policy, int | None]:
        """The policy to route with and its index on the risk path: the calibrated one, or the
        setting the live bound stepped to (deployments/live_risk.py) while it watches these settings."""
        at = self.live.get("path_index")
        if self.live.get("watch") != s.watch or at is None or at == s.watch["path_index"]:
            return s.policy, s.watch["path_index"]
        if self.stepped is None or self.stepped[0] is not s.policy or self.stepped[1] != at:
            self.stepped = (s.policy, at, s.policy.at_path(at))
        return self.stepped[2], at

    def refresh_live(self, every_s: float = 1.0) -> None:
        """Start a background read of the live bound (and the setting to serve), at most every `every_s`."""
        if time.monotonic() - self.live_checked < every_s:
            return
        self.live_checked = time.monotonic()
        self.background(self.live_risk())

    def background(self, work) -> None:
        """Run `work` after the answer has gone out; a reference is kept until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self.background_tasks.add(task)
        task.add_done_callback(self.background_tasks.discard)

    def audit(self, answers: list[Prediction], hidden: HiddenArrays | None, s: Settings, at: int | None,
              texts: list[str], pairs: list[str] | None) -> None:
        """Shadow checks of a random `shadow_rate` share of one request's routed samples (degraded
        answers aside: they are no policy's). Whether a request's audit is dropped for room is decided
        before anything about its samples is looked at, so that dropping cannot bias the bound."""
        rows = [int(r) for r in np.flatnonzero(self.rng.random(len(answers)) < s.shadow_rate)
                if not answers[r].degraded]
        if not rows:
            return
        if self.shadow_in_flight >= SHADOW_CALLS or self.texts_in_flight > SHADOW_ROOM * s.max_texts_in_flight:
            self.metrics.shadow("dropped", len(rows))
            return
        self.shadow_in_flight += 1
        self.background(self.shadow(rows, answers, hidden, s, at, texts, pairs))

    async def shadow(self, rows: list[int], answers: list[Prediction], hidden: HiddenArrays | None, s: Settings,
                     at: int | None, texts: list[str], pairs: list[str] | None) -> None:
        """The final exit on the audited rows answered early, from the mobile hidden state (cloud runs
        the layers after mobile's), compared with what was answered; the counts go to the monitor."""
        early = [r for r in rows if answers[r].tier != Tier.CLOUD.label]
        try:
            final = {r: answers[r].label_id for r in rows}  # cloud's answers are the final exit's
            if early:
                request = TierRequest(self.mobile.store(hidden, early))
                reply = await asyncio.wait_for(self.handle(Tier.CLOUD, request).remote(request), s.hop_timeout_s)
                final.update(zip(early, (int(f) for f in reply.probs.argmax(-1))))
            disagreements = sum(final[r] != answers[r].label_id for r in early)
            self.live = await asyncio.wait_for(self.monitor.record.remote(s.watch, at, len(rows), disagreements), 10)
            self.metrics.shadow("disagreed", disagreements)
            self.metrics.shadow("agreed", len(early) - disagreements)
            self.metrics.shadow("answered_on_cloud", len(rows) - len(early))
        except Exception as err:  # cloud's queue full or late, a failed replica, the monitor away: dropped
            self.metrics.shadow("dropped", len(rows))
            log.info("shadow check of %d samples dropped: %r", len(rows), err)
            return
        finally:
            self.shadow_in_flight -= 1
        if s.shadow_log:
            try:
                await self.log_shadow(s.shadow_log, rows, answers, final, texts, pairs)
            except Exception as err:  # the bound has the check; only the log lacks it
                log.warning("could not append to the shadow log %s: %r", s.shadow_log, err)

    async def log_shadow(self, directory: str, rows: list[int], answers: list[Prediction], final: dict[int, int],
                         texts: list[str], pairs: list[str] | None) -> None:
        """The audited texts, a random sample of the traffic, for `dimee calibrate --from-traffic`: one
        JSON line each in this replica's file of the shadow log directory, on the head's disk."""
        lines = [json.dumps({"text": texts[r], **({"text_pair": pairs[r]} if pairs else {}),
                             "answer": answers[r].label_id, "final": final[r], "tier": answers[r].tier,
                             "time": time.time()}) for r in rows]
        path = Path(directory) / f"shadow-{serve.get_replica_context().replica_id.unique_id}.jsonl"
        await weights.store().append.remote(str(path), "".join(line + "\n" for line in lines))

    async def offload(self, tier: Tier, rows: list[int], mobile: TierReply, on_mobile: list[Prediction],
                      plan: Plan, s: Settings, deadline: float) -> tuple[list[int], list[Prediction]]:
        """Rows the policy sent past mobile: edge (else cloud, as fallback) or cloud; if neither
        answers, the mobile exit's predictions, marked degraded. Only these rows' hidden state goes
        into the object store, for whichever tier reads it."""
        stored = self.mobile.store(mobile.hidden, rows)
        if tier is Tier.EDGE:
            # edge keeps the hidden state of the rows cloud will need, if the plan escalates
            request = TierRequest(stored, keep_hidden=plan.escalate_below is not None, keep_below=plan.escalate_below)
            reply = await self.call(Tier.EDGE, request, s, deadline)
            if reply is not None:
                answers = self.answer(reply, Tier.EDGE, s.path_cost["edge"])
                return rows, await self.escalate(reply, answers, plan, s, deadline)
        reply = await self.call(Tier.CLOUD, TierRequest(stored), s, deadline)
        if reply is not None:
            return rows, self.answer(reply, Tier.CLOUD, s.path_cost["cloud"], fallback=tier is Tier.EDGE)
        return rows, [on_mobile[row].model_copy(update={"degraded": True}) for row in rows]

    async def escalate(self, edge: TierReply, answers: list[Prediction], plan: Plan, s: Settings,
                       deadline: float) -> list[Prediction]:
        """Edge's answers, with those it is too unsure of replaced by cloud's, computed from the
        hidden state edge kept of exactly those rows; if cloud fails, edge's answers stay, marked
        degraded."""
        unsure = np.flatnonzero(plan.escalated(edge.probs)).tolist()
        if not unsure:
            return answers
        reply = await self.call(Tier.CLOUD, TierRequest(edge.hidden), s, deadline)
        cloud = (self.answer(reply, Tier.CLOUD, s.path_cost["edge_cloud"], escalated=True) if reply is not None
                 else [answers[row].model_copy(update={"degraded": True}) for row in unsure])
        for row, prediction in zip(unsure, cloud):
            answers[row] = prediction
        return answers

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
