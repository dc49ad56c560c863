"""The tier type: one spelling of each tier's name, id, deployment and node label."""

import pytest

from dimee_models.cost import PATHS
from dimee_models.tiers import TIER_NAMES, Tier


def test_a_tier_is_found_again_by_its_deployment_and_by_its_name():
    assert all(Tier.of_deployment(t.deployment) is t and Tier.named(t.label) is t for t in Tier)
    assert Tier.of_deployment("SomethingElse") is None
    assert all(t.label_selector == dict([t.node_label.split("=")]) for t in Tier)


def test_a_tier_id_is_also_its_own_path_in_the_cost_model():
    assert PATHS[:3] == TIER_NAMES


def test_an_unknown_tier_is_named():
    with pytest.raises(ValueError, match="unknown tier 'fog'; choose one of mobile, edge, cloud"):
        Tier.named("fog")
