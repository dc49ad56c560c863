"""The router's live settings without a cluster: what a user_config may change, and what it is refused."""

import asyncio
import shutil
import time

import numpy as np

import pytest

from deployments.router import build_settings
from deployments.schemas import AppArgs, RouterConfig
from dimee_models import artifact
from dimee_models.cost import CostModel
from dimee_models.policy import load_policies
from dimee_models.tiers import Tier


def settings(served_artifact, config: dict, policy: str | None = None):
    args = AppArgs(artifact=str(served_artifact), policy=policy)
    return build_settings(RouterConfig.model_validate(config), args, artifact.read_manifest(served_artifact))


def test_an_empty_config_serves_the_artifact_as_calibrated(served_artifact):
    _, doc = load_policies(served_artifact)
    s = settings(served_artifact, {})
    assert s.policy.name == doc["default"] and s.cost == CostModel(**doc["cost_model"]) and s.hop_timeout_s == 2.0
    assert settings(served_artifact, {}, policy="three_way").policy.name == "three_way"
    assert s.path_cost["cloud_only"] == pytest.approx(s.cost.o_2 + 6 * s.cost.lambda_cloud)


def test_the_calibrated_guarantee_is_served_and_dropped_with_other_thresholds(served_artifact):
    s = settings(served_artifact, {"policy": "dimee_learned_constrained"})
    assert s.policy.risk is not None and s.policy.risk.delta == 0.1 and s.policy.risk.budget_pp == 0.3
    assert settings(served_artifact, {"policy": "dimee_learned_constrained",
                                      "thresholds": {"mobile": 0.5, "edge": 0.5}}).policy.risk is None


def test_thresholds_cost_model_and_timeout_change_live(served_artifact):
    s = settings(served_artifact, {"policy": "dimee_learned", "thresholds": {"mobile": 0.2, "edge": 0.4},
                                   "cost_model": {"o_2": 0.9}, "hop_timeout_s": 0.5, "request_timeout_s": 1.5})
    assert s.policy.thresholds == {"mobile": 0.2, "edge": 0.4} and s.hop_timeout_s == 0.5
    assert s.request_timeout_s == 1.5
    assert s.path_cost["cloud"] == pytest.approx(2 * 0.1 + 0.9 + 4 * 0.1)
    assert load_policies(served_artifact)[0]["dimee_learned"].thresholds != s.policy.thresholds  # stored one untouched
    s = settings(served_artifact, {"policy": "dimee_escalate", "thresholds": {"mobile": 1, "edge": 0, "escalate": 0.9}})
    assert s.policy.escalates and s.policy.escalate(np.array([[0.85, 0.15], [0.95, 0.05]])).tolist() == [True, False]


@pytest.mark.parametrize("config,message", [
    ({"policy": "fastest"}, "policy 'fastest' is not in"),
    ({"policy": "three_way", "thresholds": {"alpha": 0.5}}, "nearest centroid and has no thresholds"),
    ({"policy": "dimee_learned", "thresholds": {"mobile": 0.5}}, "thresholds must set exactly"),
    ({"policy": "dimee_escalate", "thresholds": {"mobile": 0.5, "edge": 0.5}}, "thresholds must set exactly"),
])
def test_configs_the_artifact_cannot_serve_are_refused(served_artifact, config, message):
    with pytest.raises(ValueError, match=message):
        settings(served_artifact, config)


def test_a_recalibrated_copy_can_be_switched_to_but_other_weights_cannot(served_artifact, tmp_path):
    copy = tmp_path / "recalibrated"
    shutil.copytree(served_artifact, copy)
    assert settings(served_artifact, {"policy_artifact": str(copy), "policy": "three_way"}).policy.name == "three_way"
    tampered = tmp_path / "other-weights"
    shutil.copytree(served_artifact, tampered)
    (tampered / "edge.safetensors").write_bytes((tampered / "edge.safetensors").read_bytes() + b" ")
    artifact.write_manifest(tampered, artifact.read_manifest(tampered, verify=False))
    with pytest.raises(ValueError, match="other weights than the served artifact"):
        settings(served_artifact, {"policy_artifact": str(tampered)})
    with pytest.raises(ValueError):
        settings(served_artifact, {"policy_artifact": str(tmp_path / "missing")})


