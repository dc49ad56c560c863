"""The ingress: validates and tokenizes, runs mobile, applies the DIMEE policy per sample, sends
MEDIUM samples to edge and HARD samples to cloud, and puts the answers back in input order.

The router only sees small things (probabilities, the mobile embedding z, decisions); the
layer-m hidden state goes from the mobile replica to edge/cloud through the object store.
"""

import asyncio
import logging

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.http import check_api_key, parse_classify, truncated, validation_detail
from deployments.schemas import AppArgs, ClassifyRequest, ClassifyResponse, Prediction, TierReply, TierRequest
from dimee_models import artifact
from dimee_models.cost import CostModel
from dimee_models.policy import CLOUD, EDGE, MOBILE, TIERS, load_policies

log = logging.getLogger("ray.serve")
api = FastAPI(title="DIMEE-Serve", description="Early-exit text classification across mobile, edge and cloud tiers")


@api.exception_handler(RequestValidationError)
async def one_sentence_422(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Every error body is {"detail": "<one sentence>"}, FastAPI's own 422s included."""
    return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(self, mobile: DeploymentHandle, edge: DeploymentHandle, cloud: DeploymentHandle, args: AppArgs):
        self.mobile, self.edge, self.cloud = mobile, edge, cloud
        self.args = args
        self.api_key = args.api_key.get_secret_value() if args.api_key else None
        self.manifest = artifact.read_manifest(args.artifact)
        self.tokenizer = artifact.load_tokenizer(args.artifact)
        policies, doc = load_policies(args.artifact)
        name = args.policy or doc["default"]
        if name not in policies:
            raise ValueError(f"policy {name!r} is not in the artifact; it has {sorted(policies)}")
        self.policy = policies[name]
        self.cost = CostModel(**doc["cost_model"])
        m, e, n = self.manifest["exits"]["mobile"], self.manifest["exits"]["edge"], self.manifest["num_layers"]
        self.path_cost = self.cost.path_costs(m, e, n)
        self.exit_layers = {"mobile": m, "edge": e, "cloud": n}
        self.labels = self.manifest["labels"] or ["value"]
        self.model_name = f"{self.manifest['backbone']}@{self.manifest['dataset']['name']}"

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/info")
    def info(self, request: Request) -> dict:
        check_api_key(self.api_key, request.headers)
        status = serve.status().applications
        replicas = {
            d.removesuffix("Tier").lower(): sum(v for v in state.replica_states.values())
            for app in status.values() for d, state in app.deployments.items() if d.endswith("Tier")
        }
        return {
            "model": self.model_name,
            "labels": self.labels,
            "exit_layers": self.exit_layers,
            "policy": {"name": self.policy.name, "kind": self.policy.kind, "thresholds": self.policy.thresholds},
            "cost_model": self.cost.model_dump(),
            "replicas": replicas,
        }

    # The body is parsed by hand (deployments/http.py) for one-sentence errors; the schema is declared
    # here so that /docs still shows it.
    @api.post("/v1/classify", response_model=ClassifyResponse, openapi_extra={"requestBody": {
        "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}}, "required": True}})
    async def classify(self, request: Request) -> ClassifyResponse:
        check_api_key(self.api_key, request.headers)
        body = parse_classify(await request.body(), request.headers.get("content-type"), self.args.max_body_bytes)
        if len(body.texts) > self.args.max_texts:
            raise HTTPException(422, f"too many texts: {len(body.texts)} > the limit of {self.args.max_texts}")
        if body.text_pairs is not None and not self.manifest["text_pair"]:
            raise HTTPException(422, "text_pairs was sent but this model classifies single texts")
        if body.text_pairs is None and self.manifest["text_pair"]:
            raise HTTPException(422, "this model classifies sentence pairs: send text_pairs, one per text")
        max_length = self.manifest["max_length"]
        enc = self.tokenizer(body.texts, body.text_pairs, truncation=True, max_length=max_length)
        tokens = TierRequest(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
        cut = truncated(self.tokenizer, body.texts, body.text_pairs, enc["input_ids"], max_length)
        answers = await self.run_policy(body.policy, tokens, len(body.texts))
        for answer, was_cut in zip(answers, cut):
            answer.truncated = was_cut
        return ClassifyResponse(predictions=answers, model=self.model_name)

    async def run_policy(self, policy: str, tokens: TierRequest, n: int) -> list[Prediction]:
        if policy == "cloud_only":
            return self.answer(await self.cloud.remote(tokens), "cloud", "cloud_only")
        tokens.keep_hidden = policy != "mobile_only"
        mobile: TierReply = await self.mobile.remote(tokens)
        if policy == "mobile_only":
            tiers = np.full(n, MOBILE)
        elif policy == "edge_only":
            tiers = np.full(n, EDGE)
        else:
            tiers = self.policy.route(mobile.z, mobile.probs)
        answers: list[Prediction | None] = self.answer(mobile, "mobile", "mobile")
        calls = {}
        for tier, handle in ((EDGE, self.edge), (CLOUD, self.cloud)):
            rows = np.flatnonzero(tiers == tier).tolist()
            if rows:
                calls[tier] = (rows, handle.remote(TierRequest(hidden=mobile.hidden, rows=rows)))
        replies = await asyncio.gather(*(call for _, call in calls.values()))
        for (tier, (rows, _)), reply in zip(calls.items(), replies):
            for row, prediction in zip(rows, self.answer(reply, TIERS[tier], TIERS[tier])):
                answers[row] = prediction
        return answers

    def answer(self, reply: TierReply, tier: str, path: str) -> list[Prediction]:
        cost = self.path_cost[path]
        predictions = []
        for probs in reply.probs:
            label_id = int(probs.argmax())
            predictions.append(Prediction(
                label=self.labels[label_id], label_id=label_id, confidence=float(probs.max()),
                tier=tier, exit_layer=reply.exit_layer, cost=round(cost, 6),
            ))
        return predictions
