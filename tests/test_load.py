"""The load tooling without a cluster: the one client's judgement of every kind of answer, Locust's
stats parsed into the report, and the locustfile run headless against a small stand-in HTTP server
(right and wrong answers)."""

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from load import client
from load import run as load_run


def entry(response_times: dict, failures: int, start: float, last: float) -> dict:
    """One endpoint's stats as Locust's --json-file writes them (the fields we read)."""
    return {"name": "/v1/classify [dimee]", "method": "POST", "num_requests": sum(response_times.values()),
            "num_failures": failures, "response_times": {str(k): v for k, v in response_times.items()},
            "start_time": start, "last_request_timestamp": last, "max_response_time": max(response_times)}


def test_parse_stats_totals_locust_json(tmp_path):
    times = {100: 50, 200: 45, 300: 4, 900: 1}  # 100 requests: p50 100 ms, p95 200, p99 300, max 900
    (tmp_path / "s.json").write_text(json.dumps([entry(times, 2, 1000.0, 1010.0)]))
    assert load_run.parse_stats(tmp_path / "s.json") == {
        "rps": 10.0, "p50_ms": 100.0, "p95_ms": 200.0, "p99_ms": 300.0, "max_ms": 900, "requests": 100, "failures": 2,
        "shed": 0, "shed_p50_ms": None, "shed_p99_ms": None}
    (tmp_path / "two.json").write_text(json.dumps([entry({100: 10}, 0, 1000.0, 1004.0),
                                                    entry({400: 10}, 1, 1001.0, 1005.0)]))
    two = load_run.parse_stats(tmp_path / "two.json")
    assert (two["requests"], two["failures"], two["rps"], two["p50_ms"], two["p99_ms"]) == (20, 1, 4.0, 100.0, 400.0)
    shed = {**entry({5: 98, 40: 2}, 0, 1000.0, 1004.0), "name": "/v1/classify [dimee]" + client.SHED}
    (tmp_path / "shed.json").write_text(json.dumps([entry({100: 10}, 0, 1000.0, 1004.0), shed]))
    with_shed = load_run.parse_stats(tmp_path / "shed.json")  # refusals are neither answers nor failures
    assert (with_shed["requests"], with_shed["rps"], with_shed["p99_ms"], with_shed["failures"]) == (10, 2.5, 100.0, 0)
    assert (with_shed["shed"], with_shed["shed_p50_ms"], with_shed["shed_p99_ms"]) == (100, 5.0, 40.0)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no stats"):
        load_run.parse_stats(tmp_path / "empty.json")


def test_parse_tiers_gives_fractions_and_mean_layers(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"tiers": {"mobile": 3, "edge": 1}, "layers": 10, "predictions": 4,
                                                 "fallback": 1, "degraded": 0}))
    assert load_run.parse_tiers(tmp_path / "t.json") == {
        "tier_fraction": {"mobile": 0.75, "edge": 0.25, "cloud": 0.0}, "mean_layers": 2.5, "fallback_or_degraded": 0.25}


def run_row(repeat: int, mode: str, rps: float, p50: float, mean_layers: float, fractions: tuple,
            flagged: float = 0.0) -> dict:
    return {"repeat": repeat, "mode": mode, "rps": rps, "p50_ms": p50, "p95_ms": 2 * p50, "p99_ms": 3 * p50,
            "requests": 100, "failures": 0, "shed": 0, "shed_p99_ms": None, "mean_layers": mean_layers, "fallback_or_degraded": flagged,
            "tier_fraction": dict(zip(("mobile", "edge", "cloud"), fractions))}


def test_summarize_gives_the_report_shape_medians_and_ratios():
    runs = [run_row(0, "dimee", 30.0, 200, 3.0, (0.5, 0.5, 0.0)), run_row(0, "cloud_only", 20.0, 300, 6.0, (0, 0, 1)),
            run_row(1, "cloud_only", 25.0, 280, 6.0, (0, 0, 1)), run_row(1, "dimee", 25.0, 220, 4.0, (0.3, 0.5, 0.2))]
    report = load_run.summarize(runs, {"mobile": 1, "edge": 1, "cloud": 2})
    assert set(report) == {"dimee", "cloud_only", "rps_ratio", "rps_ratio_ceiling", "unfair", "replicas"}
    assert set(report["dimee"]) == {"rps", "p50_ms", "p95_ms", "p99_ms", "requests", "failures", "shed", "shed_p99_ms",
                                    "tier_fraction", "mean_layers", "fallback_or_degraded"}
    assert report["replicas"] == {"mobile": 1, "edge": 1, "cloud": 2} and report["unfair"] == []
    assert report["dimee"]["rps"] == 27.5 and report["dimee"]["p50_ms"] == 210 and report["dimee"]["requests"] == 200
    assert report["dimee"]["tier_fraction"] == pytest.approx({"mobile": 0.4, "edge": 0.5, "cloud": 0.1})
    assert report["dimee"]["mean_layers"] == 3.5
    assert report["rps_ratio"] == pytest.approx((30 / 20 + 25 / 25) / 2)  # median of the per-repeat ratios
    assert report["rps_ratio_ceiling"] == pytest.approx(6 / 3.5)


