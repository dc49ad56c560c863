"""DIMEE routing policies on synthetic exit outputs: pools, centroids, per-sample routing,
calibration, choice of operating point, persistence."""

import numpy as np
import pytest

from dimee_models.calibration import calibrate, certify, save_policies
from dimee_models.candidates import ALPHA_GRID, Candidates, Outcome, centroids_of, choose, fit_learned, pools, score
from dimee_models.cost import CostModel
from dimee_models.outputs import ExitOutputs
from dimee_models.policy import (EDGE_CLOUD, CascadePolicy, CentroidPolicy, CloudOnlyPolicy, EscalatePolicy,
                                 LearnedPolicy, Policy, exit_features, load_policies, nearest_centroid,
                                 embedding_features)
from dimee_models.tiers import Tier

H, L, M, E = 8, 6, 2, 4
NAMES = {"dimee", "dimee_constrained", "dimee_learned", "dimee_learned_constrained", "dimee_escalate",
         "dimee_escalate_constrained", "dimee_cascade", "dimee_cascade_constrained", "dimee_direct_cascade",
         "dimee_direct_cascade_constrained"}


def synthetic(n_per: int = 60, seed: int = 0) -> tuple[ExitOutputs, np.ndarray]:
    """Three clusters of z (cluster c on axis c). Cluster 0: the mobile exit is right and confident;
    cluster 1: mobile wrong and unsure, edge right and confident; cluster 2: only the final exit is
    right. Returns the outputs and each sample's cluster (= the tier it should go to)."""
    rng = np.random.default_rng(seed)
    cluster = np.repeat(np.arange(3), n_per)
    n = len(cluster)
    z = (4.0 * np.eye(H)[cluster] + 0.3 * rng.standard_normal((n, H))).astype(np.float32)
    labels = rng.integers(0, 2, n)
    logits = np.zeros((n, L, 2), dtype=np.float32)
    for layer in range(1, L + 1):
        right = {M: cluster == 0, E: cluster <= 1}.get(layer, np.ones(n, bool) if layer == L else cluster < 0)
        conf = np.where(right, rng.uniform(0.92, 0.98, n), rng.uniform(0.55, 0.65, n))
        pred = np.where(right, labels, 1 - labels)
        logits[np.arange(n), layer - 1, pred] = np.log(conf / (1 - conf))
    return ExitOutputs(logits, z, labels, M, E), cluster


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def cal(data):
    return calibrate(data[0], CostModel(mu=0.1), max_drop_pp=0.3, k=5, seed=0)


def routed(policy: Policy, out: ExitOutputs) -> np.ndarray:
    return policy.route(out.z, out.probs(out.mobile_exit))


def assigned(policy: Policy, out: ExitOutputs) -> tuple[np.ndarray, np.ndarray]:
    return policy.assign(out.z, out.probs(out.mobile_exit), out.probs(out.edge_exit))


def test_synthetic_outputs_are_what_they_claim(data):
    out, cluster = data
    correct = out.tier_predictions == out.labels[:, None]
    assert (correct[:, 0] == (cluster == 0)).all() and (correct[:, 1] == (cluster <= 1)).all() and correct[:, 2].all()
    assert out.tier_confidences.min() > 0.54 and out.tier_exits() == (M, E, L)


def test_pools_thresholds_per_sample():
    conf = np.array([[0.9, 0.5, 0.5], [0.6, 0.8, 0.9], [0.6, 0.6, 0.99], [0.8, 0.95, 0.7], [0.79, 0.79, 0.1]])
    np.testing.assert_array_equal(pools(conf, 0.8), [Tier.MOBILE, Tier.EDGE, Tier.CLOUD, Tier.MOBILE, Tier.CLOUD])  # >= is inclusive
    np.testing.assert_array_equal(pools(conf, 0.5), [Tier.MOBILE] * 5)
    np.testing.assert_array_equal(pools(conf, 0.92), [Tier.CLOUD, Tier.CLOUD, Tier.CLOUD, Tier.EDGE, Tier.CLOUD])


