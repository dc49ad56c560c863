"""Soak test: a fixed request rate (open loop) on a running cluster for a long time while a replica
is killed every few minutes, sampling what could leak (each replica's RSS, each node's object store,
the hidden-state references the tiers hold) and the latency; then checks that none of it grew.

    dimee cluster up && dimee serve artifacts/rt-polarity
    python -m load.soak --duration 1800 --out runs/soak              # rate: half the capacity a probe finds
    python -m load.soak --duration 180 --rps 4 --kill-every 60 --warmup 30 --sample-every 5 --out runs/soak-short

Requests go out on a fixed schedule whatever the answers (a slow answer never delays the next
request, and a 503 is not waited out). Each carries 1 text from the dataset's test split, or 16 in a
`--share-16` of them, spread evenly so that every window of the run offers the same load: the
checks compare windows, and a random mix would move them by itself. Without `--rps`, 8 closed-loop
threads sending the same mix for `--probe-seconds` measure the answers per second, and the soak
runs at half of that.

Replicas are killed at 0 s, then every `--kill-every` s, cycling through `--kill-order` (Serve's
controller must replace each; the time it took is reported). The requests in flight on a killed
ingress (Router) replica fail unless `--url` is a front door that resends them (deployments/front.py),
and with a single ingress replica every request waits until its successor runs.

Every `--sample-every` s: the RSS of every live Serve replica (its process, on this machine),
each node's object store use (`ray_object_store_memory` on the node's metrics endpoint, summed over
its locations: shared memory, worker heap, spilled; what Ray's dashboard plots per node) and the
hidden-state references held per tier (`ray_dimee_hidden_refs_held`, same endpoints), and the
latency of the requests answered since the previous sample. The checks (soak.md):

- RSS growth: per deployment (its live replicas summed) and per replica alive at both ends, the mean
  over the last 300 s over the mean over the first 300 s from `--warmup` s on (a fifth of what is
  left of a shorter run), at most 1.05;
- object store growth: the same per node; a node under 1 MiB at both ends passes;
- p99 ratio: p99 latency of the requests sent in the last window over the first, at most 1.2
  (window: 300 s, or a fifth of a shorter run);
- refs bounded: per tier, the most references held in the run's second half at most 1.5 x the most
  in its first half + 20;
- no failures: a 503 with Retry-After (shed) is no failure; any other status but 200, a 200
  without one prediction per text, a timeout (30 s) or a refused connection is.

Writes soak.json (totals, kills, the time series, the checks), soak.md (also what each kill cost:
the worst window's p99 and the requests shed until a window after its replacement ran) and
soak.png; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import ray
import requests
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from deployments import local_cluster
from dimee_models.data import DEFAULT_SEED, DEFAULT_SPLITS, load_dataset, split
from dimee_models.tiers import TIER_LABEL, Tier
from load.client import DEFAULT_URL, post, request_body
from load.fault_drill import alive_replicas, kill_and_time_recovery

TIMEOUT_S = 30.0  # a request without an answer by then has failed
PROBE_THREADS = 8
BIG = 16  # texts in the larger requests
GROWTH_LIMIT, NEAR_ZERO_MIB = 1.05, 1.0
P99_LIMIT, P99_WINDOW_S = 1.2, 300.0
REFS_FACTOR, REFS_SLACK = 1.5, 20
# growth compares the mean over a window at each end: the object store holds the last 30 s of
# hidden states, whose size moves with the texts, so a few samples alone swing by more than 5%
GROWTH_WINDOW_S = 300.0
STORE_METRIC, REFS_METRIC = "ray_object_store_memory", "ray_dimee_hidden_refs_held"
DEFAULT_ORDER = f"{Tier.EDGE.deployment},{Tier.CLOUD.deployment},{Tier.MOBILE.deployment}"


@dataclass(frozen=True)
class Sent:
    """One request: when it went out (s since the soak began), how long its answer took, the HTTP
    status (None: no answer), its texts, and what it counts as: ok, shed (503 with Retry-After) or failed."""

    sent_s: float
    latency_ms: float
    status: int | None
    texts: int
    outcome: str
    error: str | None = None
    late_ms: float = 0.0  # after its scheduled time (open loop): shows whether the schedule held
    retry_after_s: float = 0.0


def texts_in(i: int, share_16: float) -> int:
    """Texts in the i-th request: BIG in a `share_16` of them, spread evenly (every 4th for 0.25)."""
    return BIG if math.floor((i + 1) * share_16) > math.floor(i * share_16) else 1


def body(test, rng: random.Random, n: int) -> dict:
    rows = rng.sample(range(len(test.texts)), min(n, len(test.texts)))
    pairs = None if test.text_pairs is None else [test.text_pairs[i] for i in rows]
    return request_body([test.texts[i] for i in rows], "dimee", pairs)


_local = threading.local()  # a Session per thread: requests' sessions are not thread-safe


def session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


def classify(url: str, payload: dict, began: float, scheduled_s: float | None = None) -> Sent:
    at = time.monotonic()
    late_ms = 0.0 if scheduled_s is None else (at - began - scheduled_s) * 1000
    reply = post(session(), url, payload, TIMEOUT_S)
    # every answer is ok here, fallback and degraded too: the soak checks that none failed
    return Sent(at - began, reply.latency_ms, reply.status, len(payload["texts"]),
                "ok" if reply.answered else reply.outcome, reply.error, late_ms, reply.retry_after_s)


def probe_capacity(url: str, test, seconds: float, share_16: float) -> dict:
    """Answers per second of PROBE_THREADS closed-loop threads sending the soak's mix (each waits out a
    503's Retry-After, as a client should)."""
    began, index = time.monotonic(), itertools.count()

    def user(seed: int) -> list[Sent]:
        rng, done = random.Random(seed), []
        while time.monotonic() - began < seconds:
            done.append(classify(url, body(test, rng, texts_in(next(index), share_16)), began))
            time.sleep(done[-1].retry_after_s)
        return done

    with ThreadPoolExecutor(PROBE_THREADS) as pool:
        sent = [s for done in pool.map(user, range(PROBE_THREADS)) for s in done]
    elapsed = time.monotonic() - began
    counts = {k: sum(s.outcome == k for s in sent) for k in ("ok", "shed", "failed")}
    return {"threads": PROBE_THREADS, "seconds": round(elapsed, 1), "requests": len(sent), **counts,
            "answered_rps": round(counts["ok"] / elapsed, 2)}


