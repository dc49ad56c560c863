"""The router's live settings without a cluster: what a user_config may change, and what it is refused."""

import json
import shutil

import numpy as np

import pytest

from deployments.settings import boundaries_info, build_settings
from deployments.schemas import AppArgs, RouterConfig
from dimee_models import artifact
from dimee_models.cost import CostModel
from dimee_models.policy import load_policies
from dimee_models.policy_doc import PolicyDoc
from dimee_models.wire import Wire


def settings(served_artifact, config: dict, policy: str | None = None):
    args = AppArgs(artifact=str(served_artifact), policy=policy)
    return build_settings(RouterConfig.model_validate(config), args, artifact.read_manifest(served_artifact),
                          served_artifact)


def test_an_empty_config_serves_the_artifact_as_calibrated(served_artifact):
    _, doc = load_policies(served_artifact)
    s = settings(served_artifact, {})
    assert s.policy.name == doc.default and s.cost == doc.cost_model and s.hop_timeout_s == 2.0
    assert settings(served_artifact, {}, policy="three_way").policy.name == "three_way"
    assert s.path_cost["cloud_only"] == pytest.approx(s.cost.o_2 + 6 * s.cost.lambda_cloud)


def test_the_calibrated_guarantee_is_served_and_dropped_with_other_thresholds(served_artifact):
    s = settings(served_artifact, {"policy": "dimee_learned_constrained"})
    assert s.policy.risk is not None and s.policy.risk.delta == 0.1 and s.policy.risk.budget_pp == 0.3
    assert settings(served_artifact, {"policy": "dimee_learned_constrained",
                                      "thresholds": {"mobile": 0.5, "edge": 0.5}}).policy.risk is None


def test_thresholds_cost_model_and_timeout_change_live(served_artifact):
    s = settings(served_artifact, {"policy": "dimee_learned", "thresholds": {"mobile": 0.2, "edge": 0.4},
                                   "cost_model": {"o_2": 0.9}, "hop_timeout_s": 0.5, "request_timeout_s": 1.5})
    assert s.policy.thresholds == {"mobile": 0.2, "edge": 0.4} and s.hop_timeout_s == 0.5
    assert s.request_timeout_s == 1.5
    assert s.path_cost["cloud"] == pytest.approx(2 * 0.1 + 0.9 + 4 * 0.1)
    assert load_policies(served_artifact)[0]["dimee_learned"].thresholds != s.policy.thresholds  # stored one untouched
    s = settings(served_artifact, {"policy": "dimee_escalate", "thresholds": {"mobile": 1, "edge": 0, "escalate": 0.9}})
    assert s.policy.escalates and s.policy.escalate(np.array([[0.85, 0.15], [0.95, 0.05]])).tolist() == [True, False]


@pytest.mark.parametrize("config,message", [
    ({"policy": "fastest"}, "policy 'fastest' is not in"),
    ({"policy": "three_way", "thresholds": {"alpha": 0.5}}, "nearest centroid and has no thresholds"),
    ({"policy": "dimee_learned", "thresholds": {"mobile": 0.5}}, "thresholds must set exactly"),
    ({"policy": "dimee_escalate", "thresholds": {"mobile": 0.5, "edge": 0.5}}, "thresholds must set exactly"),
])
def test_configs_the_artifact_cannot_serve_are_refused(served_artifact, config, message):
    with pytest.raises(ValueError, match=message):
        settings(served_artifact, config)


def test_a_recalibrated_copy_can_be_switched_to_but_other_weights_cannot(served_artifact, tmp_path):
    copy = tmp_path / "recalibrated"
    shutil.copytree(served_artifact, copy)
    assert settings(served_artifact, {"policy_artifact": str(copy), "policy": "three_way"}).policy.name == "three_way"
    tampered = tmp_path / "other-weights"
    shutil.copytree(served_artifact, tampered)
    (tampered / "edge.safetensors").write_bytes((tampered / "edge.safetensors").read_bytes() + b" ")
    artifact.write_manifest(tampered, artifact.read_manifest(tampered, verify=False))
    with pytest.raises(ValueError, match="other weights than the served artifact"):
        settings(served_artifact, {"policy_artifact": str(tampered)})
    with pytest.raises(ValueError):
        settings(served_artifact, {"policy_artifact": str(tmp_path / "missing")})
    doc = PolicyDoc.model_validate_json((copy / "policy.json").read_text())
    (copy / "policy.json").write_text(doc.model_copy(update={"wire": Wire(mobile_slice="int8")}).to_json())
    artifact.write_manifest(copy, artifact.read_manifest(copy, verify=False))
    with pytest.raises(ValueError, match="certified on a mobile slice in int8; this deployment runs one in float32"):
        settings(served_artifact, {"policy_artifact": str(copy)})