def test_empty_pool_centroid_is_nan_and_never_chosen():
    z = np.array([[0.0, 0.0], [2.0, 2.0], [10.0, 10.0]], dtype=np.float32)
    c = centroids_of(z, np.array([Tier.MOBILE, Tier.MOBILE, Tier.EDGE]))
    assert c.shape == (3, 2) and c.dtype == np.float32
    np.testing.assert_allclose(c[:2], [[1.0, 1.0], [10.0, 10.0]])
    assert np.isnan(c[Tier.CLOUD]).all()
    probe = np.array([[1.0, 1.0], [9.0, 9.0], [-50.0, -50.0], [1e3, 1e3], [6.0, 6.0]], dtype=np.float32)
    np.testing.assert_array_equal(nearest_centroid(probe, c), [Tier.MOBILE, Tier.EDGE, Tier.MOBILE, Tier.EDGE, Tier.EDGE])
    only_edge = centroids_of(z, np.full(3, Tier.EDGE))
    assert np.isnan(only_edge[[Tier.MOBILE, Tier.CLOUD]]).all()
    assert (nearest_centroid(probe, only_edge) == Tier.EDGE).all()


def test_centroid_routing_is_per_sample_and_deterministic():
    rng = np.random.default_rng(1)
    centroids = (5.0 * np.eye(3, H)).astype(np.float32)
    truth = rng.integers(0, 3, 30)
    z = (centroids[truth] + 0.5 * rng.standard_normal((30, H))).astype(np.float32)
    probs = np.full((30, 2), 0.5, dtype=np.float32)
    policy = CentroidPolicy("p", M, E, L, {"alpha": 0.8}, {"centroids": centroids})
    batch = policy.route(z, probs)
    np.testing.assert_array_equal(batch, truth)
    assert set(batch.tolist()) == {Tier.MOBILE, Tier.EDGE, Tier.CLOUD}
    alone = [int(policy.route(z[i:i + 1], probs[i:i + 1])[0]) for i in range(30)]
    assert alone == batch.tolist()
    np.testing.assert_array_equal(policy.route(z[::-1], probs[::-1]), batch[::-1])  # order does not matter
    np.testing.assert_array_equal(policy.route(z, probs), batch)


def test_learned_routing_is_per_sample(data):
    out, cluster = data
    probs = out.probs(M)
    targets = np.stack([cluster == 0, cluster <= 1], axis=1).astype(np.float64)
    policy = LearnedPolicy("l", M, E, L, {"mobile": 0.5, "edge": 0.5},
                    fit_learned(embedding_features(out.z, probs), targets))
    batch = policy.route(out.z, probs)
    assert (batch == cluster).mean() > 0.95
    alone = [int(policy.route(out.z[i:i + 1], probs[i:i + 1])[0]) for i in range(0, len(cluster), 7)]
    assert alone == batch[::7].tolist()
    np.testing.assert_array_equal(policy.route(out.z, probs), batch)


def test_an_unsure_edge_escalates_to_cloud_and_pays_both_hops(data):
    out, cluster = data
    probs = out.probs(M)
    targets = np.stack([cluster == 0, cluster <= 1], axis=1).astype(np.float64)
    params = fit_learned(exit_features(probs), targets)
    # nobody answers on mobile, everybody is sent to edge; edge is sure (0.92-0.98) on clusters 0
    # and 1 and unsure (0.55-0.65) on cluster 2, which therefore goes on to cloud
    policy = EscalatePolicy("e", M, E, L, {"mobile": 1.01, "edge": 0.0, "escalate": 0.8}, params)
    np.testing.assert_array_equal(policy.escalate(out.probs(E)), cluster == 2)
    tiers, paths = assigned(policy, out)
    np.testing.assert_array_equal(tiers, np.where(cluster == 2, Tier.CLOUD, Tier.EDGE))
    np.testing.assert_array_equal(paths, np.where(cluster == 2, EDGE_CLOUD, Tier.EDGE))
    o = score(out, tiers, CostModel(), paths)
    assert o.accuracy == 1.0 and o.cost == pytest.approx((2 * 0.6 + 1 * 1.1) / 3) and o.losses == 0
    # per sample: one sample at a time routes as in the batch
    alone = [assigned(policy, ExitOutputs(out.logits[i:i + 1], out.z[i:i + 1], out.labels[i:i + 1], M, E))[1][0]
             for i in range(0, len(cluster), 11)]
    assert alone == paths[::11].tolist()
    learned = LearnedPolicy("l", M, E, L, {"mobile": 1.01, "edge": 0.0}, params)
    assert not learned.escalates and not learned.escalate(out.probs(E)).any()


