"""Both `ray up` files: what Ray's cluster launcher accepts, and every tier's nodes labelled with it
(`cluster-local.yaml` also runs for real in tests/test_ray_up.py; AWS cannot run here)."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from deployments.weights import HEAD_LABEL, HEAD_LABEL_KEY, HEAD_LABEL_VALUE
from dimee_models.tiers import Tier

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_the_ray_up_files_pass_the_launchers_own_checks(name):
    validate_config(prepare_config(yaml.safe_load((ROOT / name).read_text())))


def test_each_tier_node_type_carries_its_label_and_the_head_the_stores():
    types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    assert {name: spec.get("labels") for name, spec in types.items()} == {
        "head": {HEAD_LABEL_KEY: HEAD_LABEL_VALUE}, **{tier.label: tier.label_selector for tier in Tier}}


def test_the_local_file_labels_each_host_with_its_tier_and_the_head():
    doc = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    start = " ".join(doc["worker_start_ray_commands"])
    assert "--labels=dimee.io/tier=$TIER" in start
    assert all(f"TIER={tier.label} " in start for tier in Tier)
    assert f"--labels={HEAD_LABEL}" in " ".join(doc["head_start_ray_commands"])