def open_loop(url: str, test, rps: float, duration: float, share_16: float, began: float) -> list[Sent]:
    """Request i goes out at i / rps s, from a pool with a thread for every request that can be
    waiting at once (each waits at most about TIMEOUT_S), so none waits for a free thread."""
    rng, futures = random.Random(0), []
    with ThreadPoolExecutor(math.ceil(rps * (TIMEOUT_S + 5)) + 1) as pool:
        for i in range(math.ceil(duration * rps)):
            payload = body(test, rng, texts_in(i, share_16))
            time.sleep(max(0.0, i / rps - (time.monotonic() - began)))
            futures.append(pool.submit(classify, url, payload, began, i / rps))
    return [f.result() for f in futures]


def replica_rss(app: str, deployment: str) -> dict[str, float]:
    """RSS (MiB) of each live replica of the deployment, by actor id; the cluster must run on this
    machine (a process not found here is left out)."""
    rss = {}
    for actor in alive_replicas(app, deployment):
        if not actor.pid:  # not known yet (psutil would take None for this very process)
            continue
        try:
            rss[actor.actor_id] = round(psutil.Process(actor.pid).memory_info().rss / 2**20, 1)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss


def parse_metrics(text: str) -> tuple[float, dict[str, float]]:
    """From one node's Prometheus text: its object store use in bytes (every location summed), and
    the hidden-state references held by its replicas, summed per tier."""
    used, refs = 0.0, {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == STORE_METRIC:
                used += s.value
            elif s.name == REFS_METRIC:
                refs[s.labels.get("tier", "?")] = refs.get(s.labels.get("tier", "?"), 0.0) + s.value
    return used, refs


def node_metrics() -> tuple[dict[str, float], dict[str, float]]:
    """Object store use (MiB) per live node, named `tier@address`, and hidden refs per tier over all
    nodes; a node whose metrics endpoint does not answer is left out of this sample."""
    store, refs = {}, {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        try:
            reply = requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=5)
            reply.raise_for_status()
        except requests.RequestException:
            continue
        used, held = parse_metrics(reply.text)
        store[f"{(node.get('Labels') or {}).get(TIER_LABEL, 'untiered')}@{node['NodeManagerAddress']}"] = \
            round(used / 2**20, 2)
        for tier, n in held.items():
            refs[tier] = refs.get(tier, 0.0) + n
    return store, refs


def sample(app: str, deployments: list[str], began: float) -> dict:
    t = round(time.monotonic() - began, 1)
    store, refs = node_metrics()
    return {"t": t, "rss_mib": {d: replica_rss(app, d) for d in deployments}, "object_store_mib": store,
            "refs_held": refs}


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summary(sent: list[Sent]) -> dict:
    answered = [s.latency_ms for s in sent if s.outcome == "ok"]
    return {"requests": len(sent), **{k: sum(s.outcome == k for s in sent) for k in ("ok", "shed", "failed")},
            **{f"p{q}_ms": percentile(answered, q) for q in (50, 95, 99)}}


def latency_windows(times: list[float], sent: list[Sent]) -> list[dict]:
    """For each sample time, the summary of the requests whose answer came since the previous one."""
    done = sorted(sent, key=lambda s: s.sent_s + s.latency_ms / 1000)
    ends = [s.sent_s + s.latency_ms / 1000 for s in done]
    out, previous = [], -math.inf
    for t in times:
        out.append(summary(done[bisect.bisect_right(ends, previous):bisect.bisect_right(ends, t)]))
        previous = t
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _compare(first, last, near_zero_mib: float | None = None) -> dict:
    """Mean of `last` over mean of `first` (None values: absent from that sample, left out)."""
    a, b = _mean(first), _mean(last)
    ratio = b / a if a and b is not None else None
    small = near_zero_mib is not None and a is not None and b is not None and max(a, b) < near_zero_mib
    return {"start_mib": None if a is None else round(a, 2), "end_mib": None if b is None else round(b, 2),
            "ratio": None if ratio is None else round(ratio, 3),
            "pass": small or (ratio is not None and ratio <= GROWTH_LIMIT)}


def growth(series: list[dict], after_s: float = 300.0) -> dict:
    """RSS and object store growth: the mean over the last window of samples over the mean over the
    first from `after_s` on (window: GROWTH_WINDOW_S, or a fifth of what is left of a shorter run).
    RSS per deployment (its live replicas summed: a killed replica's successor is another actor)
    and per replica alive at both ends; object store per node, where under NEAR_ZERO_MIB at both
    ends passes. Each passes at a ratio of at most GROWTH_LIMIT."""
    start = next((i for i, s in enumerate(series) if s["t"] >= after_s), None)
    if start is None:
        return {"rss": {"from_s": None, "by_deployment": {}, "by_replica": {}, "pass": False},
                "object_store": {"from_s": None, "by_node": {}, "pass": False}}
    end = series[-1]["t"]
    window = min(GROWTH_WINDOW_S, (end - after_s) / 5)
    first = [s for s in series[start:] if s["t"] < after_s + window] or series[start:start + 1]
    last = [s for s in series if s["t"] > end - window] or series[-1:]
    span = {"from_s": [first[0]["t"], first[-1]["t"]], "to_s": [last[0]["t"], last[-1]["t"]]}

    def total(s: dict, d: str) -> float | None:
        return sum(s["rss_mib"][d].values()) if s["rss_mib"].get(d) else None  # no live replica: not a 0

    deployments = sorted({d for s in first + last for d in s["rss_mib"]})
    by_deployment = {d: _compare([total(s, d) for s in first], [total(s, d) for s in last]) for d in deployments}
    owner = {a: d for s in first + last for d, replicas in s["rss_mib"].items() for a in replicas}
    both = sorted(a for a in owner if any(a in s["rss_mib"].get(owner[a], {}) for s in first)
                  and any(a in s["rss_mib"].get(owner[a], {}) for s in last))
    by_replica = {a: {"deployment": owner[a], **_compare([s["rss_mib"][owner[a]].get(a) for s in first],
                                                         [s["rss_mib"][owner[a]].get(a) for s in last])} for a in both}
    nodes = sorted({n for s in first + last for n in s["object_store_mib"]})
    by_node = {n: _compare([s["object_store_mib"].get(n) for s in first], [s["object_store_mib"].get(n) for s in last],
                           NEAR_ZERO_MIB) for n in nodes}
    rss_pass = bool(by_deployment) and all(c["pass"] for c in [*by_deployment.values(), *by_replica.values()])
    return {"rss": {**span, "by_deployment": by_deployment, "by_replica": by_replica, "pass": rss_pass},
            "object_store": {**span, "by_node": by_node,
                             "pass": bool(by_node) and all(c["pass"] for c in by_node.values())}}


def p99_ratio(sent: list[Sent], duration: float) -> dict:
    """p99 latency of the requests answered among those sent in the last window over the first's;
    window: P99_WINDOW_S, or a fifth of a shorter run. Passes at most P99_LIMIT."""
    window = min(P99_WINDOW_S, duration / 5)
    first = [s.latency_ms for s in sent if s.outcome == "ok" and s.sent_s < window]
    last = [s.latency_ms for s in sent if s.outcome == "ok" and s.sent_s >= duration - window]
    a, b = percentile(first, 99), percentile(last, 99)
    ratio = round(b / a, 3) if a and b is not None else None
    return {"window_s": window, "first_p99_ms": a, "first_n": len(first), "last_p99_ms": b, "last_n": len(last),
            "ratio": ratio, "pass": ratio is not None and ratio <= P99_LIMIT}


def refs_bounded(series: list[dict]) -> dict:
    """Per tier, the most hidden-state references held in the second half of the run (by sample time)
    against the most in the first: bounded if at most REFS_FACTOR x it + REFS_SLACK. No tier ever
    reported (the gauge not exported): not confirmed."""
    middle = (series[0]["t"] + series[-1]["t"]) / 2 if series else 0.0
    tiers = sorted({tier for s in series for tier in s["refs_held"]})
    by_tier = {}
    for tier in tiers:
        a = max((s["refs_held"].get(tier, 0) for s in series if s["t"] < middle), default=0)
        b = max((s["refs_held"].get(tier, 0) for s in series if s["t"] >= middle), default=0)
        limit = REFS_FACTOR * a + REFS_SLACK
        by_tier[tier] = {"first_half_max": a, "second_half_max": b, "limit": limit, "pass": b <= limit}
    return {"by_tier": by_tier, "pass": bool(by_tier) and all(c["pass"] for c in by_tier.values())}


def kill_costs(report: dict) -> list[dict]:
    """What each kill cost, from the latency windows that end after it and begin before one
    `--sample-every` after its replacement ran: the worst window's p99 and the requests shed; beside
    it, the median p99 of the windows outside every kill's."""
    every, series = report["args"]["sample_every"], [s for s in report["series"] if s["latency"]["requests"]]

    def after(kill: dict, s: dict) -> bool:
        return kill["at_s"] < s["t"] < kill["at_s"] + (kill["back_after_s"] or 0) + 2 * every

    quiet = [s["latency"]["p99_ms"] for s in series if s["latency"]["p99_ms"] is not None
             and not any(after(k, s) for k in report["kills"])]
    out = []
    for kill in report["kills"]:
        inside = [s["latency"] for s in series if after(kill, s)]
        out.append({"worst_p99_ms": max((w["p99_ms"] for w in inside if w["p99_ms"] is not None), default=None),
                    "shed": sum(w["shed"] for w in inside),
                    "quiet_p99_ms": round(float(np.median(quiet)), 1) if quiet else None})
    return out


def assess(series: list[dict], sent: list[Sent], duration: float, warmup: float) -> dict:
    g = growth(series, warmup)
    failed = sum(s.outcome == "failed" for s in sent)
    return {"rss_growth": g["rss"], "object_store_growth": g["object_store"], "p99_ratio": p99_ratio(sent, duration),
            "refs_bounded": refs_bounded(series), "no_failures": {"failed": failed, "pass": failed == 0}}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:g}"


