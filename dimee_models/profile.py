"""A cost profile: what serving costs on one cluster, measured there (`dimee profile`,
deployments/profile.py), and the cost model in milliseconds built from it.

Everything is per text at one text per request, the case a latency cost model predicts:
  fixed    what every request pays whatever its path: HTTP, Serve's proxy, the ingress, the tokenizer
  compute  each tier's slice (mobile: embeddings, layers 1..m and its exit, in the ingress; edge:
           layers m+1..e and its exit, from a hidden state; cloud: the whole model, from token ids)
  hops     a tier call's round trip minus that tier's compute: ingress -> edge and ingress -> cloud
           with the hidden state (storing it included), ingress -> cloud with token ids (cloud-only),
           edge -> cloud (edge storing its hidden state included), and Serve's no-op hop for reference
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dimee_models.cost import CostModel
from dimee_models.tiers import TierName

HOPS = ("noop", "ingress_edge", "ingress_cloud", "ingress_cloud_tokens", "edge_cloud")


class Stat(BaseModel):
    """Milliseconds over repeated measurements."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(..., ge=1)
    mean_ms: float
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, samples) -> Stat:
        ms = np.asarray(samples, dtype=float)
        return cls(n=len(ms), mean_ms=float(ms.mean()), p50_ms=float(np.median(ms)),
                   p99_ms=float(np.percentile(ms, 99)))


class TierCompute(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: int = Field(..., ge=1, description="encoder layers of the measured slice")
    one_text: Stat = Field(..., description="the slice's compute for one text")
    batch: int = Field(..., ge=1, description="texts in the batched measurement")
    batch_per_text_ms: float = Field(..., description="the slice's compute per text in a batch of `batch`")

    @property
    def per_layer_ms(self) -> float:
        return self.one_text.mean_ms / self.layers


class Profile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    created: str = Field(..., description="when it was measured (ISO 8601)")
    artifact: str
    model: str
    exits: dict[TierName, int]
    nodes: list[dict] = Field(..., description="the cluster's nodes: address, tier, CPUs, memory")
    texts: int = Field(..., ge=1, description="texts measured (after warm-up), one at a time")
    fixed: Stat
    compute: dict[TierName, TierCompute]
    hops: dict[str, Stat]
    hidden_bytes_per_token: float = Field(..., gt=0)


def read_profile(path: str | Path) -> Profile:
    """The profile at `path`; ValueError in one line naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cost profile {path}: file not found")
    try:
        profile = Profile.model_validate_json(path.read_text())
    except ValidationError as err:
        error = err.errors()[0]
        where = ".".join(map(str, error["loc"]))
        raise ValueError(f"cost profile {path}: {f'invalid field {where}: ' if where else ''}{error['msg']}") from None
    if missing := set(HOPS) - set(profile.hops):
        raise ValueError(f"cost profile {path}: hops lacks {sorted(missing)}")
    return profile


def write_profile(path: str | Path, profile: Profile) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(profile.model_dump(), indent=1) + "\n")


def latency_cost_model(profile: Profile, mu: float = 1.0) -> CostModel:
    """The cost model in ms per text from a profile's means. Its reward weight is scaled so that
    `mu` weighs a cloud-only request as it does in the paper's abstract model (confidence is in
    [0, 1] whatever the unit of cost)."""
    c, h = profile.compute, profile.hops
    model = CostModel(
        unit="ms", fixed=profile.fixed.mean_ms,
        lambda_mobile=c["mobile"].per_layer_ms, lambda_edge=c["edge"].per_layer_ms,
        lambda_cloud=c["cloud"].per_layer_ms,
        o_1=h["ingress_edge"].mean_ms, o_2=h["ingress_cloud"].mean_ms,
        o_cloud_only=h["ingress_cloud_tokens"].mean_ms, o_edge_cloud=h["edge_cloud"].mean_ms,
    )
    m, e, layers = (profile.exits[t] for t in ("mobile", "edge", "cloud"))
    scale = (CostModel().path_costs(m, e, layers)["cloud_only"] / model.path_costs(m, e, layers)["cloud_only"])
    return model.model_copy(update={"mu": mu * scale})