def test_info_says_where_the_model_is_cut_and_why(served_artifact, tmp_path):
    assert boundaries_info(load_policies(served_artifact)[1], 6) == {"chosen_by": "training"}
    from dimee_models.calibration import write_calibration

    out = shutil.copytree(served_artifact, tmp_path / "chosen")
    cost = CostModel(unit="ms", fixed=10.0, lambda_mobile=3.0, lambda_edge=3.0, lambda_cloud=2.0, o_1=4.0, o_2=4.0,
                     o_edge_cloud=4.0, o_cloud_only=4.0, mu=0.05)
    doc = write_calibration(out, cost, 0.3, pairs=[(m, e) for m in range(1, 6) for e in range(m + 1, 7)])
    info = boundaries_info(doc, 6)
    assert info["chosen_by"] == "calibration" and info["unit"] == "ms" and info["candidates"] >= 15
    assert info["chosen_on"] == "train" and (out / "outputs" / "train.safetensors").is_file()
    assert info["cloud_only_cost"] == pytest.approx(10 + 4 + 6 * 2)
    assert info["policy"] == doc.boundaries["chosen_by"] and info["expected_cost"] > 10
    # a document written before a candidate's kind was called `policy` (`variant`), without the
    # fields added since (delta, folds), still loads and reads the same
    old = json.loads((out / "policy.json").read_text())
    for c in old["boundaries"]["candidates"]:
        c["variant"] = c.pop("policy")
    for key in ("delta", "folds"):
        del old[key]
    (out / "policy.json").write_text(json.dumps(old))
    again = load_policies(out)[1]
    assert boundaries_info(again, 6) == info and again.delta is None and again.boundaries == doc.boundaries


def test_the_ingress_counts_what_info_shows_since_start():
    from deployments.metrics import RouterMetrics
    from deployments.schemas import Prediction
    from dimee_models.tiers import Tier

    m = RouterMetrics()  # Serve's metrics record without a cluster, into nothing
    assert m.since_start() == {"shed": {}, "shadow_checks": {}, "hop_failures": {}, "served_cost": {}}
    m.request("dimee")
    m.decided(np.array([Tier.MOBILE, Tier.EDGE, Tier.EDGE]))
    for where in ("ingress", "cloud", "cloud"):
        m.shed(where)
    m.hop_failed(Tier.EDGE, "timeout")
    m.shadow("agreed", 3)
    m.shadow("dropped", 0)  # nothing to count: not shown
    m.shadow("dropped", 2)

    def answer(tier: str, cost: float, **flags) -> Prediction:
        return Prediction(label="pos", label_id=0, confidence=0.9, tier=tier, exit_layer=2, cost=cost, **flags)

    m.answered("dimee", [answer("mobile", 0.2), answer("cloud", 1.1, escalated=True)], "abstract")
    m.answered("cloud_only", [answer("mobile", 0.2, degraded=True)], "ms")
    assert m.since_start() == {
        "shed": {"ingress": 1, "cloud": 2}, "shadow_checks": {"agreed": 3, "dropped": 2}, "hop_failures": {"edge/timeout": 1},
        "served_cost": {"dimee/abstract": {"answers": 2, "mean": pytest.approx(0.65)},
                        "cloud_only/ms": {"answers": 1, "mean": pytest.approx(0.2)}}}