def markdown(report: dict) -> str:
    a = report["args"]
    rate = (f"{report['rps']:g} requests/s" if report["probe"] is None else
            f"{report['rps']:g} requests/s (half of the {report['probe']['answered_rps']:g} answered per second "
            f"by {report['probe']['threads']} closed-loop threads in {report['probe']['seconds']:g} s)")
    kills = (f"a replica killed at 0 s and every {a['kill_every']:g} s ({a['kill_order']})" if a["kill_every"]
             else "no kills")
    lines = [
        "# Soak test", "",
        f"{a['duration']:g} s at {rate}, 1 text per request or {BIG} in {a['share_16']:.0%} of them, from the "
        f"{a['dataset']} test split, mode dimee, against {a['url']}; {kills}; a sample every {a['sample_every']:g} s, "
        f"growth measured from {a['warmup']:g} s on.", "",
        "| requests | ok | shed (503) | failed | p50 ms | p99 ms | longest wait ms | send delay max ms |",
        "|---|---|---|---|---|---|---|---|",
        f"| {report['requests']} | {report['ok']} | {report['shed']} | {report['failed']} | {_fmt(report['p50_ms'])} | "
        f"{_fmt(report['p99_ms'])} | {_fmt(report['longest_wait_ms'])} | {_fmt(report['send_delay_max_ms'])} |", "",
    ]
    lines += _kills_table(report) + _checks(report["checks"])
    if report["failures"]:
        lines += ["First failures:", ""] + [f"- at {f['sent_s']:.1f} s: {f['error']}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def _kills_table(report: dict) -> list[str]:
    a, lines = report["args"], []
    if report["kills"]:
        costs = kill_costs(report)
        lines += [f"Until a window after each replacement ran: the worst {_fmt(a['sample_every'])} s window's p99 and the "
                  f"requests shed (the median window p99 outside these spans: {_fmt(costs[0]['quiet_p99_ms'])} ms).", "",
                  "| killed at s | deployment | actor | back after s | worst p99 ms | shed |", "|---|---|---|---|---|---|"]
        for k, cost in zip(report["kills"], costs):
            actor = k["killed_actor"][:12] if k["killed_actor"] else f"none: {k['error']}"
            back = "not back" if k["back_after_s"] is None else round(k["back_after_s"], 1)
            lines.append(f"| {k['at_s']:g} | {k['deployment']} | {actor} | {back} | {_fmt(cost['worst_p99_ms'])} | "
                         f"{cost['shed']} |")
        lines.append("")
    return lines


def _checks(c: dict) -> list[str]:
    def mark(check: dict) -> str:
        return "**PASS**" if check["pass"] else "**MISS**"

    def ends(name: str, x: dict) -> str:
        return f"{name} {_fmt(x['start_mib'])} -> {_fmt(x['end_mib'])} MiB (x{_fmt(x['ratio'])})"

    rss, store, p99, refs = c["rss_growth"], c["object_store_growth"], c["p99_ratio"], c["refs_bounded"]
    span = ("no sample after the warm-up" if rss["from_s"] is None else
            "samples at {:g}-{:g} s vs {:g}-{:g} s".format(*rss["from_s"], *rss["to_s"]))
    return ["## Checks", "",
              f"- {mark(rss)} RSS growth at most x{GROWTH_LIMIT} ({span}), per deployment (live replicas summed): "
              + "; ".join(ends(d, x) for d, x in rss["by_deployment"].items())
              + "; per replica alive at both ends: "
              + ("; ".join(ends(f"{x['deployment']} {r[:8]}", x) for r, x in rss["by_replica"].items()) or "none"),
              f"- {mark(store)} object store growth at most x{GROWTH_LIMIT} (under {NEAR_ZERO_MIB:g} MiB at both ends "
              "passes), per node: " + ("; ".join(ends(n, x) for n, x in store["by_node"].items()) or "no data"),
              f"- {mark(p99)} p99 ratio at most {P99_LIMIT}: sent in the first {p99['window_s']:g} s "
              f"{_fmt(p99['first_p99_ms'])} ms (n={p99['first_n']}), in the last {_fmt(p99['last_p99_ms'])} ms "
              f"(n={p99['last_n']}): x{_fmt(p99['ratio'])}",
              f"- {mark(refs)} hidden refs bounded (second half's max at most {REFS_FACTOR} x the first's + "
              f"{REFS_SLACK}), per tier: " + ("; ".join(
                  f"{t} {_fmt(x['first_half_max'])} then {_fmt(x['second_half_max'])} (limit {x['limit']:g})"
                  for t, x in refs["by_tier"].items()) or f"no data ({REFS_METRIC} not exported)"),
              f"- {mark(c['no_failures'])} no failed request: {c['no_failures']['failed']} failed", ""]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["series"]
    t = [s["t"] for s in series]
    fig, (rss, store, latency) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for d in sorted({d for s in series for d in s["rss_mib"]}):
        rss.plot(t, [sum(s["rss_mib"][d].values()) if s["rss_mib"].get(d) else math.nan for s in series], label=d)
    rss.set_ylabel("RSS, live replicas (MiB)")
    for n in sorted({n for s in series for n in s["object_store_mib"]}):
        store.plot(t, [s["object_store_mib"].get(n, math.nan) for s in series], label=f"store {n}")
    store.set_ylabel("object store (MiB)")
    refs = store.twinx()
    for i, tier in enumerate(sorted({tier for s in series for tier in s["refs_held"]})):
        refs.plot(t, [s["refs_held"].get(tier, math.nan) for s in series], linestyle="--", color=f"C{i + 5}",
                  label=f"refs {tier}")
    refs.set_ylabel("hidden refs held")
    for q in ("p50", "p99"):
        latency.plot(t, [math.nan if s["latency"][f"{q}_ms"] is None else s["latency"][f"{q}_ms"] for s in series],
                     label=q)
    latency.set_ylabel("latency of the window (ms)")
    latency.set_xlabel("seconds")
    for k in report["kills"]:
        for ax in (rss, store, latency):
            ax.axvline(k["at_s"], color="grey", linestyle=":", linewidth=1)
    rss.legend(fontsize=8)
    handles, labels = store.get_legend_handles_labels()
    more_handles, more_labels = refs.get_legend_handles_labels()
    store.legend(handles + more_handles, labels + more_labels, fontsize=8)
    latency.legend(fontsize=8)
    latency.set_title("dotted: a replica killed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=DEFAULT_URL, help="the service's base URL")
    p.add_argument("--address", default=None, help="Ray address (default: the local cluster's)")
    p.add_argument("--app", default="dimee")
    p.add_argument("--duration", type=float, default=1800, help="seconds of load")
    p.add_argument("--rps", type=float, default=None, help="requests per second (default: half the probed capacity)")
    p.add_argument("--probe-seconds", type=float, default=30, help="length of the capacity probe (without --rps)")
    p.add_argument("--share-16", type=float, default=0.25, help=f"share of requests with {BIG} texts (the rest: 1)")
    p.add_argument("--kill-every", type=float, default=300, help="seconds between replica kills (0: none)")
    p.add_argument("--kill-order", default=DEFAULT_ORDER, help="deployments whose replicas are killed, in turn")
    p.add_argument("--sample-every", type=float, default=10, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=300,
                   help="growth is measured from the first sample at or after this many seconds")
    p.add_argument("--dataset", default="rt-polarity", help="texts come from this dataset's test split")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.kill_order = [d.strip() for d in args.kill_order.split(",") if d.strip()]
    for flag, value in (("--duration", args.duration), ("--probe-seconds", args.probe_seconds),
                        ("--sample-every", args.sample_every)):
        if not value > 0:
            p.error(f"{flag} must be positive, got {value:g}")
    if args.rps is not None and not args.rps > 0:
        p.error(f"--rps must be positive, got {args.rps:g}")
    if not 0 <= args.share_16 <= 1:
        p.error(f"--share-16 must be between 0 and 1, got {args.share_16:g}")
    if not args.kill_every >= 0:
        p.error(f"--kill-every must be 0 (no kills) or positive, got {args.kill_every:g}")
    if args.kill_every and not args.kill_order:
        p.error("--kill-order names no deployment")
    if args.sample_every > args.duration:
        p.error(f"--sample-every ({args.sample_every:g}) must not exceed --duration ({args.duration:g})")
    if not 0 <= args.warmup < args.duration:
        p.error(f"--warmup must be at least 0 and below --duration ({args.duration:g}), got {args.warmup:g}")
    return p, args


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    test = split(load_dataset(args.dataset), DEFAULT_SPLITS, DEFAULT_SEED).test
    url = args.url.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    connect = not ray.is_initialized()  # a caller already connected (the tests' cluster) stays connected
    if connect:
        local_cluster.connect(args.address)
    try:
        apps = serve.status().applications
        if args.app not in apps:
            p.error(f"--app: no application {args.app} is running (running: {', '.join(apps) or 'none'})")
        deployments = sorted(apps[args.app].deployments)
        unknown = [d for d in args.kill_order if d not in deployments] if args.kill_every else []
        if unknown:
            p.error(f"--kill-order: no deployment {', '.join(unknown)} in app {args.app} "
                    f"(it has {', '.join(deployments)})")
        probe = None
        if args.rps is None:
            probe = probe_capacity(url, test, args.probe_seconds, args.share_16)
            if not probe["ok"]:
                raise SystemExit(f"the capacity probe got no answer ({probe}): is the service at {url} up?")
        rps = args.rps or probe["answered_rps"] / 2
        print(f"soak: {args.duration:g} s at {rps:g} requests/s", flush=True)

        series, kills, sent = soak(args, url, test, deployments, rps)
    finally:
        if connect:
            ray.shutdown()

    for s, window in zip(series, latency_windows([s["t"] for s in series], sent)):
        s["latency"] = window
    totals = summary(sent)
    report = {
        "args": {**{k: v for k, v in vars(args).items() if k != "out"}, "url": url,
                 "kill_order": ",".join(args.kill_order)},
        "rps": round(rps, 3), "probe": probe, "duration_s": args.duration, **totals,
        "longest_wait_ms": round(max((s.latency_ms for s in sent), default=0), 1),
        "send_delay_max_ms": round(max((s.late_ms for s in sent), default=0), 1),
        "object_store_source": f"{STORE_METRIC} (all locations) on each node's metrics endpoint",
        "failures": [{k: v for k, v in asdict(s).items() if k in ("sent_s", "status", "error")}
                     for s in sent if s.outcome == "failed"][:20],
        "kills": kills, "checks": assess(series, sent, args.duration, args.warmup), "series": series,
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    (args.out / "soak.md").write_text(markdown(report))
    plot(report, args.out / "soak.png")
    print((args.out / "soak.md").read_text())
    return 1 if report["failed"] else 0


def soak(args: argparse.Namespace, url: str, test, deployments: list[str], rps: float) -> tuple[list, list, list]:
    """The open-loop load for `args.duration` s, with the samples and the replica kills beside it:
    the samples' series, the kills, the requests sent."""
    series, kills = [], []
    began = time.monotonic()

    def sampler() -> None:
        for k in itertools.count():
            if k * args.sample_every > args.duration:
                return
            time.sleep(max(0.0, k * args.sample_every - (time.monotonic() - began)))
            try:
                series.append(sample(args.app, deployments, began))
            except Exception as err:  # a soak is long: one failed call to Ray's state API must not end it
                print(f"{time.monotonic() - began:.0f} s: sample skipped: {err!r}", flush=True)

    def killer() -> None:
        for k in range(math.ceil(args.duration / args.kill_every) if args.kill_every else 0):
            time.sleep(max(0.0, k * args.kill_every - (time.monotonic() - began)))
            at, deployment = round(time.monotonic() - began, 1), args.kill_order[k % len(args.kill_order)]
            try:
                kills.append({"at_s": at, **kill_and_time_recovery(args.app, deployment)})
            except Exception as err:  # e.g. no live replica to kill: recorded, and the soak goes on
                kills.append({"at_s": at, "deployment": deployment, "killed_actor": None, "back_after_s": None,
                              "error": repr(err)[:200]})
            print(f"{at:g} s: killed a {kills[-1]['deployment']} replica; back after {kills[-1]['back_after_s']} s",
                  flush=True)

    background = [threading.Thread(target=f, daemon=True) for f in (sampler, killer)]
    for thread in background:
        thread.start()
    sent = open_loop(url, test, rps, args.duration, args.share_16, began)
    for thread in background:
        thread.join()
    return series, kills, sent


if __name__ == "__main__":
    sys.exit(main())
