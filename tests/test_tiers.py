"""The tier type: one spelling of each tier's name, id, deployment and resource."""

import pytest

from dimee_models.cost import PATHS
from dimee_models.tiers import TIER_NAMES, Tier


def test_each_tier_names_its_deployment_and_resource():
    assert TIER_NAMES == ("mobile", "edge", "cloud")
    assert [t.deployment for t in Tier] == ["Router", "EdgeTier", "CloudTier"]  # the ingress runs mobile
    assert [t.resource for t in Tier] == ["tier_mobile", "tier_edge", "tier_cloud"]
    assert all(Tier.of_deployment(t.deployment) is t and Tier.named(t.label) is t for t in Tier)
    assert Tier.of_deployment("SomethingElse") is None


def test_a_tier_id_is_also_its_own_path_in_the_cost_model():
    assert PATHS[:3] == TIER_NAMES


def test_an_unknown_tier_is_named():
    with pytest.raises(ValueError, match="unknown tier 'fog'; choose one of mobile, edge, cloud"):
        Tier.named("fog")