def test_the_cascade_policy_at_one_threshold_stops_at_the_first_sure_exit(data):
    out, _ = data
    conf = out.tier_confidences
    for t in (0.5, 0.9, 0.95, 1.01):
        policy = CascadePolicy("c", M, E, L, {"mobile": t, "escalate": t}, {})
        tiers, paths = assigned(policy, out)
        expected = np.where(conf[:, 0] >= t, Tier.MOBILE, np.where(conf[:, 1] >= t, Tier.EDGE, Tier.CLOUD))
        np.testing.assert_array_equal(tiers, expected)
        np.testing.assert_array_equal(paths, np.array([Tier.MOBILE, Tier.EDGE, EDGE_CLOUD])[expected])  # via edge
    policy = CascadePolicy("c", M, E, L, {"mobile": 0.9, "escalate": 0.0}, {})  # edge keeps all it gets
    assert set(assigned(policy, out)[0].tolist()) == {Tier.MOBILE, Tier.EDGE}


BASELINES = {"mobile_only": Tier.MOBILE, "edge_only": Tier.EDGE, "cloud_only": Tier.CLOUD}


@pytest.mark.parametrize("mode", ["dimee", *BASELINES])
def test_a_plan_says_all_a_request_in_its_mode_needs(data, mode):
    out, cluster = data
    z, mobile_probs, edge_probs = out.z, out.probs(M), out.probs(E)
    everywhere = {tier: np.full(len(cluster), tier) for tier in BASELINES.values()}
    # the cascade at 0.9: mobile keeps cluster 0 (sure), edge gets the rest and hands cluster 2 (unsure) to cloud
    cascade = CascadePolicy("c", M, E, L, {"mobile": 0.9, "escalate": 0.9}, {})
    plan = cascade.plan(mode)
    assert (plan.skips_mobile, plan.decides, plan.keeps_hidden) == (mode == "cloud_only", mode == "dimee",
                                                                    mode != "mobile_only")
    tiers, escalated = plan.tiers(z, mobile_probs), plan.escalated(edge_probs)
    if mode == "dimee":
        np.testing.assert_array_equal(tiers, np.where(cluster == 0, Tier.MOBILE, Tier.EDGE))
        np.testing.assert_array_equal(escalated, cluster == 2)
        assert plan.escalate_below == 0.9
        np.testing.assert_array_equal(np.where((tiers == Tier.EDGE) & escalated, Tier.CLOUD, tiers),
                                      assigned(cascade, out)[0])  # served as evaluated
    else:
        np.testing.assert_array_equal(tiers, everywhere[BASELINES[mode]])
        assert not escalated.any() and plan.escalate_below is None  # a baseline never escalates
    # every text to cloud: as token ids, in mode dimee too, and nothing escalates
    plan = CloudOnlyPolicy("n", M, E, L, {}, {}).plan(mode)
    assert (plan.skips_mobile, plan.decides) == (mode in ("dimee", "cloud_only"), mode == "dimee")
    assert plan.escalate_below is None and not plan.escalated(edge_probs).any()
    np.testing.assert_array_equal(plan.tiers(z, mobile_probs), everywhere[BASELINES.get(mode, Tier.CLOUD)])


