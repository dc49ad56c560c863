"""The three tiers, defined once: every name, id, Serve deployment and Ray node label of a tier
comes from here."""

from __future__ import annotations

from enum import IntEnum
from typing import Literal


class Tier(IntEnum):
    """A tier's id is its index in every per-tier array (routes, exits, fractions) and in the cost
    model's paths: the path that ends on a tier without escalating carries the tier's id."""

    MOBILE = 0
    EDGE = 1
    CLOUD = 2

    @classmethod
    def named(cls, name: str) -> Tier:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown tier {name!r}; choose one of {', '.join(TIER_NAMES)}") from None

    @classmethod
    def of_deployment(cls, name: str) -> Tier | None:
        """The tier a Serve deployment of the app serves, or None."""
        return next((tier for tier in cls if tier.deployment == name), None)

    @property
    def label(self) -> str:
        """As answers, manifests, metrics and the command line spell it: "mobile", "edge", "cloud"."""
        return self.name.lower()

    @property
    def node_label(self) -> str:
        """The Ray node label (`ray start --labels`) of its kind of node, as `key=value`."""
        return f"{TIER_LABEL}={self.label}"

    @property
    def label_selector(self) -> dict[str, str]:
        """The replicas' `label_selector`: it pins them to the nodes labelled with the tier."""
        return {TIER_LABEL: self.label}

    @property
    def deployment(self) -> str:
        """Its Serve deployment: the mobile tier runs inside the ingress (`Router`); edge and cloud
        are the `TierModel` deployment bound twice."""
        return "Router" if self is Tier.MOBILE else f"{self.label.capitalize()}Tier"


TIER_LABEL = "dimee.io/tier"  # prefixed, so that it cannot clash with a label a cluster already uses
TIER_NAMES = tuple(tier.label for tier in Tier)
TierName = Literal[TIER_NAMES]  # a tier's label as a type, for pydantic fields