class SlowTier:
    """A stand-in for a tier's handle that answers after `seconds` (unit test only; the real
    deadline is exercised on the cluster by the fault tests)."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def remote(self, request):
        self.calls += 1
        return asyncio.sleep(self.seconds, result="reply")


class BusyTier:
    """A stand-in for a tier's handle whose bounded queue is full: Serve raises BackPressureError."""

    def remote(self, request):
        from ray.serve.exceptions import BackPressureError

        async def refused():
            raise BackPressureError(num_queued_requests=8, max_queued_requests=8, retry_after_s=2)
        return refused()


def router_with(tier):
    import collections

    from deployments.router import Router

    router = object.__new__(Router.func_or_class)
    no_metric = type("Counter", (), {"inc": lambda self, tags: None})()
    router.handles, router.hop_failures, router.shed = {Tier.CLOUD: tier}, no_metric, no_metric
    router.since_start = {"shed": collections.Counter(), "hop_failures": collections.Counter()}
    router.args = AppArgs(artifact="unused", retry_after_s=2)
    router.no_replica, router.no_replica_checked = set(), float("inf")  # no refresh from Serve here
    return router


def test_a_call_gets_at_most_what_is_left_of_the_deadline(served_artifact):
    s = settings(served_artifact, {"hop_timeout_s": 2.0, "request_timeout_s": 3.0})
    tier = SlowTier(5.0)
    began = time.monotonic()
    assert asyncio.run(router_with(tier).call(Tier.CLOUD, None, s, deadline=began + 0.3)) is None
    assert 0.25 < time.monotonic() - began < 1.0  # the deadline's 0.3 s, not the hop's 2 s
    past = SlowTier(0.0)
    assert asyncio.run(router_with(past).call(Tier.CLOUD, None, s, deadline=time.monotonic() - 1)) is None
    assert past.calls == 0  # past the deadline the call is not even made
    assert asyncio.run(router_with(SlowTier(0.01)).call(Tier.CLOUD, None, s, deadline=time.monotonic() + 3)) == "reply"


def test_a_busy_tier_is_a_503_with_retry_after_not_a_fallback(served_artifact):
    from fastapi import HTTPException

    s = settings(served_artifact, {})
    router = router_with(BusyTier())
    with pytest.raises(HTTPException) as refused:
        asyncio.run(router.call(Tier.CLOUD, None, s, deadline=time.monotonic() + 3))
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "2"}  # AppArgs
    assert "cloud tier is at capacity" in refused.value.detail
    assert router.since_start["shed"] == {"cloud": 1} and not router.since_start["hop_failures"]
    router = router_with(SlowTier(5.0))
    assert asyncio.run(router.call(Tier.CLOUD, None, s, deadline=time.monotonic() + 0.1)) is None
    assert router.since_start["hop_failures"] == {("cloud", "timeout"): 1} and not router.since_start["shed"]


def test_a_tier_serve_reports_without_replicas_is_not_called(served_artifact):
    """A lost node's tier: the call is skipped (fallback at once) instead of waiting out its timeout."""
    s = settings(served_artifact, {})
    tier = SlowTier(5.0)
    router = router_with(tier)
    router.no_replica = {Tier.CLOUD}
    began = time.monotonic()
    assert asyncio.run(router.call(Tier.CLOUD, None, s, deadline=began + 3)) is None
    assert tier.calls == 0 and time.monotonic() - began < 0.1
    assert router.since_start["hop_failures"] == {("cloud", "unavailable"): 1}
