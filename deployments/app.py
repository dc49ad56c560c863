"""`build_app(args)`: the one way the application is built, by `serve run`, Serve config files,
`dimee serve` and the tests.

    serve run deployments.app:build_app artifact=artifacts/rt-polarity
    serve deploy deployments/serve_config.yaml
"""

from __future__ import annotations

from pathlib import Path

import ray
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from deployments import weights
from deployments.live_risk import RiskMonitor
from deployments.placement import check_placement
from deployments.router import Router
from deployments.schemas import AppArgs, TierOptions
from deployments.tier import TierModel
from dimee_models import artifact
from dimee_models.policy import load_policies
from dimee_models.tiers import Tier


def deployment_options(args: AppArgs, tier: Tier) -> dict:
    """Serve options of one tier (for mobile: the ingress): its name, replicas, placement by the
    tier's node label, and its bounded queue (past it Serve refuses at once with 503 and
    Retry-After, rather than let every request wait and then time out)."""
    options: TierOptions = getattr(args, tier.label)
    return {
        "name": tier.deployment,
        "num_replicas": options.num_replicas,
        "max_ongoing_requests": options.max_ongoing_requests,
        "max_queued_requests": options.max_queued_requests,
        # Serve's default (10 s) let a dead cloud replica go unnoticed for ~9 s under load, each
        # call to it meanwhile waiting out its hop timeout (DECISIONS)
        "health_check_period_s": options.health_check_period_s,
        "backpressure_config": BackpressureConfig(retry_after_s=args.retry_after_s),
        "ray_actor_options": {"num_cpus": options.num_cpus, "label_selector": tier.label_selector},
    }


def tier_deployment(args: AppArgs, tier: Tier):
    options: TierOptions = getattr(args, tier.label)
    return TierModel.options(**deployment_options(args, tier)).bind(
        args.artifact, tier, options.max_batch_size, options.batch_wait_timeout_s, options.runtime
    )


def check_artifact(args: AppArgs) -> None:
    """Fail at build time, with the reason, rather than in three replicas later: the artifact as the
    replicas will fetch it (every file checked, where it is on this node's disk; on a cluster, the
    store that serves a directory is started now)."""
    directory = Path(args.artifact)
    if weights.is_uri(args.artifact) or not directory.is_dir():
        directory, _ = weights.fetch(args.artifact, "policy")
    else:
        artifact.read_manifest(directory)
        if ray.is_initialized():
            weights.store()
    policies, doc = load_policies(directory)
    if args.policy is not None and args.policy not in policies:
        raise ValueError(f"policy {args.policy!r} is not in {args.artifact}; it has {sorted(policies)}")


def build_app(args: AppArgs) -> Application:
    if isinstance(args, dict):
        args = AppArgs(**args)
    check_artifact(args)
    if args.require_placement and ray.is_initialized():
        check_placement()
    # The ingress runs the mobile slice on the mobile nodes, so an EASY sample needs no tier hop.
    return Router.options(**deployment_options(args, Tier.MOBILE),
                          user_config=args.router.model_dump(mode="json", exclude_none=True)).bind(
        tier_deployment(args, Tier.EDGE), tier_deployment(args, Tier.CLOUD), risk_monitor(), args)


def risk_monitor():
    # on a mobile node (it needs no CPU): the live bound keeps counting while the head is away
    return RiskMonitor.options(ray_actor_options={"num_cpus": 0, "label_selector": Tier.MOBILE.label_selector}).bind()
