"""Whether a Ray cluster can place every tier: some node must carry each tier's resource. Without
torch or the app, so that `dimee serve` checks the cluster before seconds of imports."""

from __future__ import annotations

import ray

from dimee_models.tiers import Tier


def missing_tier_resources() -> list[str]:
    available = ray.cluster_resources()
    return [t.resource for t in Tier if available.get(t.resource, 0) <= 0]


def check_placement() -> None:
    """A tier whose resource no node carries would wait forever for a node: refuse instead."""
    missing = missing_tier_resources()
    if missing:
        raise RuntimeError(
            f"no node in this Ray cluster carries the resource(s) {missing}: start nodes with e.g. "
            f"--resources='{{\"{missing[0]}\": 1}}' (see `dimee cluster up` and cluster.yaml)"
        )
