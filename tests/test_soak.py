"""The soak test's checks by hand, its requests against a small stand-in server, its flags; and one
short soak on the real cluster with replicas killed."""

import json

import pytest

from load import soak
from load.soak import Sent, growth, p99_ratio, refs_bounded


def point(t, rss, store=None, refs=None):
    return {"t": t, "rss_mib": rss, "object_store_mib": store or {}, "refs_held": refs or {}}


def test_texts_are_16_in_an_even_share_of_the_requests():
    sizes = [soak.texts_in(i, 0.25) for i in range(100)]
    assert sizes.count(16) == 25 and all(sizes[i:i + 4].count(16) == 1 for i in range(0, 100, 4))
    assert {soak.texts_in(i, 0.0) for i in range(50)} == {1} and {soak.texts_in(i, 1.0) for i in range(50)} == {16}


def test_growth_compares_deployments_over_live_replicas_and_replicas_alive_at_both_ends():
    """Edge's replica is killed at 50 s and replaced by a smaller new one; Router's one replica grows
    by 10% (caught per deployment and per replica); cloud has no live replica in one sample (a gap,
    not a 0). The windows are a fifth of the 75 s from 15 s on: the baseline is the sample at 20 s,
    the end those at 80 and 90 s."""
    series = [point(t, {"Router": {"r1": 500.0 if t < 70 else 550.0},
                        "EdgeTier": {"e1": 300.0} if t < 50 else {"e2": 250.0},
                        "CloudTier": {} if t == 80 else {"c1": 400.0}}) for t in range(0, 100, 10)]
    rss = growth(series, after_s=15)["rss"]
    assert rss["from_s"] == [20, 20] and rss["to_s"] == [80, 90]
    assert rss["by_deployment"]["EdgeTier"] == {"start_mib": 300.0, "end_mib": 250.0, "ratio": 0.833, "pass": True}
    assert rss["by_deployment"]["CloudTier"] == {"start_mib": 400.0, "end_mib": 400.0, "ratio": 1.0, "pass": True}
    assert rss["by_deployment"]["Router"]["ratio"] == 1.1 and not rss["by_deployment"]["Router"]["pass"]
    assert set(rss["by_replica"]) == {"r1", "c1"}  # e1 is gone at the end, e2 was not there at the start
    assert rss["by_replica"]["r1"]["deployment"] == "Router" and not rss["by_replica"]["r1"]["pass"]
    assert not rss["pass"]
    for s in series:
        s["rss_mib"]["Router"]["r1"] = 500.0
    assert growth(series, after_s=15)["rss"]["pass"]
    assert growth(series, after_s=500)["rss"] == {"from_s": None, "by_deployment": {}, "by_replica": {}, "pass": False}


def test_object_store_growth_passes_near_zero_and_reports_the_values():
    series = [point(t, {}, {"edge@127.0.0.4": 0.2 if t < 50 else 0.6, "mobile@127.0.0.3": 10.0 if t < 50 else 12.0})
              for t in range(0, 100, 10)]
    store = growth(series, after_s=0)["object_store"]
    assert store["by_node"]["edge@127.0.0.4"] == {"start_mib": 0.2, "end_mib": 0.6, "ratio": 3.0, "pass": True}
    assert store["by_node"]["mobile@127.0.0.3"] == {"start_mib": 10.0, "end_mib": 12.0, "ratio": 1.2, "pass": False}
    assert not store["pass"]
    zero = [point(t, {}, {"head@127.0.0.2": 0.0}) for t in range(0, 100, 10)]
    assert growth(zero, after_s=0)["object_store"]["by_node"]["head@127.0.0.2"] == {
        "start_mib": 0.0, "end_mib": 0.0, "ratio": None, "pass": True}
    assert not growth([point(t, {}) for t in range(0, 100, 10)], after_s=0)["object_store"]["pass"]  # no data


def sent(at, ms, outcome="ok"):
    return Sent(at, ms, 200 if outcome == "ok" else 503, 1, outcome)


def test_p99_ratio_compares_the_first_and_last_windows():
    # 100 s: windows of 20 s; only answered requests count; the middle is left out
    records = ([sent(t / 10, 100.0) for t in range(200)] + [sent(50.0, 9000.0)] + [sent(5.0, 20000.0, "shed")]
               + [sent(80 + t / 10, 130.0) for t in range(200)])
    r = p99_ratio(records, 100)
    assert (r["window_s"], r["first_p99_ms"], r["last_p99_ms"], r["first_n"], r["last_n"]) == (20, 100, 130, 200, 200)
    assert r["ratio"] == 1.3 and not r["pass"]
    assert p99_ratio([sent(t, 100.0) for t in range(3600)], 3600)["window_s"] == 300  # at most 300 s
    assert p99_ratio([sent(t / 10, 100.0) for t in range(1000)], 100)["pass"]
    assert not p99_ratio([sent(1.0, 100.0)], 100)["pass"]  # nothing answered in the last window: not confirmed


