"""Typed shapes: HTTP bodies, the app builder's arguments, and what travels between deployments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import ray
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator

from dimee_models.cost import CostModel
from dimee_models.policy import Mode
from dimee_models.tiers import TierName
from dimee_models.wire import Format, Packed

Transport = Literal["grpc", "actor"]


# HTTP ---------------------------------------------------------------------------------------------


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(..., min_length=1, description="texts to classify (1 to the server's limit, 64 by default)")
    text_pairs: list[str] | None = Field(None, description="second sentences, one per text, for sentence-pair models")
    # `policy` is this field's old name, still accepted; the stored policy that mode dimee routes with is the server's
    mode: Mode = Field("dimee", validation_alias=AliasChoices("mode", "policy"),
                       description="dimee (route with the served policy), or a baseline: cloud_only, mobile_only, edge_only")

    @model_validator(mode="after")
    def _texts_are_usable(self) -> ClassifyRequest:
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError(f"text_pairs has {len(self.text_pairs)} items but texts has {len(self.texts)}")
        for i, text in enumerate(self.texts):
            if not text.strip():
                raise ValueError(f"texts[{i}] is empty")
        for field in ("texts", "text_pairs"):
            for i, text in enumerate(getattr(self, field) or ()):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # a JSON escape like \ud800 alone: not text, and the tokenizer fails on it
                    raise ValueError(f"{field}[{i}] holds a lone surrogate, which is not text") from None
        return self


class Prediction(BaseModel):
    label: str
    label_id: int
    confidence: float
    tier: TierName
    exit_layer: int
    cost: float
    truncated: bool = Field(False, description="the text was longer than the model's maximum length and was cut")
    fallback: bool = Field(False, description="the chosen tier (edge) failed or timed out; cloud answered instead")
    degraded: bool = Field(False, description="the chosen tier failed or timed out; a shallower exit answered")
    escalated: bool = Field(False, description="edge was too unsure (the policy's escalate threshold), so cloud "
                                               "answered from edge's hidden state")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    model: str


# app builder ----------------------------------------------------------------------------------------


Runtime = Literal["onnxruntime", "torch"]


class TierOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="replicas of this tier")
    num_cpus: float = Field(0.5, gt=0, description="CPU share reserved per replica (also sets torch threads)")
    max_ongoing_requests: int = Field(8, ge=1, description="requests a replica accepts at once")
    max_queued_requests: int = Field(
        8, ge=1, description="requests each caller holds waiting for a free replica; past that, Serve refuses "
                             "at once and the client gets 503 with Retry-After")
    max_batch_size: int = Field(16, ge=1, description="@serve.batch: most requests merged into one forward pass")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="@serve.batch: how long to wait for a batch to fill")
    health_check_period_s: float = Field(
        1.0, gt=0, description="how often Serve's controller checks each replica; a dead one is noticed (and "
                               "replaced, and no longer called) at its next check")
    runtime: Runtime = Field("onnxruntime", description="what runs the tier's layers: ONNX Runtime (the same float32 "
                                                        "weights, exported when the replica starts) or eager torch")


class IngressOptions(TierOptions):
    """The mobile tier is the ingress (the Router deployment): its replicas take every request."""

    max_ongoing_requests: int = Field(
        8, ge=1, description="requests a replica accepts at once: what the cluster behind it answers within "
                             "the request deadline")


class AppArgs(BaseModel):
    """Arguments of `build_app`; the same for `serve run`, Serve config files, the CLI and tests."""

    model_config = ConfigDict(extra="forbid")

    artifact: str = Field(..., description="calibrated artifact: a directory on the head (absolute; the replicas "
                                           "fetch its files through Ray) or a storage URI (s3://bucket/prefix)")
    policy: str | None = Field(None, description="stored DIMEE policy to serve; default: the artifact's default")
    max_texts: int = Field(64, ge=1, le=4096, description="most texts in one request")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body; larger ones get 413")
    api_key: SecretStr | None = Field(
        None, min_length=1, description="if set, /v1/classify and /v1/info need it in the X-API-Key header"
    )
    mobile: IngressOptions = Field(default_factory=IngressOptions)
    edge: TierOptions = Field(default_factory=TierOptions)
    cloud: TierOptions = Field(default_factory=TierOptions)
    require_placement: bool = Field(
        True, description="fail at deploy time if the cluster has no node with a tier's label"
    )
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of a 503 sent when a tier is at capacity")
    transport: Transport = Field(
        "grpc", description="how the ingress calls edge and cloud: Serve's gRPC transport, or Ray actor calls")
    router: RouterConfig = Field(
        default_factory=lambda: RouterConfig(),
        description="the Router's live settings to start with (its Serve user_config); a Serve config file's "
                    "user_config for the Router replaces them")


class RouterConfig(BaseModel):
    """The router's live settings: Serve's `user_config` of the Router deployment, applied to running
    replicas without a restart. Unset fields take the artifact's (and AppArgs') values."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = Field(None, description="stored policy to route with")
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] | None = Field(
        None, description="a learned, escalate or cascade policy's thresholds, {mobile: p, edge: p} (escalate: and "
                           "escalate: p; cascade: {mobile: p, escalate: p}), each in [0, 1]")
    cost_model: CostModel | None = Field(None, description="cost model of the reported per-sample costs")
    policy_artifact: str | None = Field(
        None, description="take the policies and cost model from this recalibrated copy of the served artifact")
    hop_timeout_s: float = Field(2.0, gt=0, le=60, description="longest wait for one tier call before falling back")
    request_timeout_s: float = Field(
        3.0, gt=0, le=600, description="a request's deadline: every tier call gets at most what is left of it, so a "
                                       "request is answered (from the deepest exit computed by then) within it")
    max_texts_in_flight: int = Field(
        64, ge=1, description="texts this ingress replica works on at once; a request that would go past it gets "
                              "503 with Retry-After at once (one request is always admitted, whatever its size)")
    shadow_rate: float = Field(
        0.02, ge=0, le=1, description="share of routed samples audited against the final exit after their answer "
                                      "has gone out (shadow checks, for the live bound); 0 turns them off")
    shadow_log: str | None = Field(
        None, description="a directory on the head where the shadow-checked texts are appended (JSON lines, one "
                          "file per ingress replica), for `dimee calibrate --from-traffic`; they hold what clients "
                          "sent: off unless set")
    on_drift: Literal["tighten", "alarm"] = Field(
        "tighten", description="when the live bound shows the budget broken: step back to a safer setting of "
                               "the served policy (tighten), or only report it (alarm)")


