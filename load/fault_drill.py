"""Fault drill: Locust load on a running cluster while tier replicas are killed or a tier's whole
node is lost and brought back, then a report of how the requests fared (answered normally, by
fallback, degraded; refused with 503 because the cluster was at capacity; failed), the longest
wait, how long Serve took to bring each replica back, and for each lost node a timeline.

    dimee cluster up && dimee serve artifacts/rt-polarity
    python -m load.fault_drill --users 4 --texts-per-request 4 --duration 60 \
        --kill EdgeTier@20 --kill CloudTier@40 --out runs/drill
    python -m load.fault_drill --users 4 --duration 120 --node-down edge@20 --node-up edge@50 --out runs/node
    dimee cluster up --ha && dimee serve artifacts/rt-polarity
    python -m load.fault_drill --users 4 --duration 120 --head-down 20 --head-up 80 --out runs/head

Node and head loss work on the local cluster (`dimee cluster node-down|node-up`, `head-down|head-up`,
the head only on a cluster started with --ha). While the head is away the drill holds no Ray
connection, as a client would not; the head's timeline: down, `ray start` back, Serve's controller
reporting the application RUNNING again (read from the dashboard), and the front door's retries. Its timeline comes from a
probe that sends one text every 0.25 s with the lost tier's single-tier mode (edge_only or
cloud_only): node down, first answer by fallback (edge) or degraded (cloud), /healthz naming the
tier, `ray start` of the node begun and returned, replica running again, first normal answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import ray
import requests
from ray import serve
from ray.util.state import list_actors

from deployments import hosts, local_cluster
from dimee_models.tiers import Tier
from load.client import ANSWERED, DEFAULT_URL, HEALTHZ, LocustOptions, post, request_body
from load.run import run_locust


def alive_replicas(app: str, deployment: str) -> list:
    return list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")],
                       detail=True)


def kill_and_time_recovery(app: str, deployment: str, timeout_s: float = 300) -> dict:
    """Kill one replica of `deployment` (no Ray restart: Serve's controller must replace it) and
    time how long until the deployment has as many running replicas as before, the new one included."""
    before = alive_replicas(app, deployment)
    victim = before[0]
    killed = time.monotonic()
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
    while time.monotonic() - killed < timeout_s:
        now = alive_replicas(app, deployment)
        running = serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)
        if victim.actor_id not in {a.actor_id for a in now} and len(now) >= len(before) and running >= len(before):
            return {"deployment": deployment, "killed_actor": victim.actor_id, "back_after_s": time.monotonic() - killed}
        time.sleep(0.5)
    return {"deployment": deployment, "killed_actor": victim.actor_id, "back_after_s": None}


def kill_spec(text: str) -> tuple[str, float]:
    deployment, _, at = text.partition("@")
    try:
        return deployment, float(at)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kill wants DEPLOYMENT@SECONDS, e.g. {Tier.EDGE.deployment}@20, "
                                         f"got {text!r}") from None


def node_spec(text: str) -> tuple[str, float]:
    tier, _, at = text.partition("@")
    if tier not in PROBE_MODE:
        raise argparse.ArgumentTypeError(f"a node event wants TIER@SECONDS with TIER edge or cloud, got {text!r}")
    try:
        return tier, float(at)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a node event wants TIER@SECONDS, e.g. edge@20, got {text!r}") from None


PROBE_MODE = {"edge": "edge_only", "cloud": "cloud_only"}  # every probe answer needs the lost tier


def probe(host: str, mode: str, text: str, stop: threading.Event, began: float, log: list) -> None:
    """One text every 0.25 s; (seconds since the drill began when the answer came, its outcome)."""
    session = requests.Session()
    while not stop.is_set():
        outcome = post(session, host, request_body([text], mode), timeout=30).outcome
        log.append((time.monotonic() - began, outcome))
        stop.wait(0.25)


def healthz_names(host: str, tier: str) -> bool:
    try:
        return tier in requests.get(f"{host}{HEALTHZ}", timeout=10).json()["no_live_replica"]
    except (requests.RequestException, ValueError, KeyError):
        return False


def node_timeline(host: str, tier: str, down_at: float, up_at: float, began: float, log: list) -> dict:
    """Lose the tier's node at `down_at` s, bring it back at `up_at` s; when each step showed."""
    def wait_until(check, timeout_s: float = 300) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return round(time.monotonic() - began, 2)
            time.sleep(0.25)
        return None

    time.sleep(max(0.0, down_at - (time.monotonic() - began)))
    down = round(time.monotonic() - began, 2)
    killed = local_cluster.stop_node(Tier.named(tier))
    named = wait_until(lambda: healthz_names(host, tier))
    time.sleep(max(0.0, up_at - (time.monotonic() - began)))
    starting = round(time.monotonic() - began, 2)
    local_cluster.start_node(local_cluster.node_spec(Tier.named(tier)))
    up = round(time.monotonic() - began, 2)
    running = wait_until(lambda: not healthz_names(host, tier))
    wait_until(lambda: any(outcome == "ok" and at >= up for at, outcome in log), 60)
    first_normal = next((round(at, 2) for at, outcome in log if outcome == "ok" and at >= up), None)
    first_flagged = next((round(at, 2) for at, outcome in log if at >= down and outcome in ("fallback", "degraded")),
                         None)
    return {"tier": tier, "processes_killed": killed, "node_down_s": down, "first_fallback_or_degraded_s": first_flagged,
            "healthz_names_it_s": named, "node_start_s": starting, "node_up_s": up, "replica_running_s": running,
            "first_normal_answer_s": first_normal}


def serve_running(dashboard: str, app: str) -> bool:
    try:
        status = requests.get(f"{dashboard}/api/serve/applications/", timeout=10).json()
        return status["applications"][app]["status"] == "RUNNING"
    except (requests.RequestException, ValueError, KeyError):
        return False


def head_timeline(app: str, down_at: float, up_at: float, began: float) -> dict:
    """Lose the head at `down_at` s, start it again at `up_at` s; when Serve had the app back."""
    time.sleep(max(0.0, down_at - (time.monotonic() - began)))
    down = round(time.monotonic() - began, 2)
    killed = local_cluster.stop_head()
    time.sleep(max(0.0, up_at - (time.monotonic() - began)))
    starting = round(time.monotonic() - began, 2)
    local_cluster.start_head()
    up = round(time.monotonic() - began, 2)
    dashboard = f"http://{local_cluster.head_ip()}:{local_cluster.DASHBOARD_PORT}"
    while not serve_running(dashboard, app) and time.monotonic() - began < up + 300:
        time.sleep(0.5)
    running = round(time.monotonic() - began, 2) if serve_running(dashboard, app) else None
    return {"processes_killed": killed, "head_down_s": down, "head_start_s": starting, "head_up_s": up,
            "serve_running_s": running, "serve_back_after_start_s": running and round(running - starting, 2)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=DEFAULT_URL)
    p.add_argument("--address", default=None, help="Ray address (default: the local cluster's)")
    p.add_argument("--app", default="dimee")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--kill", type=kill_spec, action="append", default=None, metavar="DEPLOYMENT@SECONDS",
                   help="kill one replica of DEPLOYMENT this many seconds into the load (repeatable)")
    p.add_argument("--node-down", type=node_spec, action="append", default=[], metavar="TIER@SECONDS",
                   help="lose the local cluster's edge or cloud node this many seconds in (needs a --node-up)")
    p.add_argument("--node-up", type=node_spec, action="append", default=[], metavar="TIER@SECONDS",
                   help="bring that node back this many seconds in")
    p.add_argument("--head-down", type=float, default=None, metavar="SECONDS",
                   help="lose the local cluster's head this many seconds in (started with --ha; needs --head-up)")
    p.add_argument("--head-up", type=float, default=None, metavar="SECONDS", help="start the head again then")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--dataset", default="rt-polarity")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    ups = dict(args.node_up)
    if sorted(ups) != sorted(t for t, _ in args.node_down) or any(ups[t] <= at for t, at in args.node_down):
        p.error("each --node-down TIER@S needs one --node-up TIER@LATER, and only those")
    if (args.head_down is None) != (args.head_up is None) or (args.head_down is not None and args.head_up <= args.head_down):
        p.error("--head-down SECONDS needs a later --head-up SECONDS")
    if args.head_down is not None and (args.kill or args.node_down):
        p.error("--head-down: the drill holds no Ray connection then, so no --kill or --node-down with it")
    if args.texts_per_request < 1:
        p.error("--texts-per-request must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    hosts.join_head()  # namespaced hosts: this drill's Locust on the head's network, with or without a driver
    if args.head_down is None:
        local_cluster.connect(args.address)
    retries = local_cluster.front_retries()
    result, recoveries, timelines, head, probes = drill(args)
    ray.shutdown()
    seen = json.loads((args.out / "drill_tiers.json").read_text())
    report = {
        "users": args.users, "duration_s": args.duration, "requests": result["requests"], "failed": result["failures"],
        "answered": seen["predictions"], "answered_by_fallback": seen["fallback"], "answered_degraded": seen["degraded"],
        "answered_normally": seen["predictions"] - seen["fallback"] - seen["degraded"],
        "longest_wait_ms": result["max_ms"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "shed": result["shed"], "shed_p99_ms": result["shed_p99_ms"],
        "kills": recoveries, "nodes": timelines, "head": head or None,
        "front_door_retries": None if retries is None else local_cluster.front_retries() - retries,
        "probe_failed": sum(outcome not in ANSWERED for log in probes.values() for _, outcome in log),
    }
    (args.out / "drill.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if report["failed"] or report["probe_failed"] else 0


def drill(args: argparse.Namespace) -> tuple[dict, list, list, dict, dict]:
    """The load, and meanwhile the kills, node losses and head loss asked for: Locust's result,
    each kill's recovery, each node's and the head's timeline, each probe's log."""
    ups = dict(args.node_up)
    kills = (args.kill if args.kill is not None else [] if args.node_down or args.head_down is not None
             else [(Tier.EDGE.deployment, 20.0), (Tier.CLOUD.deployment, 40.0)])
    # a request unanswered after 8 s (its deadline is 3) fails, and is counted before Locust's 10 s stop timeout
    options = LocustOptions(args.host, args.texts_per_request, args.dataset, client_timeout=8.0)
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(
        run_locust(options, "dimee", args.users, args.duration, args.out / "drill")))
    recoveries = []

    def kill_at(deployment: str, at: float) -> None:
        time.sleep(max(0.0, at - (time.monotonic() - started)))
        recoveries.append({"at_s": round(time.monotonic() - started, 1), **kill_and_time_recovery(args.app, deployment)})
        print(f"killed a {deployment} replica at {at:g} s; back after {recoveries[-1]['back_after_s']} s", flush=True)

    stop, probes, timelines = threading.Event(), {tier: [] for tier, _ in args.node_down}, []
    started = time.monotonic()
    killers = [threading.Thread(target=kill_at, args=kill) for kill in kills]
    killers += [threading.Thread(target=probe, args=(args.host, PROBE_MODE[tier], "a fine, honest film.", stop,
                                                     started, probes[tier]), daemon=True) for tier in probes]
    nodes = [threading.Thread(target=lambda t=tier, at=at: timelines.append(
        node_timeline(args.host, t, at, ups[t], started, probes[t]))) for tier, at in args.node_down]
    head: dict = {}
    heads = [] if args.head_down is None else [threading.Thread(target=lambda: head.update(
        head_timeline(args.app, args.head_down, args.head_up, started)))]
    for thread in [load, *killers, *nodes, *heads]:
        thread.start()
    for thread in [load, *nodes, *heads]:
        thread.join()
    stop.set()
    for thread in killers:
        thread.join()
    return result, recoveries, timelines, head, probes


if __name__ == "__main__":
    sys.exit(main())
