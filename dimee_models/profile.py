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
from dimee_models.wire import FORMATS, Format, bytes_per_token

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


class Link(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rtt_ms: float = Field(..., ge=0, description="round trip of a small message")
    mbit_s: float = Field(..., gt=0, description="bandwidth the sender has towards the receiver")

    def ms(self, nbytes: float) -> float:
        """What sending `nbytes` over this link adds to a hop: the round trip, then the bytes."""
        return self.rtt_ms + self.bytes_ms(nbytes)

    def bytes_ms(self, nbytes: float) -> float:
        return nbytes * 8 / (self.mbit_s * 1000)


class Links(BaseModel):
    """The network between the tiers of a real deployment, on top of a profile's measured hops (on a
    local cluster those hops cross loopback only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mobile_edge: Link
    mobile_cloud: Link
    edge_cloud: Link


# Assumed figures, not measured here (docs/OPERATING.md, "Tuning to the cluster", says where they come from): a device on the
# same LAN as the edge server, with the cloud a region away; and a phone on a mobile network, whose
# uplink is narrow and whose round trip to a cloud region is tens of milliseconds.
LINK_PRESETS = {
    "lan": Links(mobile_edge=Link(rtt_ms=1, mbit_s=100), mobile_cloud=Link(rtt_ms=20, mbit_s=100),
                 edge_cloud=Link(rtt_ms=20, mbit_s=1000)),
    "mobile": Links(mobile_edge=Link(rtt_ms=15, mbit_s=10), mobile_cloud=Link(rtt_ms=60, mbit_s=10),
                    edge_cloud=Link(rtt_ms=20, mbit_s=1000)),
}
TOKEN_ID_BYTES = 8  # int64 token ids: what a cloud-only request ships


def read_links(value: str) -> Links:
    """`--links lan|mobile|FILE`: a preset, or a JSON file of Links; ValueError names what is wrong."""
    if value in LINK_PRESETS:
        return LINK_PRESETS[value]
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--links {value}: neither a preset ({', '.join(LINK_PRESETS)}) nor a file")
    try:
        return Links.model_validate_json(path.read_text())
    except ValidationError as err:
        error = err.errors()[0]
        raise ValueError(f"--links {value}: invalid field {'.'.join(map(str, error['loc']))}: {error['msg']}") from None


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
    tokens_per_text: float | None = Field(None, gt=0, description="mean tokens of the measured texts")
    wire_bytes_per_token: dict[Format, float] | None = Field(
        None, description="what each wire format sends per token of the measured texts' mobile hidden states "
                          "(int8's values deflated, so measured)")
    links: Links | None = Field(None, description="the network between tiers, added to the measured hops")
    measured_across: Links | None = Field(None, description="the shaped links between the hosts the hops were "
                                                            "measured across (`dimee cluster up --links`), if any")


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


def link_costs(links: Links, hidden_bytes: float, token_bytes: float) -> dict[str, float]:
    """What `links` add to each hop of HOPS for one text, along the path the router's call takes."""
    return {
        "noop": links.mobile_edge.rtt_ms,
        "ingress_edge": links.mobile_edge.ms(hidden_bytes),
        "ingress_cloud": links.mobile_cloud.ms(hidden_bytes),
        "ingress_cloud_tokens": links.mobile_cloud.ms(token_bytes),
        # escalation: one text's hidden state is small enough to ride inline, so edge hands it back to
        # the ingress in its reply (the bytes, on a round trip already paid), which sends it to cloud
        "edge_cloud": links.mobile_edge.ms(hidden_bytes) - links.mobile_edge.rtt_ms + links.mobile_cloud.ms(hidden_bytes),
    }


def predicted_hops(profile: Profile, links: Links) -> dict[str, float]:
    """Each hop's mean (ms) with the network of `links` added to what `profile` measured."""
    if profile.tokens_per_text is None:
        raise ValueError("this cost profile predates tokens_per_text, which link costs need: measure it again "
                         "with `dimee profile`")
    if profile.measured_across is not None:
        raise ValueError("this cost profile was measured across shaped links, which its hops hold already: "
                         "--links adds a network to hops measured without one")
    added = link_costs(links, profile.hidden_bytes_per_token * profile.tokens_per_text,
                       profile.tokens_per_text * TOKEN_ID_BYTES)
    return {hop: stat.mean_ms + added[hop] for hop, stat in profile.hops.items()}


def wire_savings(profile: Profile, links: Links | None = None) -> dict[str, dict[str, float]] | None:
    """Per hidden-state format, the ms each hop of the cost model saves on one text against float32:
    the bytes it does not send over the links' rates (`links`, else the profile's own, else those it
    was measured across). None where no link is known: on loopback the bytes cost nothing measurable."""
    links = links or profile.links or profile.measured_across
    if links is None or profile.tokens_per_text is None:
        return None
    hidden_size = round(profile.hidden_bytes_per_token / 4)
    sent = profile.wire_bytes_per_token or {fmt: bytes_per_token(fmt, hidden_size) for fmt in FORMATS}
    savings = {}
    for fmt in FORMATS:
        saved = profile.tokens_per_text * (sent["float32"] - sent[fmt])
        edge, cloud = links.mobile_edge.bytes_ms(saved), links.mobile_cloud.bytes_ms(saved)
        savings[fmt] = {"o_1": edge, "o_2": cloud, "o_edge_cloud": edge + cloud}  # escalation crosses both (link_costs)
    return savings


def latency_cost_model(profile: Profile, mu: float = 1.0, links: Links | None = None) -> CostModel:
    """The cost model in ms per text from a profile's means, with the network of `links` (else the
    profile's own, if any) added to each hop. Its reward weight is scaled so that `mu` weighs a
    cloud-only request as it does in the paper's abstract model (confidence is in [0, 1] whatever
    the unit of cost)."""
    c = profile.compute
    links = links or profile.links
    h = predicted_hops(profile, links) if links is not None else {hop: s.mean_ms for hop, s in profile.hops.items()}
    model = CostModel(
        unit="ms", fixed=profile.fixed.mean_ms,
        lambda_mobile=c["mobile"].per_layer_ms, lambda_edge=c["edge"].per_layer_ms,
        lambda_cloud=c["cloud"].per_layer_ms,
        o_1=h["ingress_edge"], o_2=h["ingress_cloud"], o_cloud_only=h["ingress_cloud_tokens"],
        o_edge_cloud=h["edge_cloud"],
    )
    m, e, layers = (profile.exits[t] for t in ("mobile", "edge", "cloud"))
    scale = (CostModel().path_costs(m, e, layers)["cloud_only"] / model.path_costs(m, e, layers)["cloud_only"])
    return model.model_copy(update={"mu": mu * scale})
