"""Tier boundaries: which layer the mobile tier exits at, and the edge tier.

Every layer has a trained exit head and the cached outputs hold every exit's logits and pooled
representation, so any pair (m, e) can be scored without a forward pass. The two confidence
cascades (mobile -> edge -> cloud, and mobile -> cloud straight) are scored at every pair the
user's bounds allow, under the calibration's cost model. The pair is chosen on the training
split's outputs, not the calibration split the guarantee is then certified on (docs/METHOD.md,
"Tier boundaries").
"""

from __future__ import annotations

from dataclasses import dataclass

from dimee_models.candidates import cascade_candidates, choose, direct_cascade_candidates
from dimee_models.cost import CostModel
from dimee_models.outputs import ExitOutputs


def parse_layers(value: str) -> tuple[int, int]:
    """`--mobile-layers 1-4` (or `3`): an inclusive range of 1-based layers; ValueError names the problem."""
    lo, sep, hi = value.partition("-")
    try:
        bounds = (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ValueError(f"expected a layer or a range of layers like 1-4, got {value!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"expected layers from 1 up, lowest first, got {value!r}")
    return bounds

def boundary_pairs(num_layers: int, mobile: tuple[int, int] | None = None,
                   edge: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Every (m, e) with 1 <= m < e <= L within the bounds (None: any), shallowest first."""
    m_lo, m_hi = mobile or (1, num_layers - 1)
    e_lo, e_hi = edge or (1, num_layers)
    pairs = [(m, e) for m in range(m_lo, min(m_hi, num_layers - 1) + 1)
             for e in range(max(e_lo, m + 1), min(e_hi, num_layers) + 1)]
    if not pairs:
        raise ValueError(f"no tier boundaries within --mobile-layers {m_lo}-{m_hi} and --edge-layers {e_lo}-{e_hi} "
                         f"for a model of {num_layers} layers (1 <= mobile < edge <= {num_layers})")
    return pairs

@dataclass(frozen=True)
class BoundaryChoice:
    mobile_exit: int
    edge_exit: int
    policy: str  # the cascade that chose them: dimee_cascade or dimee_direct_cascade
    choice_rows: int  # training-split rows the choice was made on
    candidates: list[dict]  # each candidate's point estimate on those rows

    def to_json(self, pairs: list[tuple[int, int]]) -> dict:
        return {"pairs": [list(p) for p in pairs], "mobile": self.mobile_exit, "edge": self.edge_exit,
                "chosen_by": self.policy, "chosen_on": "train", "choice_rows": self.choice_rows,
                "candidates": self.candidates}

def choose_boundaries(choice: ExitOutputs, cost: CostModel, pairs: list[tuple[int, int]],
                      max_drop_pp: float) -> BoundaryChoice:
    """The pair and cascade kind whose cheapest setting within the budget (point estimate, losses
    alone) costs least on `choice` (the training split's outputs); ties go to the deeper mobile exit."""
    reference = float((choice.reference == choice.labels).mean())
    found = []
    for m, e in pairs:
        at = choice.at(m, e)
        first_of_m = not any(f["mobile"] == m for f in found)  # the two-tier cascade does not depend on e
        for c in [cascade_candidates(at, cost)] + ([direct_cascade_candidates(at, cost)] if first_of_m else []):
            o = c.outcomes[choose(c.outcomes[:c.grid], reference, max_drop_pp, c.strict).constrained]
            found.append({"policy": c.name, "mobile": m, "edge": e, "cost": o.cost, "losses": o.loss_count,
                          "tier_fraction": dict(zip(("mobile", "edge", "cloud"), o.fractions))})
    for m in {f["mobile"] for f in found}:  # the two-tier cascade never reaches edge: give it the best edge
        three = [f for f in found if f["mobile"] == m and f["policy"] == "dimee_cascade"]
        for f in found:
            if f["mobile"] == m and f["policy"] == "dimee_direct_cascade":
                f["edge"] = min(three, key=lambda t: t["cost"])["edge"]
    best = min(found, key=lambda f: (f["cost"], -f["mobile"]))
    return BoundaryChoice(best["mobile"], best["edge"], best["policy"], len(choice.labels), found)
