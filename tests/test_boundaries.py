"""Tier boundaries chosen at calibration, on synthetic outputs whose exits are good from a known layer on."""

import numpy as np
import pytest

from dimee_models import calibration
from dimee_models.boundaries import boundary_pairs, choose_boundaries, parse_layers
from dimee_models.cost import CostModel
from dimee_models.outputs import ExitOutputs
from dimee_models.policy import EDGE_CLOUD, DirectCascadePolicy
from dimee_models.tiers import Tier

L, H = 6, 8


def outputs(n: int = 3000, good_from: int = 4, hard: float = 0.0, seed: int = 0) -> ExitOutputs:
    """Two classes; exits below `good_from` guess at chance with low confidence, exits from it on
    answer right with high confidence (the final exit always); a `hard` share only the final exit
    gets right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    is_hard = rng.random(n) < hard
    logits = np.zeros((n, L, 2), dtype=np.float32)
    for layer in range(1, L + 1):
        good = np.flatnonzero(~is_hard if layer >= good_from and layer < L else np.full(n, layer >= good_from))
        guess = np.setdiff1d(np.arange(n), good)
        logits[good, layer - 1, labels[good]] = 6.0
        logits[guess, layer - 1, rng.integers(0, 2, len(guess))] = 0.3
    z_layers = rng.normal(size=(n, L, H)).astype(np.float32)
    return ExitOutputs(logits, z_layers[:, 1], labels, 2, 4, z_layers)


def test_layer_ranges_and_pairs():
    assert parse_layers("1-4") == (1, 4) and parse_layers("3") == (3, 3)
    for bad in ("0-2", "4-1", "x", "1-"):
        with pytest.raises(ValueError, match="layer"):
            parse_layers(bad)
    assert len(boundary_pairs(6)) == 15 and (5, 6) in boundary_pairs(6)  # 1 <= m < e <= 6
    assert boundary_pairs(6, (1, 2), (4, 4)) == [(1, 4), (2, 4)]
    with pytest.raises(ValueError, match="no tier boundaries"):
        boundary_pairs(6, (5, 5), (3, 4))


def test_outputs_move_to_other_exits():
    out = outputs()
    moved = out.at(4, 6)
    assert moved.tier_exits() == (4, 6, 6)
    np.testing.assert_array_equal(moved.z, out.z_layers[:, 3])
    np.testing.assert_array_equal(moved.tier_predictions[:, 0], out.logits[:, 3].argmax(-1))
    with pytest.raises(ValueError, match="recompute"):
        ExitOutputs(out.logits, out.z, out.labels, 2, 4).at(3, 4)


def test_the_boundaries_are_chosen_on_other_rows_and_the_guarantee_uses_every_calibration_row():
    train, out = outputs(good_from=4, seed=1), outputs(good_from=4)
    choice = choose_boundaries(train, CostModel(), boundary_pairs(L), 0.3)
    assert choice.mobile_exit == 4  # the shallowest exit that is right: cheapest within the budget
    assert choice.choice_rows == len(train.labels)
    cal, default = calibration.calibrate_all(out, CostModel(), 0.3, 0.1, pairs=boundary_pairs(L), choice=train)
    policy = cal.policies[default]
    assert policy.mobile_exit == 4 and policy.risk.guaranteed
    assert policy.risk.n == len(out.labels)  # certified on all of the calibration rows: the choice saw none
    assert cal.boundaries["mobile"] == 4 and cal.boundaries["chosen_by"] == choice.policy
    assert cal.boundaries["chosen_on"] == "train"
    tiers, _ = policy.assign(out.at(4, policy.edge_exit).z, out.probs(4), out.probs(policy.edge_exit))
    assert (tiers == Tier.MOBILE).mean() > 0.95


def test_the_choice_follows_the_rows_it_is_given_not_the_calibration_rows():
    """Boundaries chosen where the training rows put them, although the calibration rows would
    choose otherwise: the calibration rows only certify."""
    cal, default = calibration.calibrate_all(outputs(good_from=4), CostModel(), 0.3, 0.1, pairs=boundary_pairs(L),
                                             choice=outputs(good_from=5, seed=1))
    assert cal.policies[default].mobile_exit == 5
    with pytest.raises(ValueError, match="training split"):
        calibration.calibrate_all(outputs(), CostModel(), 0.3, 0.1, pairs=boundary_pairs(L))


def test_bounds_keep_the_mobile_exit_where_the_device_can_hold_it():
    cal, default = calibration.calibrate_all(outputs(good_from=4), CostModel(), 0.3, 0.1,
                                             pairs=boundary_pairs(L, (1, 2)), choice=outputs(good_from=4, seed=1))
    assert cal.policies[default].mobile_exit <= 2


def test_where_hops_are_dear_the_two_tier_cascade_wins_and_where_every_split_loses_cloud_only_is_served():
    out = outputs(good_from=4, hard=0.2)
    dear_edge = CostModel(o_1=5.0)
    assert choose_boundaries(out, dear_edge, boundary_pairs(L), 0.3).policy == "dimee_direct_cascade"
    dear_layers = CostModel(lambda_mobile=10.0)  # mobile's layers dearer than cloud-only: no split pays
    _, default = calibration.calibrate_all(out, dear_layers, 0.3, 0.1, pairs=boundary_pairs(L), choice=out)
    assert default == calibration.NO_SPLIT


def test_an_edge_at_the_last_layer_hands_nothing_on_to_cloud():
    """Cloud would answer as edge did, one hop later: the escalating kinds escalate nothing there."""
    out = outputs(good_from=6).at(3, 6)  # edge is the only exit that is right
    cal, _ = calibration.calibrate_all(out, CostModel(), 0.3, 0.1)
    for name in ("dimee_cascade_constrained", "dimee_escalate_constrained", "dimee_cascade", "dimee_escalate"):
        policy = cal.policies[name]
        assert policy.thresholds["escalate"] == 0.0, name
        _, paths = policy.assign(out.z, out.probs(3), out.probs(6))
        assert not (paths == EDGE_CLOUD).any(), name
    assert (cal.policies["dimee_cascade_constrained"].assign(out.z, out.probs(3), out.probs(6))[0] == Tier.EDGE).mean() > 0.9


def unlabeled(out: ExitOutputs, disagree: float = 0.0, seed: int = 2) -> ExitOutputs:
    """`out` without labels; on a `disagree` share, the final exit answers the other class, surely."""
    rng = np.random.default_rng(seed)
    logits = out.logits.copy()
    flip = np.flatnonzero(rng.random(len(out.labels)) < disagree)
    logits[flip, -1] = logits[flip, -1, ::-1]
    return ExitOutputs(logits, out.z, np.full(len(out.labels), -1), out.mobile_exit, out.edge_exit, out.z_layers)


def test_unlabeled_texts_that_agree_with_the_final_exit_certify_what_too_few_labels_cannot():
    """600 labelled rows cannot certify 0.3 pp even with no loss ((1 - 0.003)^600 > 0.1); 1,000
    unlabelled rows on which the exits agree with the final exit can, and are counted apart."""
    out = outputs(600, good_from=4).at(4, 6)
    alone = calibration.calibrate(out, CostModel(), 0.3, delta=0.1).policies["dimee_direct_cascade_constrained"]
    assert not alone.risk.guaranteed
    more = unlabeled(outputs(1000, good_from=4, seed=1).at(4, 6))
    cal = calibration.calibrate(out, CostModel(), 0.3, delta=0.1, unlabeled=more)
    policy = cal.policies["dimee_direct_cascade_constrained"]
    assert policy.risk.guaranteed and policy.risk.n == 1600 and policy.risk.unlabeled == 1000
    tiers, _ = policy.assign(out.z, out.probs(4), out.probs(6))
    assert (tiers == Tier.MOBILE).mean() > 0.95


def test_unlabeled_texts_where_the_exits_disagree_with_the_final_exit_count_against_the_guarantee():
    out = outputs(600, good_from=4).at(4, 6)
    more = unlabeled(outputs(1000, good_from=4, seed=1).at(4, 6), disagree=0.05)
    assert calibration.disagreements(DirectCascadePolicy("p", 4, 6, 6, {"mobile": 0.0}, {}), more) > 30
    policy = calibration.calibrate(out, CostModel(), 0.3, delta=0.1, unlabeled=more).policies[
        "dimee_direct_cascade_constrained"]
    tiers, _ = policy.assign(out.z, out.probs(4), out.probs(6))
    assert (tiers == Tier.MOBILE).mean() < 0.05  # confident exits that disagree: nothing certified on mobile
