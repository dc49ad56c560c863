"""The ingress, which is the mobile tier: it runs on the mobile nodes, validates and tokenizes,
runs embeddings + layers 1..m and the mobile exit in-process, applies the DIMEE policy per sample,
and has the samples it sends past mobile answered by edge and cloud (deployments/dispatch.py). An
EASY sample is answered without a single tier hop, as on the device in the paper. What it answered
early is shadow-checked afterwards (deployments/shadow.py) for the live bound
(deployments/live_risk.py). Live settings (policy, thresholds, cost model, timeouts) come from
Serve's `user_config` (deployments/settings.py) and change without a restart.
"""

import asyncio
import logging
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.dispatch import Dispatcher, RequestContext, TierBusy
from deployments.http import check_api_key, read_classify, validation_detail
from deployments.live_risk import LiveGuard
from deployments.metrics import RouterMetrics
from deployments.profile import measure_tiers
from deployments.schemas import AppArgs, ClassifyRequest, ClassifyResponse, RouterConfig, TierReply, TierRequest
from deployments.settings import Settings, build_settings
from deployments.shadow import ShadowAuditor
from deployments.tier import fetched_runner, threads_from_cpu_share
from dimee_models import artifact
from dimee_models.manifest import public_model_name
from dimee_models.tiers import Tier

log = logging.getLogger("ray.serve")
api = FastAPI(title="DIMEE-Serve", description="Early-exit text classification across mobile, edge and cloud tiers")


@api.exception_handler(RequestValidationError)
async def one_sentence_422(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Every error body is {"detail": "<one sentence>"}, FastAPI's own 422s included."""
    return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)