def test_the_live_bound_watches_the_served_policy_its_path_and_budget(served_artifact):
    s = settings(served_artifact, {"policy": "drifting", "shadow_rate": 0.5, "on_drift": "alarm"})
    assert s.shadow_rate == 0.5 and s.watch == {
        "artifact": str(served_artifact), "policy": "drifting", "thresholds": {"mobile": 0.0}, "path_index": 131,
        "on_drift": "alarm", "budget_pp": 0.3, "delta": 0.1}
    assert settings(served_artifact, {"policy": "three_way"}).watch["path_index"] is None  # no path to step along
    assert settings(served_artifact, {"policy": "drifting", "thresholds": {"mobile": 0.5}}).watch["path_index"] is None
    assert settings(served_artifact, {}).shadow_rate == 0.02 and settings(served_artifact, {}).watch["on_drift"] == "tighten"


@pytest.mark.parametrize("config, message", [({"shadow_rate": 1.5}, "shadow_rate"), ({"on_drift": "panic"}, "on_drift")])
def test_bad_live_bound_settings_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig.model_validate(config)


def test_a_shadow_check_is_dropped_whole_when_there_is_no_room(served_artifact):
    """Dropping is decided before a request's audited samples are looked at, and counted: the
    bound must not lose early answers more often than cloud ones."""
    import asyncio

    from deployments.metrics import RouterMetrics
    from deployments.schemas import Prediction
    from deployments.shadow import ShadowAuditor

    tasks = []
    auditor = ShadowAuditor(None, None, RouterMetrics(), lambda work: tasks.append(work))
    s = settings(served_artifact, {"shadow_rate": 1.0, "max_texts_in_flight": 64})
    answers = [Prediction(label="a", label_id=0, confidence=1.0, tier=t, exit_layer=2, cost=1.0)
               for t in ("mobile", "cloud")] + [Prediction(label="a", label_id=0, confidence=1.0, tier="cloud",
                                                           exit_layer=2, cost=1.0, degraded=True)]
    auditor.audit(answers, None, s, None, ["a", "b", "c"], None, 60)  # 60 of 64 texts in flight: past the room
    assert auditor.metrics.since_start()["shadow_checks"] == {"dropped": 2} and not tasks
    auditor.in_flight = 1  # one shadow check in flight already
    auditor.audit(answers, None, s, None, ["a", "b", "c"], None, 1)
    assert auditor.metrics.since_start()["shadow_checks"] == {"dropped": 4} and not tasks

    recorded = []

    async def fake_check(rows, *args):
        recorded.append(rows)
    auditor.in_flight, auditor.check = 0, fake_check
    auditor.audit(answers, None, s, None, ["a", "b", "c"], None, 1)
    asyncio.run(tasks.pop())
    assert recorded == [[0, 1]] and auditor.in_flight == 1  # the degraded answer is no policy's


def test_a_controller_that_does_not_answer_takes_one_thread_and_no_request(monkeypatch):
    """With the head away, Serve's controller never answers: a read of it waits in one thread, and
    every other asker gets None after its timeout instead of starting another (which would take the
    default pool's threads one per second, until requests waiting for one hung)."""
    import asyncio
    import threading

    from deployments.dispatch import Dispatcher

    release, started = threading.Event(), []

    def hanging():
        started.append(1)
        release.wait(10)
        return {}

    tiers = Dispatcher.__new__(Dispatcher)
    tiers.replicas_read = None
    monkeypatch.setattr(tiers, "live_replicas", hanging)

    async def ask():
        return await asyncio.gather(*(tiers.replica_counts(timeout_s=0.2) for _ in range(5)),
                                    tiers.replica_counts(timeout_s=0.3))
    assert asyncio.run(ask()) == [None] * 6 and len(started) == 1
    release.set()


def test_the_text_budget_shrinks_while_answers_come_late_and_grows_back_once_they_do_not():
    from types import SimpleNamespace

    from deployments.router import TextBudget

    s = SimpleNamespace(request_timeout_s=3.0, max_texts_in_flight=64)
    budget = TextBudget()
    budget.answered(16, 0.9, s)  # well within the deadline: the configured budget
    assert budget.limit(64) == 64
    for _ in range(30):  # answers past half the deadline: less admitted, never below the floor
        budget.answered(16, 1.5, s)
    assert budget.limit(64) == TextBudget.FLOOR
    texts = 0
    while budget.limit(64) < 64:  # a text more per budget's worth of texts answered in time
        budget.answered(16, 0.2, s)
        texts += 16
    assert 64 * 56 / 2 < texts < 64 * 56
    assert budget.limit(8) == 8  # a budget set lower live is kept