# between deployments -----------------------------------------------------------------------------------


@dataclass
class HiddenRef:
    """A tier's last hidden state (layer m from mobile, e from edge) in Ray's object store. Wrapped
    in a dataclass so that Serve and Ray pass the reference along instead of resolving it: the
    router never holds the bytes."""

    ref: ray.ObjectRef  # -> wire.Packed
    layer: int
    nbytes: int


@dataclass
class HiddenWire:
    """A tier's last hidden state as it crosses a link (`wire.pack`: its format, padding dropped),
    inside a tier call when it is small (`TierRunner.store`: Ray inlines small arguments the same way)."""

    packed: Packed
    layer: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


@dataclass
class HiddenArrays:
    """A tier's last hidden state as arrays, in the process that computed it."""

    hidden: np.ndarray  # (B, T, H) float32
    mask: np.ndarray  # (B, T) int64
    layer: int


@dataclass(frozen=True)
class Tokens:
    """Token ids of a batch of texts: what mobile (and cloud, for cloud-only) starts from."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None = None
    # the layer whose output a tier starts from, as in HiddenRef and HiddenWire: tokens go into layer 1
    layer: ClassVar[int] = 0

    def take(self, rows: list[int]) -> Tokens:
        return Tokens([self.input_ids[r] for r in rows],
                      None if self.token_type_ids is None else [self.token_type_ids[r] for r in rows])


@dataclass(frozen=True)
class TierRequest:
    """What a tier starts from: token ids, or a hidden state (inline when small, else in the object store)."""

    input: Tokens | HiddenWire | HiddenRef
    keep_hidden: bool = False  # keep this tier's hidden state for a later tier
    # ... only of the rows whose exit confidence is below this (escalation: what cloud will need)
    keep_below: float | None = None
    wire: Format = "float32"  # the format a kept hidden state is sent on in


@dataclass
class TierReply:
    probs: np.ndarray  # (B, C) at the tier's exit
    exit_layer: int
    z: np.ndarray | None  # (B, H) mobile embedding, mobile only
    hidden: HiddenRef | HiddenWire | HiddenArrays | None  # when asked to keep it: arrays in-process, sent on once stored
    compute_ms: float  # layer compute for the whole batch this request rode in
    batch_size: int  # requests that shared this forward pass (@serve.batch)
    received: str  # how the input arrived: "tokens", "inline" (a small hidden state) or "object_store"
    node_id: str