def test_a_mode_flattered_by_timeouts_makes_the_comparison_unfair():
    """1% of one run's answers by fallback or degraded is allowed; 2% in any run is flagged."""
    runs = [run_row(0, "dimee", 30.0, 200, 3.0, (0.5, 0.5, 0.0), flagged=0.01),
            run_row(0, "cloud_only", 20.0, 300, 6.0, (0.02, 0, 0.98), flagged=0.02),
            run_row(1, "cloud_only", 25.0, 280, 6.0, (0, 0, 1)), run_row(1, "dimee", 25.0, 220, 4.0, (0.3, 0.5, 0.2))]
    report = load_run.summarize(runs)
    assert report["unfair"] == ["cloud_only"]
    assert report["cloud_only"]["fallback_or_degraded"] == pytest.approx(0.01)
    assert report["dimee"]["fallback_or_degraded"] == pytest.approx(0.005)


def test_run_refuses_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_run.main(["--out", "x", "--users", "0"])
    assert exit_.value.code == 2 and "--users must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_run.main(["--out", "x", "--sweep", "4,eight"])
    assert "--sweep wants comma-separated user counts" in capsys.readouterr().err


class StandIn(BaseHTTPRequestHandler):
    """Answers /v1/classify like the service, or (mode "wrong") with one prediction too few, or (mode
    "busy") every other request with 503 and Retry-After; a request in another mode than edge_only gets 422."""

    mode = "right"
    sent = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).sent += 1
        if body.get("mode") != "edge_only":  # the mode the test asks for: --mode reached the request
            self.send_response(422)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.mode == "busy" and self.sent % 2:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        wrong = self.mode == "wrong"
        n = len(body["texts"]) - (1 if wrong else 0)
        answer = json.dumps({"model": "stand-in", "predictions": [
            {"label": "positive", "label_id": 1, "confidence": 0.9, "tier": "edge", "exit_layer": 4, "cost": 0.6}] * n})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer.encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode", ["right", "wrong", "busy"])
