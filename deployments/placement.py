"""Whether a Ray cluster can place every tier: some live node must carry each tier's label. Without
torch or the app, so that `dimee serve` checks the cluster before seconds of imports."""

from __future__ import annotations

import ray

from dimee_models.tiers import TIER_LABEL, Tier


def node_tier(node: dict) -> str | None:
    """The tier a node of `ray.nodes()` is labelled with, or None (the head, a node of another app)."""
    return node.get("Labels", {}).get(TIER_LABEL)


def missing_tiers() -> list[Tier]:
    labelled = {node_tier(node) for node in ray.nodes() if node["Alive"]}
    return [t for t in Tier if t.label not in labelled]


def check_placement() -> None:
    """A tier whose label no node carries would wait forever for a node: refuse instead."""
    missing = missing_tiers()
    if missing:
        raise RuntimeError(
            f"no node in this Ray cluster carries the label(s) {[t.node_label for t in missing]}: start nodes "
            f"with e.g. --labels={missing[0].node_label} (see `dimee cluster up` and cluster.yaml)"
        )
