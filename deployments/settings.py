"""What the ingress routes with: `Settings`, built from Serve's `user_config` (a `RouterConfig`)
and checked against the served artifact, replaced as a whole when the config changes."""

import dataclasses
from pathlib import Path

from deployments import weights
from deployments.schemas import AppArgs, RouterConfig
from dimee_models import artifact
from dimee_models.cost import CostModel
from dimee_models.manifest import Manifest
from dimee_models.policy import CentroidPolicy, Policy, load_policies, served_wire
from dimee_models.policy_doc import PolicyDoc
from dimee_models.wire import Wire
from dimee_models.risk import DEFAULT_DELTA

TIER_WEIGHTS = ("mobile.safetensors", "edge.safetensors", "cloud.safetensors")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a request routes with; replaced as a whole by `Router.reconfigure`, read once per request."""

    policy: Policy
    cost: CostModel
    path_cost: dict[str, float]
    hop_timeout_s: float
    request_timeout_s: float
    max_texts_in_flight: int
    boundaries: dict  # where the served artifact's model is cut and why, for /v1/info
    shadow_rate: float
    shadow_log: str | None
    watch: dict  # what the live bound watches (deployments/live_risk.py): the policy, its path, budget, delta
    wire: Wire  # what crosses the links: the hidden state's format, and what a text sent straight to cloud carries


def build_settings(config: RouterConfig, args: AppArgs, manifest: Manifest, directory: Path) -> Settings:
    """Settings from a validated config, checked against the served artifact (its files fetched to
    `directory`); ValueError says what is wrong."""
    source = config.policy_artifact or args.artifact
    runs = served_wire(directory).mobile_slice  # the served mobile slice's arithmetic, fixed when it started
    if config.policy_artifact:
        directory, _ = weights.fetch(config.policy_artifact, "policy")  # each file checked against its manifest
        other = artifact.read_manifest(directory, verify=False)
        if any(other.files.get(f) != manifest.files[f] for f in TIER_WEIGHTS):
            raise ValueError(f"policy_artifact {source} holds other weights than the served artifact: "
                             "only a recalibrated copy of the same model can be switched to live")
    policies, doc = load_policies(directory)
    if doc.wire.mobile_slice != runs:
        raise ValueError(f"policy_artifact {source} was certified on a mobile slice in {doc.wire.mobile_slice}; this "
                         f"deployment runs one in {runs}: deploy it instead")
    name = config.policy or args.policy or doc.default
    if name not in policies:
        raise ValueError(f"policy {name!r} is not in {source}; it has {sorted(policies)}")
    policy = policies[name]
    if config.thresholds is not None:
        if isinstance(policy, CentroidPolicy):
            raise ValueError(f"policy {name!r} routes by nearest centroid and has no thresholds to set")
        if set(config.thresholds) != set(policy.thresholds):
            raise ValueError(f"thresholds must set exactly {sorted(policy.thresholds)}, got {sorted(config.thresholds)}")
        # the stored guarantee was for the calibrated thresholds, not these
        policy = dataclasses.replace(policy, thresholds=dict(config.thresholds), risk=None)
    cost = config.cost_model or doc.cost_model
    risk = policy.risk
    watch = {"artifact": str(source), "policy": name, "thresholds": policy.thresholds,
             "path_index": policy.path_index(), "on_drift": config.on_drift,
             "budget_pp": risk.budget_pp if risk else doc.max_accuracy_drop_pp,
             "delta": risk.delta if risk else doc.delta or DEFAULT_DELTA}
    return Settings(policy, cost, cost.path_costs(manifest.exits.mobile, manifest.exits.edge, manifest.num_layers),
                    config.hop_timeout_s, config.request_timeout_s, config.max_texts_in_flight,
                    boundaries_info(doc, manifest.num_layers), config.shadow_rate, config.shadow_log, watch,
                    doc.wire)


def boundaries_info(doc: PolicyDoc, num_layers: int) -> dict:
    """/v1/info's account of where the model is cut: at training, or by calibration (the kind that
    chose the pair, its expected cost per sample on the choice rows against cloud-only's)."""
    chosen, cost = doc.boundaries, doc.cost_model
    if chosen is None:
        return {"chosen_by": "training"}
    [best] = [c for c in chosen["candidates"] if (c["policy"], c["mobile"], c["edge"])
              == (chosen["chosen_by"], chosen["mobile"], chosen["edge"])]
    return {"chosen_by": "calibration", "policy": chosen["chosen_by"], "candidates": len(chosen["candidates"]),
            "chosen_on": chosen.get("chosen_on", "calibration"), "unit": cost.unit, "expected_cost": best["cost"],
            "cloud_only_cost": cost.path_costs(chosen["mobile"], chosen["edge"], num_layers)["cloud_only"]}
