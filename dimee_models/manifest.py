"""What an artifact's manifest.json says, typed: the model, its data, its tiers' slices and files.

The JSON keeps the fields' order below; `policy` appears only once the artifact is calibrated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dimee_models.tiers import Tier, TierName

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TierSpec:
    """Which part of the model a tier holds. Layers are 0-based `[start, end)`."""

    tier: Tier
    start: int
    end: int
    embeddings: bool
    head_layers: tuple[int, ...]


def tier_specs(num_layers: int, mobile_exit: int, edge_exit: int) -> dict[Tier, TierSpec]:
    """Mobile: embeddings + layers 1..m + head m. Edge: layers m+1..e + head e. Cloud: the full
    model with every head, so it can serve cloud-only requests and continue from any layer."""
    check_exits(num_layers, mobile_exit, edge_exit)
    return {
        Tier.MOBILE: TierSpec(Tier.MOBILE, 0, mobile_exit, True, (mobile_exit,)),
        Tier.EDGE: TierSpec(Tier.EDGE, mobile_exit, edge_exit, False, (edge_exit,)),
        Tier.CLOUD: TierSpec(Tier.CLOUD, 0, num_layers, True, tuple(range(1, num_layers + 1))),
    }


def check_exits(num_layers: int, mobile_exit: int, edge_exit: int) -> None:
    """Edge may run to the last layer: with the mobile exit at L - 1 that is the only edge there is,
    and on a network where edge is near and cloud far it is a cloud nearby."""
    if not 1 <= mobile_exit < edge_exit <= num_layers:
        raise ValueError(
            f"exits must satisfy 1 <= mobile ({mobile_exit}) < edge ({edge_exit}) <= number of layers ({num_layers})"
        )


def default_exits(num_layers: int) -> tuple[int, int]:
    """Mobile after a third of the layers, edge after two thirds (6 layers: 2, 4; 12: 4, 8)."""
    return max(1, num_layers // 3), max(2, 2 * num_layers // 3)


class Frozen(BaseModel):
    """A manifest part: immutable (an update is a copy), and a field it does not know is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SplitSizes(Frozen):
    train: int
    calibration: int
    test: int


class Exits(Frozen):
    """1-based layers of the mobile and edge exits (cloud's is the last layer)."""

    mobile: int
    edge: int


class DatasetInfo(Frozen):
    name: str
    size: int
    split_fractions: list[float]
    split_seed: int


class TierFile(Frozen):
    """One tier's safetensors file and the slice it holds; `layers` is 1-based [first, last]."""

    file: str
    layers: list[int]
    embeddings: bool
    exit_heads: list[int]
    parameters: int
    parameter_bytes: int


class PolicyRef(Frozen):
    """The calibrated policies' file and the one the server routes with by default."""

    default: str
    file: str


class Manifest(Frozen):
    """manifest.json: `read_manifest` validates it, `write_manifest` checksums the files and writes it."""

    format_version: int = FORMAT_VERSION
    model_type: str
    num_layers: int
    hidden_size: int
    num_labels: int
    split_sizes: SplitSizes
    backbone: str
    labels: list[str]
    task: str
    text_pair: bool
    max_length: int
    exits: Exits
    dataset: DatasetInfo
    training: dict  # the training run's settings (TrainConfig) and wall_seconds
    metrics: dict  # e.g. calibration_exit_accuracy, one value per exit
    tiers: dict[TierName, TierFile]
    files: dict[str, str]  # path in the artifact -> sha256, of every file but the manifest
    policy: PolicyRef | None = None

    @property
    def tier_exits(self) -> dict[Tier, int]:
        """The layer each tier answers from."""
        return {Tier.MOBILE: self.exits.mobile, Tier.EDGE: self.exits.edge, Tier.CLOUD: self.num_layers}

    def specs(self) -> dict[Tier, TierSpec]:
        return tier_specs(self.num_layers, self.exits.mobile, self.exits.edge)

    def to_json(self) -> str:
        """manifest.json's text, without `"policy": null` before calibration."""
        return json.dumps(self.model_dump(mode="json", exclude={"policy"} if self.policy is None else None), indent=2)


def public_model_name(backbone: str, dataset: str) -> str:
    """What answers call the model: backbone and dataset by name, never a path on the server (a
    local backbone folder or a user's CSV); a hub id such as org/name stays as it is."""
    if Path(backbone).is_absolute() or backbone.startswith((".", "~")) or backbone.count("/") > 1:
        backbone = Path(backbone).name
    kind, sep, source = dataset.partition(":")
    if sep and kind in ("csv", "jsonl"):
        dataset = f"{kind}:{Path(source).name}"
    return f"{backbone}@{dataset}"