def test_locustfile_counts_tiers_marks_wrong_answers_as_failures_and_503s_as_shed(tmp_path, mode):
    handler = type("Handler", (StandIn,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        options = client.LocustOptions(f"http://127.0.0.1:{server.server_port}", texts_per_request=3)
        command = client.locust_command(options, "edge_only", ["-u", "1", "-r", "1", "-t", "3s", "--csv", str(tmp_path / "x"),
                                                              "--json-file", str(tmp_path / "x"),
                                                              "--tier-stats", str(tmp_path / "tiers.json")])
        subprocess.run(command, capture_output=True, timeout=120)
    finally:
        server.shutdown()
    stats = load_run.parse_stats(tmp_path / "x.json")
    tiers = json.loads((tmp_path / "tiers.json").read_text())
    assert stats["requests"] > 0
    if mode == "wrong":
        assert stats["failures"] == stats["requests"] and tiers["predictions"] == 0
        assert "sent 3 texts, got 2 predictions" in (tmp_path / "x_failures.csv").read_text()
    else:
        assert stats["failures"] == 0
        assert abs(stats["shed"] - stats["requests"]) <= 1 if mode == "busy" else stats["shed"] == 0
        n = 3 * stats["requests"]
        assert tiers == {"tiers": {"edge": n}, "layers": 4 * n, "predictions": n, "fallback": 0, "degraded": 0}


def test_every_answer_is_judged_once_into_its_outcome(stand_in):
    session = requests.Session()
    replies = {first: client.post(session, stand_in, client.request_body([first, "b", "c"]), timeout=0.5)
               for first in ("normal", "fallback", "degraded", "both", "busy", "unavailable", "broken", "short", "slow")}
    refused = client.post(session, "http://127.0.0.1:9", client.request_body(["a"]))  # nothing listens there
    assert {k: (r.outcome, r.status, r.answered) for k, r in replies.items()} == {
        "normal": ("ok", 200, True), "fallback": ("fallback", 200, True), "degraded": ("degraded", 200, True),
        "both": ("degraded", 200, True), "busy": ("shed", 503, False), "unavailable": ("failed", 503, False),
        "broken": ("failed", 500, False), "short": ("failed", 200, False), "slow": ("failed", None, False)}
    assert (refused.outcome, refused.status, refused.answered) == ("failed", None, False)
    assert "ConnectionError" in refused.error and "ReadTimeout" in replies["slow"].error
    assert replies["short"].error == "sent 3 texts, got 2 predictions"
    assert replies["unavailable"].error.startswith("HTTP 503: ") and replies["unavailable"].retry_after_s == 0
    assert replies["busy"].retry_after_s == 2.0 and replies["busy"].error is None
    assert [p["fallback"] for p in replies["fallback"].predictions] == [True, False, False]
    assert replies["normal"].headers["x-request-id"] == "r1" and 0 < replies["normal"].latency_ms < 500
    assert replies["slow"].latency_ms >= 500
    assert replies["degraded"].raise_unless_answered() is replies["degraded"]
    with pytest.raises(RuntimeError, match="shed \\(HTTP 503\\)"):
        replies["busy"].raise_unless_answered()


def test_steps_parse_and_bad_ones_are_named():
    from load.autoscale import parse_steps

    assert parse_steps("40:1,220:5,340:1") == [(40.0, 1), (220.0, 5), (340.0, 1)]
    for bad in ("40", "40:0", "40:1,30:2", "x:1"):
        with pytest.raises(ValueError, match="--steps"):
            parse_steps(bad)


def test_the_autoscaling_assessment_by_hand():
    from load.autoscale import assess

    # 1 user until 40 s (p50 100 ms), 5 until 220 s (400 ms on one replica, 180 ms once cloud has two), then 1
    seconds = [{"t": t, "users": 1 if t < 40 or t >= 220 else 5, "rps": 1.0,
                "p50_ms": 100.0 if t < 40 or t >= 220 else 400.0 if t < 70 else 180.0} for t in range(300)]
    replicas = [{"t": t, "mobile": 1, "edge": 1, "cloud": 2 if 70 <= t < 260 else 1} for t in range(0, 300, 2)]
    a = assess([(40, 1), (220, 5), (300, 1)], seconds, replicas)
    assert a["p50_before_ms"] == 100.0
    assert a["tiers"]["cloud"] == {"first": 1, "max": 2, "scaled_up_at_s": 70, "back_down_at_s": 260,
                                   "p50_before_up_ms": 400.0, "p50_from_60s_after_up_ms": 180.0}
    assert a["tiers"]["edge"] == {"first": 1, "max": 1, "scaled_up_at_s": None, "back_down_at_s": None}


def test_the_latency_benchmark_times_the_tiers_own_code_without_ray(served_artifact):
    import ray

    from dimee_models import artifact
    from load.bench_latency import PARTS, layer_compute

    parts = layer_compute(served_artifact, artifact.read_manifest(served_artifact), ["a film.", "a long, dull film."])
    assert set(parts) == set(PARTS) and all(len(v) == 2 and (v > 0).all() for v in parts.values())
    assert not ray.is_initialized()


def test_the_drift_drill_keeps_labels_shifts_after_the_switch_and_sums_the_truth(served_artifact):
    from load.drift_drill import drill_texts, summarize

    plan = drill_texts(served_artifact, "rebuttal", 3, 2, 4, seed=0)
    assert [phase for phase, _, _ in plan] == ["before"] * 3 + ["shifted"] * 2
    assert all("i disagree." not in t for _, texts, _ in plan[:3] for t in texts)
    assert all(t.startswith("critics said: ") and "i disagree." in t for _, texts, _ in plan[3:] for t in texts)

    def row(i, phase, state, threshold, disagree, served_right, final_right):
        return {"request": i, "phase": phase, "texts": 10, "early": 8, "disagree": disagree, "served_right": served_right,
                "final_right": final_right, "state": state, "threshold": threshold}
    timeline = [row(0, "before", "ok", 0.73, 0, 9, 9), row(1, "shifted", "ok", 0.73, 2, 7, 9),
                row(2, "shifted", "tightened", 0.93, 1, 7, 8), row(3, "shifted", "tightened", 0.9675, 0, 8, 8)]
    for r in timeline:
        r.update(samples=1, disagreements=0, ucb_pp=1.0, lcb_pp=0.0)
    summary = summarize(timeline)
    assert summary["requests_after_shift_until_not_ok"] == 2
    assert summary["shifted_while_ok"]["drop_pp"] == 20.0 and summary["shifted_while_ok"]["disagreement_pp"] == 20.0
    assert summary["shifted_while_ok"]["live_at_end"]["threshold"] == 0.73
    assert summary["after_leaving_ok_by_threshold"]["0.93"]["drop_pp"] == 10.0
    assert summary["after_leaving_ok_by_threshold"]["0.9675"]["drop_pp"] == 0.0
    assert summary["before"]["served_accuracy"] == 0.9 and summary["last"]["state"] == "tightened"


def test_the_drift_drill_refuses_a_missing_artifact(tmp_path, capsys):
    from load.drift_drill import main

    with pytest.raises(SystemExit):
        main(["--artifact", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "--artifact" in capsys.readouterr().err
