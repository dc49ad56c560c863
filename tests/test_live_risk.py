"""The live bound: its confidence sequence, the state machine that responds to drift, and a
policy's steps along risk control's path."""

import numpy as np
import pytest

from deployments.live_risk import FIRST_PROBATION, WINDOW, LiveRisk
from dimee_models.policy import CascadePolicy, CentroidPolicy, DirectCascadePolicy, EscalatePolicy, LearnedPolicy
from dimee_models.risk import RISK_PATH, RiskBound, confidence_sequence

BUDGET = 0.003
RISK = RiskBound(0.1, 0.3, 2000, 2, 0.25, True)


def watch(path_index: int | None = 58, on_drift: str = "tighten") -> dict:
    return {"artifact": "a", "policy": "p", "thresholds": {"mobile": 0.73}, "path_index": path_index,
            "on_drift": on_drift, "budget_pp": 100 * BUDGET, "delta": 0.1}


def test_the_sequence_holds_the_rate_at_every_n_and_narrows():
    for ones, n in ((0, 1), (3, 100), (40, 20000), (500, 1000)):
        low, high = confidence_sequence(ones, n, 0.1, BUDGET)
        assert low <= ones / n <= high
    assert confidence_sequence(0, 0, 0.1, BUDGET) == (0.0, 1.0)
    widths = [np.subtract(*confidence_sequence(n // 500, n, 0.1, BUDGET)[::-1]) for n in (1000, 10000, 100000)]
    assert widths[0] > widths[1] > widths[2]
    # wider than a fixed-n interval: that is the price of reading it after every sample
    from dimee_models.risk import loss_ucb
    assert confidence_sequence(20, 10000, 0.1, BUDGET)[1] > loss_ucb(20, 10000, 0.1)


def test_watched_after_every_sample_it_alarms_by_chance_at_most_delta_of_the_time():
    rng = np.random.default_rng(0)
    streams, n, alarms = 200, 3000, 0
    for _ in range(streams):  # the worst case: the rate exactly at the budget
        ones = np.cumsum(rng.random(n) < BUDGET)
        alarms += any(confidence_sequence(int(k), i + 1, 0.1, BUDGET)[0] > BUDGET for i, k in
                      list(enumerate(ones))[::25])
    assert alarms / streams <= 0.1


def test_drift_tightens_halfway_each_alarm_and_steps_forward_on_probation():
    live = LiveRisk()
    state = live.record(watch(), 58, WINDOW, 5)
    assert state["state"] == "ok" and state["threshold"] == pytest.approx(0.73) and state["ucb_pp"] < 0.3
    state = live.record(watch(), 58, 100, 10)  # 10 of 100 disagree: drift, seen in a new window
    assert state["state"] == "tightened" and state["path_index"] == 29 and state["samples"] == 0
    assert state["sequence"] == 3 and state["sequence_delta"] == pytest.approx(0.1 / 12)
    assert state["changes"][-1]["from"] == pytest.approx(0.73) and state["changes"][-1]["to"] == RISK_PATH[29]
    assert live.record(watch(), 58, 100, 50)["path_index"] == 29  # counts from a replica still at 58: not this one's
    assert live.record(watch(), 29, 100, 20)["path_index"] == 14  # still drifting: halfway again
    state = live.record(watch(), 14, FIRST_PROBATION // 2, 0)
    assert state["path_index"] == 14 and state["ucb_pp"] > 0.3  # not yet shown within the budget
    state = live.record(watch(), 14, 4000, 0)
    assert state["path_index"] == 36 and state["state"] == "tightened"  # probation, halfway back to 58
    state = live.record(watch(), 36, 100, 20)  # the probation fails: back, and the next waits twice as long
    assert state["path_index"] == 18 and live.probation == 2 * FIRST_PROBATION
    while state["path_index"] != 58:  # traffic back to normal: forward on probation up to the calibrated setting
        state = live.record(watch(), state["path_index"], 4000, 0)
    assert state["state"] == "ok" and len(state["changes"]) == 10  # 4 above, then 18, 38, 48, 53, 56, 57, 58


def test_with_on_drift_alarm_or_no_path_it_only_reports():
    for w in (watch(on_drift="alarm"), watch(path_index=None)):
        live = LiveRisk()
        state = live.record(w, w["path_index"], 100, 10)
        assert state["state"] == "alarm" and state["path_index"] == w["path_index"] and state["lcb_pp"] > 0.3
        assert live.record(w, w["path_index"], 100000, 10)["state"] == "ok"  # the drift passed
    live = LiveRisk()
    live.record(watch(), 58, 100, 10)
    assert live.record(watch(on_drift="alarm"), 58, 1, 0)["samples"] == 1  # new settings, a new sequence


@pytest.mark.parametrize("policy, moved", [
    (DirectCascadePolicy("d", 4, 6, 6, {"mobile": 0.73}, {}, RISK), {"mobile": 0.93}),
    (CascadePolicy("c", 2, 4, 6, {"mobile": 0.73, "escalate": 0.73}, {}, RISK), {"mobile": 0.93, "escalate": 0.93}),
    (CascadePolicy("c", 4, 6, 6, {"mobile": 0.73, "escalate": 0.0}, {}, RISK), {"mobile": 0.93, "escalate": 0.0}),
    (LearnedPolicy("l", 2, 4, 6, {"mobile": 0.73, "edge": 0.73}, {}, RISK), {"mobile": 0.93, "edge": 0.93}),
    (EscalatePolicy("e", 2, 4, 6, {"mobile": 0.73, "edge": 0.0, "escalate": 0.73}, {}, RISK),
     {"mobile": 0.93, "edge": 0.0, "escalate": 0.93}),
])
def test_a_policy_steps_along_its_risk_path(policy, moved):
    assert policy.path_index() == 58 and RISK_PATH[58] == pytest.approx(0.73)
    assert policy.at_path(29).thresholds == pytest.approx(moved)
    if not isinstance(policy, LearnedPolicy):  # (the learned kinds' gates need their regressions to route)
        mobile_probs = np.array([[0.2, 0.8], [0.0, 1.0]])
        assert (policy.at_path(0).route(np.zeros((2, 1)), mobile_probs) != 0).all()  # index 0: nothing on mobile


def test_a_policy_off_the_path_has_no_index():
    assert DirectCascadePolicy("d", 4, 6, 6, {"mobile": 0.73}, {}).path_index() is None  # no guarantee: set by hand
    assert DirectCascadePolicy("d", 4, 6, 6, {"mobile": 0.7312}, {}, RISK).path_index() is None
    assert CentroidPolicy("c", 2, 4, 6, {"alpha": 0.73}, {}, RISK).path_index() is None


def test_the_simulation_alarms_exactly_where_the_monitor_does():
    """analysis/live_bound_simulation.py checks the alarm by the martingale directly (fast); the
    monitor by the sequence's lower end. Both on the same streams, sample by sample."""
    from analysis.live_bound_simulation import alarms_of_sequence

    rng = np.random.default_rng(1)
    for rate in (0.0, 0.003, 0.01, 0.03):
        x = rng.random(600) < rate
        live, first = LiveRisk(), None
        for i, one in enumerate(x):
            if live.record(watch(on_drift="alarm"), 58, 1, int(one))["state"] == "alarm":
                first = i
                break
        assert (first is not None) == alarms_of_sequence(x, BUDGET, 0.1)
        if first is not None:
            assert alarms_of_sequence(x[:first + 1], BUDGET, 0.1) and not alarms_of_sequence(x[:first], BUDGET, 0.1)
