"""The app builder, its typed arguments, the HTTP body models and the Serve config: no cluster."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments import app as app_module, placement
from deployments.schemas import AppArgs, ClassifyRequest, RouterConfig
from dimee_models.tiers import Tier

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("body,message", [
    ({"texts": []}, "at least 1 item"),
    ({"texts": ["fine", "   "]}, "texts[1] is empty"),
    ({"texts": ["a", "b"], "text_pairs": ["x"]}, "text_pairs has 1 items but texts has 2"),
    ({"texts": ["a"], "mode": "fastest"}, "'dimee', 'cloud_only', 'mobile_only' or 'edge_only'"),
    ({"texts": "a single string"}, "valid list"),
    ({"texts": ["a"], "colour": "red"}, "Extra inputs are not permitted"),
])
def test_classify_request_rejects_bad_bodies(body, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ClassifyRequest(**body)


def test_classify_request_defaults_to_dimee_and_takes_the_modes_old_name():
    assert ClassifyRequest(texts=["ok"]).mode == "dimee"
    assert ClassifyRequest.model_validate({"texts": ["ok"], "policy": "cloud_only"}).mode == "cloud_only"


@pytest.mark.parametrize("args,message", [
    ({}, "artifact"),
    ({"artifact": "x", "mobile": {"num_replicas": 0}}, "greater than or equal to 1"),
    ({"artifact": "x", "edge": {"num_cpus": 0}}, "greater than 0"),
    ({"artifact": "x", "max_texts": 0}, "greater than or equal to 1"),
    ({"artifact": "x", "max_body_bytes": 100}, "greater than or equal to 1024"),
    ({"artifact": "x", "api_key": ""}, "api_key\n  Value should have at least 1 item"),
    ({"artifact": "x", "replicas": 3}, "Extra inputs are not permitted"),
    ({"artifact": "x", "transport": "http"}, "'grpc' or 'actor'"),
])
def test_app_args_are_validated(args, message):
    with pytest.raises(ValidationError, match=message):
        AppArgs(**args)


def test_the_api_key_never_shows_in_printed_or_dumped_args():
    args = AppArgs(artifact="x", api_key="s3cret")
    assert args.api_key.get_secret_value() == "s3cret"
    for shown in (repr(args), str(args), args.model_dump_json(), str(args.model_dump())):
        assert "s3cret" not in shown


def test_placement_check_names_the_missing_label(monkeypatch):
    def nodes(*tiers, dead=()):
        return lambda: ([{"Alive": True, "Labels": {"ray.io/node-id": "x"}}]  # the head: no tier
                        + [{"Alive": True, "Labels": {"dimee.io/tier": t}} for t in tiers]
                        + [{"Alive": False, "Labels": {"dimee.io/tier": t}} for t in dead])

    monkeypatch.setattr(placement.ray, "nodes", nodes("mobile", dead=("edge",)))
    with pytest.raises(RuntimeError, match=r"\['dimee.io/tier=edge', 'dimee.io/tier=cloud'\]: start nodes with "
                                           r"e.g. --labels=dimee.io/tier=edge"):
        app_module.check_placement()
    monkeypatch.setattr(placement.ray, "nodes", nodes("mobile", "edge", "cloud"))
    app_module.check_placement()


def test_builder_refuses_an_uncalibrated_or_missing_artifact(tmp_path):
    with pytest.raises(ValueError, match="not a DIMEE artifact"):
        app_module.build_app({"artifact": str(tmp_path)})


def test_builder_refuses_an_unknown_policy(served_artifact):
    with pytest.raises(ValueError, match="policy 'nope' is not in"):
        app_module.build_app({"artifact": str(served_artifact), "policy": "nope"})


def test_each_tier_is_pinned_by_its_label_and_scaled_on_its_own():
    args = AppArgs(artifact="x", edge={"num_replicas": 3, "num_cpus": 1.5})
    names = {tier.label: app_module.deployment_options(args, tier)["name"] for tier in Tier}
    assert names == {"mobile": "Router", "edge": "EdgeTier", "cloud": "CloudTier"}  # the ingress is the mobile tier
    for tier in Tier:  # pinned by its node label; every queue is bounded and its refusals say when to retry
        options = app_module.deployment_options(args, tier)
        assert options["ray_actor_options"]["label_selector"] == {"dimee.io/tier": tier.label}
        assert options["max_ongoing_requests"] == 8 and options["max_queued_requests"] == 8
        assert options["backpressure_config"].retry_after_s == 1
        assert options["health_check_period_s"] == 1.0  # a dead replica noticed within a second, not 10
    assert app_module.deployment_options(args, Tier.EDGE)["num_replicas"] == 3
    assert app_module.deployment_options(args, Tier.EDGE)["ray_actor_options"]["num_cpus"] == 1.5
    assert app_module.deployment_options(args, Tier.MOBILE)["num_replicas"] == 1


def test_repo_serve_config_is_valid_and_scales_each_tier():
    doc = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema(**doc)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build_app"
    AppArgs(**app.args)
    names = {d.name: d for d in app.deployments}
    assert set(names) == {tier.deployment for tier in Tier}
    for tier in Tier:
        assert names[tier.deployment].ray_actor_options.label_selector == tier.label_selector
        options = names[tier.deployment]
        assert options.max_queued_requests > 0 and options.backpressure_config.retry_after_s > 0


@pytest.mark.parametrize("config,message", [
    ({"thresholds": {"mobile": 1.5, "edge": 0.5}}, "less than or equal to 1"),
    ({"thresholds": {"mobile": "high"}}, "valid number"),
    ({"hop_timeout_s": 0}, "greater than 0"),
    ({"request_timeout_s": -1}, "greater than 0"),
    ({"max_texts_in_flight": 0}, "greater than or equal to 1"),
    ({"cost_model": {"o_2": -1}}, "o_2"),
    ({"colour": "red"}, "Extra inputs"),
])
def test_live_router_config_is_validated(config, message):
    with pytest.raises(ValidationError, match=message):
        RouterConfig.model_validate(config)
