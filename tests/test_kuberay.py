"""deploy/rayservice.yaml against the project's own Serve config and labels (no Kubernetes runs here)."""

from pathlib import Path

import yaml

from deployments.local_cluster import CLUSTER_ENV
from deployments.schemas import AppArgs
from deployments.weights import HEAD_LABEL_KEY, HEAD_LABEL_VALUE, is_uri
from dimee_models.tiers import Tier

ROOT = Path(__file__).parents[1]


def documents():
    service = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    ours = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    return service, yaml.safe_load(service["spec"]["serveConfigV2"]), ours


def test_the_serve_config_is_the_projects_with_the_artifact_from_a_storage_uri():
    _, theirs, ours = documents()
    [app], [our_app] = theirs["applications"], ours["applications"]
    assert (app["import_path"], app["route_prefix"]) == (our_app["import_path"], our_app["route_prefix"])
    assert is_uri(app["args"]["artifact"])
    AppArgs(**app["args"])  # the builder's own validation
    assert {k: v for k, v in app["args"].items() if k != "artifact"} == \
           {k: v for k, v in our_app["args"].items() if k != "artifact"}
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in our_app["deployments"]]
    for mine, project in zip(app["deployments"], our_app["deployments"]):
        assert mine == project, mine["name"]
    assert theirs["proxy_location"] == "EveryNode" and theirs["http_options"]["host"] == "0.0.0.0"


def test_each_worker_group_carries_its_tier_label_and_the_head_the_stores():
    service, _, _ = documents()
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["labels"] == {HEAD_LABEL_KEY: HEAD_LABEL_VALUE}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {name: g["labels"] for name, g in groups.items()} == {t.label: t.label_selector for t in Tier}
    for spec in [cluster["headGroupSpec"], *groups.values()]:
        assert "labels" not in spec["rayStartParams"]  # the operator rejects it there
        [container] = spec["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert {k: env[k] for k in ("RAY_SERVE_USE_GRPC_BY_DEFAULT", "RAY_put_small_object_in_memory_store",
                                    "RAY_SERVE_LOG_TO_STDERR")} == \
               {k: CLUSTER_ENV[k] for k in ("RAY_SERVE_USE_GRPC_BY_DEFAULT", "RAY_put_small_object_in_memory_store",
                                           "RAY_SERVE_LOG_TO_STDERR")}
