"""Tier boundaries chosen at calibration: which layer the mobile tier exits at, and the edge tier.

Every layer has a trained exit head and the cached outputs hold every exit's logits and pooled
representation, so any pair (m, e) can be scored without a forward pass. The two confidence
cascades (mobile -> edge -> cloud, and mobile -> cloud straight) are scored at every pair the
user's bounds allow, under the calibration's cost model (milliseconds from a cluster profile, or
the paper's abstract units).

Choosing the best of K certified settings on the same data would be a winner's curse: the choice
favours the candidate its data flattered. So the calibration split is cut in two, seeded: the
first part (CHOICE_SHARE) chooses the boundaries and the cascade kind by the point estimate of
the losses; the guarantee is then certified on the second part alone, which the choice never saw,
at the full delta (Learn then Test with a data split). `dimee evaluate --resamples` makes the
choice inside every redraw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dimee_models.cost import CostModel
from dimee_models.policy import ExitOutputs, cascade_candidates, choose, direct_cascade_candidates

CHOICE_SHARE = 0.3  # of the calibration rows, to choose the boundaries; the rest certify


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
    variant: str  # the cascade kind that chose them: dimee_cascade or dimee_direct_cascade
    certify_rows: np.ndarray  # calibration rows the choice did not see: the guarantee is certified on these
    candidates: list[dict]  # each candidate's point estimate on the choice rows

    def to_json(self, pairs: list[tuple[int, int]]) -> dict:
        return {"pairs": [list(p) for p in pairs], "mobile": self.mobile_exit, "edge": self.edge_exit,
                "chosen_by": self.variant, "choice_share": CHOICE_SHARE, "certify_rows": int(len(self.certify_rows)),
                "candidates": self.candidates}


def choose_boundaries(out: ExitOutputs, cost: CostModel, pairs: list[tuple[int, int]], max_drop_pp: float,
                      seed: int = 0) -> BoundaryChoice:
    """The pair and cascade kind whose cheapest setting within the budget (point estimate, losses
    alone) costs least on a seeded CHOICE_SHARE of `out`'s rows; ties go to the deeper mobile exit."""
    order = np.random.default_rng(seed).permutation(len(out.labels))
    cut = int(round(CHOICE_SHARE * len(order)))
    part = out.take(np.sort(order[:cut]))
    reference = float((part.tier_predictions[:, 2] == part.labels).mean())
    found = []
    for m, e in pairs:
        at = part.at(m, e)
        first_of_m = not any(f["mobile"] == m for f in found)  # the two-tier cascade does not depend on e
        for c in [cascade_candidates(at, cost)] + ([direct_cascade_candidates(at, cost)] if first_of_m else []):
            o = c.outcomes[choose(c.outcomes[:c.grid], reference, max_drop_pp, c.strict).constrained]
            found.append({"variant": c.variant, "mobile": m, "edge": e, "cost": o.cost, "losses": o.loss_count,
                          "tier_fraction": dict(zip(("mobile", "edge", "cloud"), o.fractions))})
    for m in {f["mobile"] for f in found}:  # the two-tier cascade never reaches edge: give it the best edge
        three = [f for f in found if f["mobile"] == m and f["variant"] == "dimee_cascade"]
        for f in found:
            if f["mobile"] == m and f["variant"] == "dimee_direct_cascade":
                f["edge"] = min(three, key=lambda t: t["cost"])["edge"]
    best = min(found, key=lambda f: (f["cost"], -f["mobile"]))
    return BoundaryChoice(best["mobile"], best["edge"], best["variant"], np.sort(order[cut:]), found)