def test_a_kill_costs_the_worst_window_until_a_window_after_its_replacement_ran():
    """Kills at 20 s (back after 12 s: windows 30, 40 and 50 s) and 70 s (not back: window 80 s);
    the quiet windows' median p99 leaves both out."""
    def window(t, p99, shed=0):
        return {"t": t, "latency": {"requests": 10, "shed": shed, "p99_ms": p99}}

    series = [window(t, 100.0 + t) for t in range(0, 100, 10)]
    series[4] = window(40, 900.0, shed=3)
    report = {"args": {"sample_every": 10}, "series": series,
              "kills": [{"at_s": 20.0, "back_after_s": 12.0}, {"at_s": 70.0, "back_after_s": None}]}
    first, second = soak.kill_costs(report)
    assert (first["worst_p99_ms"], first["shed"]) == (900.0, 3)
    assert (second["worst_p99_ms"], second["shed"]) == (180.0, 0)
    assert first["quiet_p99_ms"] == 140.0  # windows 0, 10, 20, 60, 70 and 90 s


def test_refs_bounded_catches_growth_and_lets_a_flat_count_pass():
    flat = [point(t, {}, refs={"mobile": 30 + t % 7, "edge": 5}) for t in range(100)]
    r = refs_bounded(flat)
    assert r["pass"] and r["by_tier"]["mobile"] == {"first_half_max": 36, "second_half_max": 36, "limit": 74.0,
                                                    "pass": True}
    growing = [point(t, {}, refs={"mobile": 2 * t, "edge": 5}) for t in range(100)]
    r = refs_bounded(growing)
    assert not r["pass"] and not r["by_tier"]["mobile"]["pass"] and r["by_tier"]["edge"]["pass"]
    assert not refs_bounded([point(t, {}) for t in range(10)])["pass"]  # the gauge never seen: not confirmed


def test_latency_windows_count_each_request_where_its_answer_came():
    records = [sent(0.5, 200.0), sent(0.9, 300.0), sent(1.5, 100.0, "shed"), sent(1.8, 1000.0)]
    windows = soak.latency_windows([1.0, 2.0, 3.0], records)
    assert [w["requests"] for w in windows] == [1, 2, 1] and windows[1]["shed"] == 1
    assert windows[0]["p50_ms"] == 200.0 and windows[2]["p99_ms"] == 1000.0


METRICS = """# HELP ray_object_store_memory Object store memory by various sub-kinds on this node
# TYPE ray_object_store_memory gauge
ray_object_store_memory{Location="MMAP_SHM",ObjectState="SEALED",SessionName="s"} 2097152.0
ray_object_store_memory{Location="WORKER_HEAP",ObjectState="SEALED",SessionName="s"} 1048576.0
# HELP ray_dimee_hidden_refs_held hidden-state references this replica keeps alive
# TYPE ray_dimee_hidden_refs_held gauge
ray_dimee_hidden_refs_held{application="dimee",deployment="Router",replica="a",tier="mobile"} 12.0
ray_dimee_hidden_refs_held{application="dimee",deployment="Router",replica="b",tier="mobile"} 3.0
ray_dimee_hidden_refs_held{application="dimee",deployment="EdgeTier",replica="c",tier="edge"} 4.0
# HELP ray_tasks Current number of tasks
# TYPE ray_tasks gauge
ray_tasks{Name="x",State="RUNNING"} 7.0
"""


def test_node_metrics_are_summed_over_locations_and_replicas():
    assert soak.parse_metrics(METRICS) == (3 * 2**20, {"mobile": 15.0, "edge": 4.0})
    assert soak.parse_metrics("") == (0.0, {})


class Split:
    texts = [f"text {i}" for i in range(40)]
    text_pairs = None


def test_requests_are_sorted_into_ok_shed_and_failed(stand_in):
    """Every answer is ok, one by fallback or degraded too: the soak checks that none failed."""
    outcomes = {text: soak.classify(stand_in, {"texts": [text, "b"]}, 0.0)
                for text in ("a", "degraded", "busy", "broken", "short")}
    assert {t: (s.status, s.outcome, s.texts) for t, s in outcomes.items()} == {
        "a": (200, "ok", 2), "degraded": (200, "ok", 2), "busy": (503, "shed", 2), "broken": (500, "failed", 2),
        "short": (200, "failed", 2)}
    assert outcomes["short"].error == "sent 2 texts, got 1 predictions"
    gone = soak.classify("http://127.0.0.1:9", {"texts": ["a"]}, 0.0)  # nothing listens on the discard port
    assert gone.status is None and gone.outcome == "failed"


def test_the_open_loop_keeps_its_schedule_and_the_probe_counts_answers(stand_in):
    import time

    began = time.monotonic()
    records = soak.open_loop(stand_in, Split, 20, 1.0, 0.25, began)
    assert len(records) == 20 and [r.texts for r in records].count(16) == 5
    assert all(r.outcome == "ok" for r in records) and max(r.late_ms for r in records) < 200
    assert sorted(r.sent_s for r in records) == pytest.approx([i / 20 for i in range(20)], abs=0.2)
    probe = soak.probe_capacity(stand_in, Split, 0.5, 0.25)
    assert probe["ok"] == probe["requests"] > 0 and probe["answered_rps"] > 0


