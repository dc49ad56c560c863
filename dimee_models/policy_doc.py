"""What an artifact's policy.json says, typed (its sibling manifest.json is `Manifest`): the policy
served by default, the cost model and accuracy budget it was calibrated for, each policy's settings
and guarantee, the calibration curves, the tier boundaries calibration chose, and warnings. The
policies' tensors are in policy.safetensors (`dimee_models.policy.load_policies` reads both)."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, model_validator

from dimee_models.cost import CostModel
from dimee_models.wire import Wire


class Unlabeled(BaseModel):
    """Unlabelled texts the guarantee was also certified on (`dimee calibrate --unlabeled/--from-traffic`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str
    rows: int


class PolicyDoc(BaseModel):
    # extra="ignore": a document written by an older version still loads
    model_config = ConfigDict(frozen=True, extra="ignore")

    default: str
    cost_model: CostModel
    max_accuracy_drop_pp: float
    calibration_reference_accuracy: float | None = None
    policies: dict[str, dict]  # name -> {kind, exits, thresholds, risk?}: `Policy.to_json`
    curves: dict = {}
    warnings: list[str] = []
    boundaries: dict | None = None  # calibration's choice of the tier exits, with its candidates
    delta: float | None = None
    folds: int | None = None
    unlabeled: Unlabeled | None = None
    # what crosses the links (calibration chooses it where the links are known; older docs: float32 hidden states)
    wire: Wire = Wire()
    wire_choice: list[dict] | None = None  # each wire's point estimate on the training split, where calibration chose

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, doc: dict) -> dict:
        """Artifacts tuned before the rename call a boundary candidate's policy `variant`."""
        candidates = (doc.get("boundaries") or {}).get("candidates", [])
        if any("variant" in c for c in candidates):
            renamed = [{("policy" if k == "variant" else k): v for k, v in c.items()} for c in candidates]
            doc = {**doc, "boundaries": {**doc["boundaries"], "candidates": renamed}}
        return doc

    def to_json(self) -> str:
        """policy.json's text: the fields in the order above, those not set (None) left out."""
        return json.dumps({k: v for k, v in self.model_dump(mode="json").items() if v is not None}, indent=1) + "\n"