def test_score_by_hand(data):
    out, cluster = data
    cost = CostModel(mu=0.5)
    o = score(out, cluster, cost)  # every sample on its right tier: all correct
    assert o.accuracy == 1.0 and o.fractions == pytest.approx((1 / 3,) * 3)
    assert o.cost == pytest.approx((0.2 + 0.6 + 1.1) / 3)
    conf = out.tier_confidences[np.arange(len(cluster)), cluster]
    assert o.reward == pytest.approx(conf.mean() - 0.5 * o.cost)
    all_mobile = score(out, np.zeros_like(cluster), cost)
    assert all_mobile.accuracy == pytest.approx(1 / 3) and all_mobile.cost == pytest.approx(0.2)


def test_calibrate_gives_valid_policies_within_budget(data, cal):
    out, cluster = data
    assert set(cal.policies) == NAMES and cal.reference_accuracy == 1.0
    assert set(cal.curves) == {"dimee", "dimee_learned", "dimee_escalate", "dimee_cascade", "dimee_direct_cascade"}
    assert len(cal.curves["dimee"]) == len(ALPHA_GRID)
    for name, pol in cal.policies.items():
        assert pol.name == name and (pol.mobile_exit, pol.edge_exit, pol.num_layers) == (M, E, L)
        tiers = routed(pol, out)
        assert tiers.shape == cluster.shape and set(tiers.tolist()) <= {0, 1, 2}
        if pol.kind == "centroid":
            assert pol.tensors["centroids"].shape == (3, H) and pol.thresholds["alpha"] in ALPHA_GRID
        elif pol.kind == "learned":
            assert set(pol.thresholds) == {"mobile", "edge"}
            assert pol.tensors["weight"].shape == (H + 2 + 2, 2)  # z, probs, confidence, entropy
        elif pol.kind == "escalate":
            assert set(pol.thresholds) == {"mobile", "edge", "escalate"}
            assert pol.tensors["weight"].shape == (2 + 3, 2)  # probs, confidence, margin, entropy
        elif pol.kind == "direct_cascade":
            assert set(pol.thresholds) == {"mobile"} and pol.tensors == {} and Tier.EDGE not in tiers
            assert assigned(pol, out)[0].tolist() == tiers.tolist()  # no escalation
        else:
            assert pol.kind == "cascade" and set(pol.thresholds) == {"mobile", "escalate"} and pol.tensors == {}
    cost = CostModel(mu=0.1)
    for name in ("dimee_constrained", "dimee_learned_constrained", "dimee_escalate_constrained",
                 "dimee_cascade_constrained"):
        tiers, paths = assigned(cal.policies[name], out)
        o = score(out, tiers, cost, paths)
        assert o.accuracy >= cal.reference_accuracy - 0.003, name
        assert o.cost < 1.1 * 0.9, name  # and it is much cheaper than sending everything to cloud
    # the centroids separate the clusters exactly: each goes to the cheapest tier that is right
    np.testing.assert_array_equal(routed(cal.policies["dimee_constrained"], out), cluster)
    np.testing.assert_array_equal(routed(cal.policies["dimee"], out), cluster)  # mu=0.1: best reward too
    assert cal.warnings == []


def test_calibrate_warns_when_one_tier_takes_everything(data):
    out, _ = data
    cal = calibrate(out, CostModel(mu=100.0), max_drop_pp=0.3, k=5, seed=0)
    assert (routed(cal.policies["dimee"], out) == Tier.MOBILE).all()
    assert any(w.startswith("dimee:") and "100%" in w and "mobile" in w and "mu=100.0" in w for w in cal.warnings)
    assert not any(w.startswith("dimee_constrained:") for w in cal.warnings)  # the budget keeps it balanced


