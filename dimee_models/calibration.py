"""Calibration: from every policy kind's candidates (dimee_models/candidates.py), each kind's
reward-best setting and the cheapest within the accuracy budget (risk-controlled with a delta),
the tier boundaries (dimee_models/boundaries.py), the policy served by default, and the policies
saved in the artifact.

Choosing the best of K certified settings on the same data would be a winner's curse: the choice
favours the candidate its data flattered. So the boundaries and the cascade kind are chosen on
other data, the training split's outputs (by the point estimate of the losses), and the guarantee
is certified on the whole calibration split, which the choice never saw, at the full delta (Learn
then Test with the choice made before the calibration data are seen). `dimee evaluate --resamples`
recalibrates every redraw the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from dimee_models import artifact
from dimee_models.boundaries import choose_boundaries
from dimee_models.candidates import Candidates, Outcome, choose, score, score_candidates
from dimee_models.cost import CostModel
from dimee_models.data import TextDataset, read_texts
from dimee_models.manifest import Exits, PolicyRef
from dimee_models.outputs import ExitOutputs, OutputSource
from dimee_models.policy import POLICY_JSON, POLICY_TENSORS, CloudOnlyPolicy, Policy
from dimee_models.policy_doc import PolicyDoc, Unlabeled
from dimee_models.risk import DEFAULT_DELTA, RiskBound, fixed_sequence
from dimee_models.tiers import Tier
from dimee_models.wire import CARRIERS, FORMATS, Slice, Wire


def disagreements(policy: Policy, out: ExitOutputs) -> int:
    """Samples of `out` (at the policy's exits) the policy answers otherwise than the final exit."""
    _, paths = policy.assign(out.z, out.probs(policy.mobile_exit), out.probs(policy.edge_exit))
    return int((out.answers(paths) != out.reference).sum())

def certify(c: Candidates, max_drop_pp: float, delta: float,
            unlabeled: ExitOutputs | None = None) -> tuple[int, RiskBound]:
    """Risk control (dimee_models/risk.py): fixed-sequence testing along `c.path` (fixed before the
    data are seen, safest first) certifies the loss rate within the budget with probability >= 1 -
    delta; the index of the cheapest setting certified, and its bound. `unlabeled` rows (at the
    calibration's exits) add to the test, each counting when the setting's answer differs from the
    final exit's."""
    losses, n = [o.loss_count for o in c.outcomes], c.outcomes[0].n
    if unlabeled is not None:
        for i in c.path:
            losses[i] += disagreements(c.make(c.name, i, None), unlabeled)
        n += len(unlabeled.labels)
    return fixed_sequence(c.path, [o.cost for o in c.outcomes], losses, n, max_drop_pp / 100, delta,
                          0 if unlabeled is None else len(unlabeled.labels))

@dataclass
class Calibration:
    """Everything `calibrate` decided, with the curves behind each decision."""

    policies: dict[str, Policy]
    curves: dict[str, list[dict]]
    reference_accuracy: float
    warnings: list[str]
    boundaries: dict | None = None  # how the tier boundaries were chosen, when calibration chose them

def calibrate(out: ExitOutputs, cost: CostModel, max_drop_pp: float = 0.3, k: int = 5, seed: int = 0,
              delta: float | None = None, candidates: list[Candidates] | None = None,
              unlabeled: ExitOutputs | None = None) -> Calibration:
    """Every policy kind's reward-best and constrained policy; `delta` makes the constrained
    choice risk-controlled (None: the point estimate on the calibration split), certified on `out`
    and the `unlabeled` rows too if given (`certify`). `candidates`:
    `score_candidates(out, cost, k, seed)` computed once for several budgets or deltas."""
    candidates = candidates or score_candidates(out, cost, k, seed)
    reference = float((out.reference == out.labels).mean())
    policies, curves, warnings = {}, {}, []
    for c in candidates:
        point = choose(c.outcomes[:c.grid], reference, max_drop_pp, c.strict)
        constrained, risk = point.constrained, None
        if delta is not None:
            constrained, risk = certify(c, max_drop_pp, delta, unlabeled)
        policies[c.name] = c.make(c.name, point.by_reward, None)
        policies[f"{c.name}_constrained"] = c.make(f"{c.name}_constrained", constrained, risk)
        curves[c.name] = c.curve
    for name, pol in policies.items():
        tiers, _ = pol.assign(out.z, out.probs(out.mobile_exit), out.probs(out.edge_exit))
        fractions = np.bincount(tiers, minlength=3) / len(out.labels)
        if fractions.max() >= 0.95:
            warnings.append(
                f"{name}: sends {fractions.max():.0%} of calibration samples to {Tier(int(fractions.argmax())).label}"
                f" (mu={cost.mu}); the reward may be dominated by cost or by confidence"
            )
    return Calibration(policies, curves, reference, warnings)

# With a guarantee, the served default is the first guaranteed policy in this order, fixed in
# advance: taking the cheapest of several guaranteed ones would take the one its calibration data
# flattered most, and it held the budget on fewer redraws than each kind alone (docs/METHOD.md, "The served default").
# Where calibration chose the boundaries, the kind that chose them comes first.
GUARANTEED_PREFERENCE = ("dimee_cascade_constrained", "dimee_direct_cascade_constrained",
                         "dimee_escalate_constrained", "dimee_learned_constrained", "dimee_constrained")

def calibrate_all(out: ExitOutputs, cost: CostModel, max_drop_pp: float, delta: float | None, folds: int = 5,
                  seed: int = 0, default: str | None = None, candidates: list[Candidates] | None = None,
                  pairs: list[tuple[int, int]] | None = None, choice: ExitOutputs | None = None,
                  unlabeled: ExitOutputs | None = None, prefer: str | None = None) -> tuple[Calibration, str]:
    """Every policy kind calibrated on `out`, and the policy to serve by default: with
    the point estimate, the cheapest constrained policy on these outputs (never the test split);
    with a guarantee, the first guaranteed one of GUARANTEED_PREFERENCE (else the first); either,
    unless no split is cheaper than cloud-only (`no_split_if_cheaper`). With several boundary
    `pairs`, the `choice` outputs (the training split's) choose the tier boundaries first
    (`choose_boundaries`) and all of `out` is calibrated on, at the chosen exits
    (`Calibration.boundaries` says which; `prefer`: the kind that chose them, where that was done
    before). `unlabeled` outputs add to the guarantee (`certify`)."""
    chosen = None
    if pairs is not None and len(pairs) > 1:
        if choice is None:
            raise ValueError("choosing among several tier boundaries needs the outputs to choose on (the training split's)")
        chosen = choose_boundaries(choice, cost, pairs, max_drop_pp)
        out, candidates = out.at(chosen.mobile_exit, chosen.edge_exit), None
    elif pairs is not None and pairs[0] != out.tier_exits()[:2]:
        out, candidates = out.at(*pairs[0]), None
    cal = calibrate(out, cost, max_drop_pp, folds, seed, delta, candidates,
                    None if unlabeled is None else unlabeled.at(out.mobile_exit, out.edge_exit))
    if chosen is not None:
        cal.boundaries = chosen.to_json(pairs)
    if default is not None:
        if default not in cal.policies:
            raise ValueError(f"unknown policy {default!r}; choose one of {sorted(cal.policies)}")
        return cal, default
    if delta is None:
        constrained = [name for name in cal.policies if name.endswith("_constrained")]
        default = min(constrained, key=lambda name: policy_outcome(out, cal.policies[name], cost).cost)
    else:
        prefer = chosen.policy if chosen else prefer
        order = ((f"{prefer}_constrained",) if prefer else ()) + GUARANTEED_PREFERENCE
        default = next((name for name in order if cal.policies[name].risk.guaranteed), order[0])
    return cal, no_split_if_cheaper(out, cal, cost, default, delta, max_drop_pp)

NO_SPLIT = "dimee_cloud_only"

def no_split_if_cheaper(out: ExitOutputs, cal: Calibration, cost: CostModel, default: str, delta: float | None,
                        max_drop_pp: float) -> str:
    """`default`, unless on the calibration split it costs no less than cloud-only: then a policy
    that sends every text to cloud (added to `cal` as NO_SPLIT) is served instead."""
    chosen = policy_outcome(out, cal.policies[default], cost).cost
    baseline = cost.path_costs(*out.tier_exits())["cloud_only"]
    if chosen < baseline:
        return default
    # It answers every sample with the final exit, so it loses none: the bound is 0, not estimated.
    risk = None if delta is None else RiskBound(delta, max_drop_pp, len(out.labels), 0, 0.0, True)
    cal.policies[NO_SPLIT] = CloudOnlyPolicy(NO_SPLIT, out.mobile_exit, out.edge_exit, out.num_layers, {}, {}, risk)
    cal.warnings.append(f"no DIMEE policy costs less than cloud-only under this cost model: {default} costs "
                        f"{chosen:.4g} against {baseline:.4g} ({cost.unit}) per sample on the calibration split, so "
                        f"{NO_SPLIT} (every text to cloud) is served by default")
    return NO_SPLIT

def policy_outcome(out: ExitOutputs, policy: Policy, cost: CostModel) -> Outcome:
    tiers, paths = policy.assign(out.z, out.probs(out.mobile_exit), out.probs(out.edge_exit))
    return score(out, tiers, cost, paths)

def save_policies(directory: Path, cal: Calibration, cost: CostModel, default: str, max_drop_pp: float,
                  **more) -> PolicyDoc:
    """Write policy.safetensors and policy.json (`more`: PolicyDoc's delta, folds, unlabeled)."""
    tensors = {f"{name}/{key}": value for name, pol in cal.policies.items() for key, value in pol.tensors.items()}
    save_file(tensors, directory / POLICY_TENSORS)
    doc = PolicyDoc(default=default, cost_model=cost, max_accuracy_drop_pp=max_drop_pp,
                    calibration_reference_accuracy=cal.reference_accuracy,
                    policies={name: pol.to_json() for name, pol in cal.policies.items()}, curves=cal.curves,
                    warnings=cal.warnings, boundaries=cal.boundaries or None, **more)
    (directory / POLICY_JSON).write_text(doc.to_json())
    return doc

def wire_cost(cost: CostModel, savings: dict[str, dict[str, float]] | None, wire: Wire, mobile_exit: int) -> CostModel:
    """`cost` (float32 hidden states) for a deployment whose links carry `wire`: each hop less what the
    format saves (`profile.wire_savings`); a text sent straight to cloud as token ids pays cloud-only's
    hop, and cloud runs the mobile layers again."""
    update = {hop: getattr(cost, hop) - ms for hop, ms in savings[wire.format].items()} if savings else {}
    if wire.carrier == "tokens":
        update["o_2"] = cost.raw_to_cloud + cost.lambda_cloud * mobile_exit
    return cost.model_copy(update=update)


def choose_wire(source: OutputSource, mobile_exit: int, edge_exit: int, cost: CostModel,
                savings: dict[str, dict[str, float]], max_drop_pp: float,
                mobile_slice: Slice = "float32") -> tuple[Wire, list[dict]]:
    """The format and carrier whose cheapest cascade within the budget (point estimate, as
    `choose_boundaries`) costs least on the training split's outputs as served over it (from a mobile
    slice in `mobile_slice`'s arithmetic); ties go to the first of FORMATS x CARRIERS, float32 and the
    hidden state first."""
    found = []
    for wire in (Wire(format=f, carrier=c, mobile_slice=mobile_slice) for f in FORMATS for c in CARRIERS):
        served = source.wire_split("train", mobile_exit, edge_exit, wire)
        best = choose_boundaries(served, wire_cost(cost, savings, wire, mobile_exit), [(mobile_exit, edge_exit)],
                                 max_drop_pp)
        [row] = [c for c in best.candidates if c["policy"] == best.policy]
        found.append({**wire.model_dump(), "policy": best.policy, "cost": row["cost"], "losses": row["losses"]})
    pick = min(found, key=lambda f: f["cost"])
    return Wire(format=pick["format"], carrier=pick["carrier"], mobile_slice=mobile_slice), found

def write_calibration(directory: Path, cost: CostModel, max_drop_pp: float, folds: int = 5, seed: int = 0,
                      default: str | None = None, delta: float | None = DEFAULT_DELTA,
                      pairs: list[tuple[int, int]] | None = None, unlabeled: Path | None = None,
                      wire: Wire | None = None, savings: dict[str, dict[str, float]] | None = None,
                      mobile_slice: Slice = "float32") -> PolicyDoc:
    """Calibrate every policy kind on the calibration split and store the policies in the artifact; with
    boundary `pairs` (`boundary_pairs`), also the tier weight files cut at the chosen exits; with an
    `unlabeled` file of texts (`data.read_texts`), certified on those too. What crosses the links is
    `wire`, else chosen (`choose_wire`) where the links are known (`savings`: `profile.wire_savings`),
    else float32 hidden states, from a mobile slice in `mobile_slice`'s arithmetic unless `wire` says;
    the outputs calibrated and certified on are those served over it.
    The model is loaded at most once, the manifest written once, last."""
    source = OutputSource(directory)
    manifest = source.manifest
    out = source.split("calibration")
    choice = source.split("train") if (pairs is not None and len(pairs) > 1) or savings else None
    texts, about = None, None
    if unlabeled is not None:
        if delta is None:
            raise ValueError("--unlabeled texts add to the guarantee: they need a --delta")
        lines = read_texts(unlabeled)
        texts = TextDataset("unlabeled", lines, [-1] * len(lines), manifest.labels)
        about = Unlabeled(file=str(Path(unlabeled).resolve()), rows=len(texts))
    boundaries, prefer, wire_choice = None, None, None
    if wire is not None or savings or mobile_slice != "float32":
        m, e = pairs[0] if pairs else out.tier_exits()[:2]
        if pairs is not None and len(pairs) > 1:
            chosen = choose_boundaries(choice, cost, pairs, max_drop_pp)
            m, e, prefer, boundaries = chosen.mobile_exit, chosen.edge_exit, chosen.policy, chosen.to_json(pairs)
        if wire is None and savings:
            wire, wire_choice = choose_wire(source, m, e, cost, savings, max_drop_pp, mobile_slice)
        wire = wire or Wire(mobile_slice=mobile_slice)
        cost, pairs = wire_cost(cost, savings, wire, m), [(m, e)]
        out = source.wire_split("calibration", m, e, wire)
    served = None if texts is None else source.served(texts, wire or Wire(), pairs[0] if wire else None)
    cal, default = calibrate_all(out, cost, max_drop_pp, delta, folds, seed, default, pairs=pairs, choice=choice,
                                 unlabeled=served, prefer=prefer)
    cal.boundaries = cal.boundaries or boundaries
    exits = Exits(mobile=cal.policies[default].mobile_exit, edge=cal.policies[default].edge_exit)
    if exits != manifest.exits:
        tiers = artifact.write_tiers(directory, source.model[0], exits.mobile, exits.edge)
        manifest = manifest.model_copy(update={"exits": exits, "tiers": tiers})
    doc = save_policies(directory, cal, cost, default, max_drop_pp, delta=delta, folds=folds, unlabeled=about,
                        wire=wire or Wire(), wire_choice=wire_choice)
    artifact.write_manifest(directory, manifest.model_copy(update={"policy": PolicyRef(default=default,
                                                                                        file="policy.json")}))
    return doc