def test_the_report_is_written_in_markdown_and_plotted(tmp_path):
    series = [{**point(t, {"Router": {"r1": 500.0}}, {"mobile@127.0.0.3": 4.0}, {"mobile": 10.0}),
               "latency": {"requests": 10, "shed": int(t == 20), "p50_ms": 100.0, "p99_ms": None if t == 20 else 300.0}}
              for t in range(0, 100, 10)]
    records = [sent(t, 100.0) for t in range(100)] + [Sent(50.0, 30000.0, None, 16, "failed", "ReadTimeout()")]
    args = {"url": "http://x", "duration": 100, "rps": 1.0, "share_16": 0.25, "kill_every": 50,
            "kill_order": "EdgeTier,Router", "sample_every": 10, "warmup": 20, "dataset": "rt-polarity"}
    report = {"args": args, "rps": 1.0, "probe": None, **soak.summary(records), "longest_wait_ms": 30000.0,
              "send_delay_max_ms": 2.0, "failures": [{"sent_s": 50.0, "status": None, "error": "ReadTimeout()"}],
              "kills": [{"at_s": 0.1, "deployment": "EdgeTier", "killed_actor": "abcdef0123456789",
                         "back_after_s": 9.5},
                        {"at_s": 50.0, "deployment": "Router", "killed_actor": None, "back_after_s": None,
                         "error": "IndexError()"}],
              "checks": soak.assess(series, records, 100, 20), "series": series}
    text = soak.markdown(report)
    assert "**PASS** RSS growth" in text and "**MISS** no failed request: 1 failed" in text
    assert "| 0.1 | EdgeTier | abcdef012345 | 9.5 | 300 | 1 |" in text and "none: IndexError()" in text
    assert "at 50.0 s: ReadTimeout()" in text
    soak.plot(report, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000


@pytest.mark.parametrize("flags,named", [
    (["--duration", "0"], "--duration must be positive"),
    (["--rps", "-1"], "--rps must be positive"),
    (["--probe-seconds", "0"], "--probe-seconds must be positive"),
    (["--share-16", "1.5"], "--share-16 must be between 0 and 1"),
    (["--kill-every", "-5"], "--kill-every must be 0"),
    (["--kill-order", " , "], "--kill-order names no deployment"),
    (["--sample-every", "0"], "--sample-every must be positive"),
    (["--duration", "60", "--sample-every", "90", "--warmup", "10"], "--sample-every (90) must not exceed --duration"),
    (["--duration", "60"], "--warmup must be at least 0 and below --duration"),  # the default warmup is 300 s
    (["--rps", "two"], "--rps: invalid float value"),
])
def test_bad_flags_are_refused_by_name_before_anything_starts(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exit_:
        soak.main([*flags, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.cluster
def test_a_short_soak_with_kills_fails_no_request_and_nothing_grows(cluster, tmp_path):
    """150 s at 4 requests/s, a replica killed at 0, 50 and 100 s. Cloud and edge only: the cluster
    has one ingress (Router) replica, and while its successor starts every request waits, which
    would decide the p99 ratio of so short a run (a killed ingress replica under traffic is
    test_cluster's). The first kill is cloud's, the last tier, which stores no hidden state, so the
    hidden states held at the 30 s baseline are steady. RSS and object store growth over 150 s are
    only reported (the store holds the last 30 s of hidden states, whose size moves by several %
    with the texts), except that the store must not run away."""
    code = soak.main(["--url", cluster, "--duration", "150", "--rps", "4", "--kill-every", "50",
                      "--kill-order", "CloudTier,EdgeTier", "--warmup", "30", "--sample-every", "5",
                      "--out", str(tmp_path)])
    report = json.loads((tmp_path / "soak.json").read_text())
    assert code == 0 and report["failed"] == 0, report["failures"]
    assert all((tmp_path / f"soak.{ext}").is_file() for ext in ("json", "md", "png"))
    assert len(report["kills"]) >= 3 and all(k["back_after_s"] is not None for k in report["kills"]), report["kills"]
    assert len(report["series"]) >= 10
    checks = report["checks"]
    assert all(checks[name]["pass"] for name in ("p99_ratio", "refs_bounded", "no_failures")), checks
    assert {"Router", "EdgeTier", "CloudTier"} <= set(checks["rss_growth"]["by_deployment"])
    assert checks["object_store_growth"]["by_node"]
    # 24 s windows of a store holding the last 30 s of hidden states swing by up to ~2x (CI: x1.73);
    # only a store that runs away fails here: the 30-minute soak is the measurement
    assert all(x["ratio"] is None or x["ratio"] < 3 for x in checks["object_store_growth"]["by_node"].values()), \
        checks["object_store_growth"]
