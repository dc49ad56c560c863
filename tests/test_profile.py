"""A cost profile -> the cost model in ms: arithmetic by hand, file round trip, one-line errors."""

import json

import pytest

from dimee_models.cost import CostModel
from dimee_models.profile import HOPS, Profile, Stat, TierCompute, latency_cost_model, read_profile, write_profile


def stat(mean: float) -> Stat:
    return Stat(n=10, mean_ms=mean, p50_ms=mean - 0.5, p99_ms=mean * 3)


def profile(**changes) -> Profile:
    doc = dict(
        created="2026-11-29T21:00:00+0000", artifact="/a", model="m@d", exits={"mobile": 2, "edge": 4, "cloud": 6},
        nodes=[{"address": "127.0.0.3", "tier": "mobile", "cpus": 1.0}], texts=10, fixed=stat(10.0),
        compute={"mobile": TierCompute(layers=2, one_text=stat(8.0), batch=16, batch_per_text_ms=3.0),
                 "edge": TierCompute(layers=2, one_text=stat(6.0), batch=16, batch_per_text_ms=2.0),
                 "cloud": TierCompute(layers=6, one_text=stat(12.0), batch=16, batch_per_text_ms=5.0)},
        hops={"noop": stat(5.0), "ingress_edge": stat(14.0), "ingress_cloud": stat(15.0),
              "ingress_cloud_tokens": stat(6.0), "edge_cloud": stat(9.0)},
        hidden_bytes_per_token=1536.0,
    )
    return Profile(**doc | changes)


def test_stat_of_samples():
    s = Stat.of([1, 2, 3, 4, 100])
    assert (s.n, s.mean_ms, s.p50_ms) == (5, 22.0, 3.0)
    assert 4 < s.p99_ms < 100


def test_the_latency_cost_model_by_hand():
    cost = latency_cost_model(profile())
    # per layer: mobile 8 / 2 = 4, edge 6 / 2 = 3, cloud 12 / 6 = 2 (the whole model from tokens)
    assert (cost.unit, cost.lambda_mobile, cost.lambda_edge, cost.lambda_cloud) == ("ms", 4.0, 3.0, 2.0)
    assert (cost.fixed, cost.o_1, cost.o_2, cost.o_cloud_only, cost.o_edge_cloud) == (10.0, 14.0, 15.0, 6.0, 9.0)
    assert cost.path_costs(2, 4, 6) == pytest.approx({
        "mobile": 10 + 4 * 2,  # 18: fixed + the mobile slice
        "edge": 18 + 14 + 3 * 2,  # 38
        "cloud": 18 + 15 + 2 * 4,  # 41: from layer 2
        "edge_cloud": 38 + 9 + 2 * 2,  # 51
        "cloud_only": 10 + 6 + 2 * 6,  # 28: token ids to cloud, all six layers there
    })
    # the reward weighs a cloud-only request as the abstract model does: mu * 28 == 1.0 * (0.5 + 0.1 * 6)
    assert cost.mu * 28 == pytest.approx(1.1)
    assert latency_cost_model(profile(), mu=2.0).mu == pytest.approx(2 * cost.mu)


def test_fixed_and_raw_offload_leave_the_abstract_model_as_it_was():
    assert CostModel().path_costs(2, 4, 6)["cloud_only"] == pytest.approx(1.1)  # o_2 + 0.1 * 6
    cost = CostModel(o_cloud_only=0.1, fixed=1.0)
    assert cost.path_costs(2, 4, 6) == pytest.approx(
        {"mobile": 1.2, "edge": 1.6, "cloud": 2.1, "edge_cloud": 2.1, "cloud_only": 1.7})


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "profile.json"
    write_profile(path, profile())
    assert read_profile(path) == profile()
    assert json.loads(path.read_text())["hops"]["ingress_edge"]["mean_ms"] == 14.0


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("fixed"), "invalid field fixed: Field required"),
    (lambda d: d["compute"]["edge"].update(layers=0), "invalid field compute.edge.layers"),
    (lambda d: d["hops"].pop("edge_cloud"), "hops lacks ['edge_cloud']"),
    (lambda d: d.update(hidden_bytes_per_token=-1), "invalid field hidden_bytes_per_token"),
])
def test_a_bad_profile_is_refused_in_one_line(tmp_path, edit, message):
    doc = profile().model_dump()
    edit(doc)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="cost profile .*p.json") as err:
        read_profile(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        read_profile(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        read_profile(tmp_path / "bad.json")


def test_a_profile_without_every_hop_the_model_needs_is_refused(tmp_path):
    write_profile(tmp_path / "p.json", profile(hops={hop: stat(5.0) for hop in HOPS if hop != "edge_cloud"}))
    with pytest.raises(ValueError, match=r"hops lacks \['edge_cloud'\]"):
        read_profile(tmp_path / "p.json")


def test_links_add_their_round_trip_and_the_bytes_to_each_hop(tmp_path):
    from dimee_models.profile import LINK_PRESETS, TOKEN_ID_BYTES, Link, Links, read_links

    base = latency_cost_model(profile(tokens_per_text=20.0))
    links = Links(mobile_edge=Link(rtt_ms=2, mbit_s=8), mobile_cloud=Link(rtt_ms=50, mbit_s=80),
                  edge_cloud=Link(rtt_ms=10, mbit_s=800))
    far = latency_cost_model(profile(tokens_per_text=20.0), links=links)
    hidden = 1536 * 20  # bytes of one text's hidden state; 8 Mbit/s = 1 byte per microsecond
    assert far.o_1 - base.o_1 == pytest.approx(2 + hidden / 1000)
    assert far.o_2 - base.o_2 == pytest.approx(50 + hidden / 10000)
    assert far.raw_to_cloud - base.raw_to_cloud == pytest.approx(50 + 20 * TOKEN_ID_BYTES / 10000)
    # escalation: the hidden state back to the ingress in edge's reply, then on to cloud
    assert far.o_edge_cloud - base.o_edge_cloud == pytest.approx(hidden / 1000 + 50 + hidden / 10000)
    assert latency_cost_model(profile(tokens_per_text=20.0, links=links)) == far  # stored in the profile
    with pytest.raises(ValueError, match="measured across shaped links"):
        latency_cost_model(profile(tokens_per_text=20.0, measured_across=links), links=links)
    assert read_links("mobile") == LINK_PRESETS["mobile"]
    (tmp_path / "links.json").write_text(links.model_dump_json())
    assert read_links(str(tmp_path / "links.json")) == links
    (tmp_path / "bad.json").write_text('{"mobile_edge": {"rtt_ms": 1, "mbit_s": 0}}')
    with pytest.raises(ValueError, match="invalid field mobile_edge.mbit_s"):
        read_links(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="neither a preset"):
        read_links("satellite")
    with pytest.raises(ValueError, match="tokens_per_text"):
        latency_cost_model(profile(), links=links)
