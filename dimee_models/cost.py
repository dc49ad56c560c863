"""The inference cost model: per-layer compute on each tier plus the price of each offload hop.

A sample's cost follows from the path it took (layers are 1-based, m < e < L):
    mobile      answered at exit m          lambda_m*m
    edge        mobile -> edge, exit e      lambda_m*m + o_1 + lambda_e*(e-m)
    cloud       mobile -> cloud, exit L     lambda_m*m + o_2 + lambda_c*(L-m)
    edge_cloud  mobile -> edge -> cloud     lambda_m*m + o_1 + lambda_e*(e-m) + o_ec + lambda_c*(L-e)
    cloud_only  raw input -> cloud          o_cloud_only + lambda_c*L   (the baseline every report
                                            compares with; o_cloud_only is o_2 unless set)
plus, on every path, `fixed`: what a request pays whatever its path (0 in the paper's model).

Two units: the paper's abstract one (the defaults), and milliseconds, built from a profile of the
cluster (`dimee profile`, dimee_models/profile.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

PATHS = ("mobile", "edge", "cloud", "edge_cloud", "cloud_only")


class CostModel(BaseModel):
    """Costs in the paper's abstract units (only their ratios matter) or in milliseconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    unit: Literal["abstract", "ms"] = Field("abstract", description="what the costs are counted in")

    lambda_mobile: float = Field(0.1, ge=0, description="cost of one layer on the mobile tier")
    lambda_edge: float = Field(0.1, ge=0, description="cost of one layer on the edge tier")
    lambda_cloud: float = Field(0.1, ge=0, description="cost of one layer on the cloud tier")
    o_1: float = Field(0.2, ge=0, description="offload cost mobile -> edge")
    o_2: float = Field(0.5, ge=0, description="offload cost mobile -> cloud (raw input too, unless o_cloud_only)")
    o_edge_cloud: float = Field(0.3, ge=0, description="offload cost edge -> cloud, for escalating methods")
    o_cloud_only: float | None = Field(None, ge=0, description="raw input -> cloud (cloud-only), if not o_2")
    fixed: float = Field(0.0, ge=0, description="paid by every request whatever its path (HTTP, ingress)")
    mu: float = Field(1.0, ge=0, description="weight of cost against confidence in the DIMEE reward")

    @model_validator(mode="after")
    def _baseline_costs_something(self) -> "CostModel":
        if self.raw_to_cloud == 0 and self.lambda_cloud == 0 and self.fixed == 0:
            raise ValueError("o_2 (or o_cloud_only), lambda_cloud and fixed are all 0: cloud-only would be free and "
                             "no saving is defined")
        return self

    @property
    def raw_to_cloud(self) -> float:
        """Offload cost of the raw input to cloud (the cloud-only path)."""
        return self.o_2 if self.o_cloud_only is None else self.o_cloud_only

    def path_costs(self, m: int, e: int, num_layers: int) -> dict[str, float]:
        mobile = self.fixed + self.lambda_mobile * m
        edge = mobile + self.o_1 + self.lambda_edge * (e - m)
        return {
            "mobile": mobile,
            "edge": edge,
            "cloud": mobile + self.o_2 + self.lambda_cloud * (num_layers - m),
            "edge_cloud": edge + self.o_edge_cloud + self.lambda_cloud * (num_layers - e),
            "cloud_only": self.fixed + self.raw_to_cloud + self.lambda_cloud * num_layers,
        }

    def costs_of(self, paths: np.ndarray, m: int, e: int, num_layers: int) -> np.ndarray:
        """Per-sample cost for an array of path indices into PATHS."""
        table = self.path_costs(m, e, num_layers)
        return np.array([table[p] for p in PATHS])[paths]


def load_cost_model(path: str | Path | None, **overrides: float | None) -> CostModel:
    """Defaults, then a JSON config file, then explicit (CLI) values that are not None."""
    values = json.loads(Path(path).read_text()) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CostModel(**values)