def test_choose_max_reward_and_cheapest_feasible():
    o = [Outcome(0.80, 0.2, 0.70, (1, 0, 0), 0.10, 100), Outcome(0.89, 0.5, 0.30, (0, 1, 0), 0.05, 100),
         Outcome(0.92, 0.5, 0.10, (0, 1, 0), 0.02, 100), Outcome(0.95, 1.0, 0.20, (0, 0, 1), 0.0, 100)]

    def chosen(*args, **kwargs) -> tuple[int, int]:
        choice = choose(*args, **kwargs)
        return choice.by_reward, choice.constrained

    # budget 1 pp below 0.90: 1, 2 and 3 qualify (0.89 exactly on the edge); 1 and 2 tie on cost, 2 is more accurate
    assert chosen(o, 0.90, 1.0) == (0, 2)
    assert chosen(o, 0.90, 0.5) == (0, 2)
    assert chosen(o, 0.94, 0.5) == (0, 3)
    assert chosen(o, 0.99, 0.3) == (0, 3)  # nothing feasible: the most accurate outcome
    assert chosen(o[:3], 0.99, 0.3) == (0, 2)
    # strict: the losses alone count, however accurate the outcome is overall
    assert chosen(o, 0.80, 3.0, strict=True) == (0, 2)
    assert chosen(o, 0.80, 1.0, strict=True) == (0, 3)


def test_certify_takes_the_cheapest_setting_the_bound_certifies():
    # 0 losses of 100 certify a loss rate <= 3 pp at delta 0.05 (1 - 0.97**100 = 0.95); 2 of 100 do not
    o = [Outcome(0.9, 1.0, 0.0, (0, 0, 1), 0.0, 100), Outcome(0.9, 0.5, 0.0, (0, 1, 0), 0.0, 100),
         Outcome(0.9, 0.2, 0.0, (1, 0, 0), 0.02, 100)]
    settings = Candidates("x", CentroidPolicy, None, o, 3, True, [], [{}] * 3, [0, 1, 2])
    constrained, risk = certify(settings, 3.0, 0.05)
    assert constrained == 1 and risk.guaranteed and risk.losses == 0 and risk.n == 100 and risk.unlabeled == 0
    assert risk.loss_ucb_pp == pytest.approx(100 * (1 - 0.05 ** (1 / 100)), rel=1e-6)
    assert choose(o, 0.9, 3.0).constrained == 2  # the point estimate: 2 pp <= 3 pp
    # nothing certified (100 samples cannot show 1 pp): the safest setting, marked not guaranteed
    constrained, risk = certify(settings, 1.0, 0.05)
    assert constrained == 0 and not risk.guaranteed


def test_save_load_round_trip(data, cal, tmp_path):
    out, _ = data
    cost = CostModel(mu=0.1)
    with pytest.raises(FileNotFoundError, match="dimee calibrate"):
        load_policies(tmp_path)
    doc = save_policies(tmp_path, cal, cost, "dimee_constrained", 0.3)
    policies, loaded = load_policies(tmp_path)
    assert loaded == doc and loaded.default == "dimee_constrained" and loaded.cost_model == cost
    assert set(policies) == NAMES
    for name, pol in cal.policies.items():
        back = policies[name]
        assert (back.kind, back.thresholds, back.mobile_exit, back.edge_exit, back.num_layers) == (
            pol.kind, pol.thresholds, pol.mobile_exit, pol.edge_exit, pol.num_layers)
        assert set(back.tensors) == set(pol.tensors)
        for key in pol.tensors:
            np.testing.assert_array_equal(back.tensors[key], pol.tensors[key])
        np.testing.assert_array_equal(assigned(back, out)[1], assigned(pol, out)[1])


def test_risk_controlled_calibration_stores_each_constrained_policys_bound(data, tmp_path):
    out, _ = data
    cal = calibrate(out, CostModel(mu=0.1), max_drop_pp=5.0, k=5, seed=0, delta=0.1)
    for name, pol in cal.policies.items():
        assert (pol.risk is not None) == name.endswith("_constrained")
        if pol.risk:
            assert (pol.risk.delta, pol.risk.budget_pp, pol.risk.n) == (0.1, 5.0, len(out.labels))
            assert pol.risk.losses <= pol.risk.loss_ucb_pp / 100 * pol.risk.n
    save_policies(tmp_path, cal, CostModel(mu=0.1), "dimee_learned_constrained", 5.0)
    policies, doc = load_policies(tmp_path)
    assert {name: p.risk for name, p in policies.items()} == {name: p.risk for name, p in cal.policies.items()}
    assert doc.policies["dimee_constrained"]["risk"]["guaranteed"] is cal.policies["dimee_constrained"].risk.guaranteed