class TextBudget:
    """The texts this replica admits at once: the configured budget while answers come within a
    third of the request deadline; less, down to FLOOR, while they do not, since past the tiers'
    pace more texts in flight only wait longer, until the deadline answers them degraded. Additive
    increase and multiplicative decrease, as TCP's congestion window."""

    FLOOR, SLOW, CUT = 8, 1 / 3, 0.9  # texts; the share of the request deadline; the cut per slow answer

    def __init__(self):
        self.now: float | None = None  # None: the configured budget

    def limit(self, configured: int) -> float:
        return configured if self.now is None else min(self.now, configured)

    def answered(self, texts: int, seconds: float, s: Settings) -> None:
        limit = self.limit(s.max_texts_in_flight)
        if seconds > self.SLOW * s.request_timeout_s:
            self.now = max(min(self.FLOOR, s.max_texts_in_flight), limit * self.CUT)
        elif self.now is not None:  # a text more per budget's worth of texts answered in time
            self.now = limit + texts / limit
            if self.now >= s.max_texts_in_flight:
                self.now = None


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(self, edge: DeploymentHandle, cloud: DeploymentHandle, monitor: DeploymentHandle, args: AppArgs):
        self.args = args
        threads_from_cpu_share()
        self.mobile = fetched_runner(args.artifact, Tier.MOBILE, args.mobile.runtime)  # with the tokenizer and policies
        self.mobile_batch.set_max_batch_size(args.mobile.max_batch_size)
        self.mobile_batch.set_batch_wait_timeout_s(args.mobile.batch_wait_timeout_s)
        self.api_key = args.api_key.get_secret_value() if args.api_key else None
        self.directory = Path(self.mobile.artifact_dir)
        self.manifest = artifact.read_manifest(self.directory, verify=False)
        self.tokenizer = artifact.load_tokenizer(self.directory)
        self.model_name = public_model_name(self.manifest.backbone, self.manifest.dataset.name)
        self.config_error: str | None = None
        self.settings = build_settings(RouterConfig(), args, self.manifest, self.directory)
        self.metrics = RouterMetrics()
        self.texts_in_flight = 0
        self.budget = TextBudget()
        self.background_tasks: set[asyncio.Task] = set()
        self.tiers = Dispatcher(edge, cloud, args, self.mobile, self.mobile_batch, self.manifest.labels,
                                self.metrics, self.background)
        self.guard = LiveGuard(monitor, self.background)
        self.shadow = ShadowAuditor(self.tiers, self.guard, self.metrics, self.background)

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
        return await measure_tiers(self.mobile, self.tiers.handle, rows)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def mobile_batch(self, requests: list[TierRequest]) -> list[TierReply]:
        """The mobile slice, in this process; requests arriving together share one forward pass."""
        return await self.mobile.forward(requests)

    def background(self, work) -> None:
        """Run `work` after the answer has gone out; a reference is kept until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self.background_tasks.add(task)
        task.add_done_callback(self.background_tasks.discard)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """200 while this ingress answers; `degraded` names the tiers with no live replica, whose
        samples are answered by fallback (edge) or from an earlier exit (cloud) meanwhile, says when
        Serve's controller does not answer (the head is away), and shows the live bound when it is
        not `ok` (drift: tightened or alarm)."""
        replicas = await self.tiers.replica_counts()
        down = [t.label for t, n in sorted(replicas.items()) if n == 0] if replicas is not None else []
        live = await self.guard.read(self.settings.watch)
        return {"status": "degraded" if down or replicas is None or live["state"] != "ok" else "ok",
                "no_live_replica": down, **({"serve_controller": "unreachable"} if replicas is None else {}),
                **({"live_risk": live} if live["state"] != "ok" else {})}

    @api.get("/v1/info")
    async def info(self, request: Request) -> dict:
        check_api_key(self.api_key, request.headers)
        replicas = await self.tiers.replica_counts()
        s = self.settings
        policy, _ = self.guard.routing_policy(s.policy, s.watch)
        return {
            "model": self.model_name, "labels": self.manifest.labels,
            "exit_layers": {tier.label: layer for tier, layer in self.manifest.tier_exits.items()},
            "boundaries": s.boundaries,
            "policy": {"name": policy.name, "kind": policy.kind, "thresholds": policy.thresholds,
                       "risk": policy.risk.to_json() if policy.risk else None},
            "cost_model": s.cost.model_dump(),
            "wire": s.wire.model_dump(),
            "hop_timeout_s": s.hop_timeout_s,
            "request_timeout_s": s.request_timeout_s,
            "max_texts_in_flight": s.max_texts_in_flight,
            "shadow_rate": s.shadow_rate,
            "live_risk": await self.guard.read(s.watch),
            "texts_in_flight": self.texts_in_flight,
            "texts_admitted_now": round(self.budget.limit(s.max_texts_in_flight), 1),
            "config_error": self.config_error,
            "replicas": None if replicas is None else {t.label: n for t, n in replicas.items()},  # None: the head is away
            "no_live_replica": [t.label for t, n in sorted((replicas or {}).items()) if n == 0],
            **self.metrics.since_start(),  # this replica's counts since it started
        }

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
        n, limit = len(body.texts), self.budget.limit(s.max_texts_in_flight)
        if self.texts_in_flight and self.texts_in_flight + n > limit:
            raise self.refuse("ingress", f"the service is at capacity ({self.texts_in_flight} texts in progress, "
                                         f"the limit is {limit:.0f} now): retry later")
        self.texts_in_flight += n
        began = time.monotonic()
        try:
            self.metrics.request(body.mode)
            self.guard.refresh(s.watch)
            policy, at = self.guard.routing_policy(s.policy, s.watch)
            ctx = RequestContext(policy.plan(body.mode), s, deadline)
            answers, hidden = await self.tiers.run(tokens, ctx)
            if ctx.plan.decides:
                self.shadow.audit(answers, hidden, s, at, body.texts, body.text_pairs, self.texts_in_flight)
        except TierBusy as busy:
            raise self.refuse(busy.tier.label, str(busy)) from None
        finally:
            self.texts_in_flight -= n
        self.budget.answered(n, time.monotonic() - began, s)
        for answer, was_cut in zip(answers, cut):
            answer.truncated = was_cut
        self.metrics.answered(body.mode, answers, s.cost.unit)
        return ClassifyResponse(predictions=answers, model=self.model_name)

    def refuse(self, where: str, detail: str) -> HTTPException:
        """503 with Retry-After for a request the cluster has no room for now, counted by where."""
        self.metrics.shed(where)
        return HTTPException(503, detail, headers={"Retry-After": str(self.args.retry_after_s)})
