"""Fault drill: Locust load on a running cluster while tier replicas are killed, then a report of
how the requests fared (answered normally, by fallback, degraded, failed), the longest wait, and how
long Serve took to bring each replica back.

    dimee cluster up && dimee serve artifacts/rt-polarity
    python load/fault_drill.py --users 8 --duration 60 --kill EdgeTier@20 --kill CloudTier@40 --out runs/drill
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

import ray
from ray import serve
from ray.util.state import list_actors

from deployments import local_cluster

sys.path.insert(0, str(Path(__file__).parent))
from run import run_locust  # noqa: E402  (a sibling script)


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
        raise argparse.ArgumentTypeError(f"--kill wants DEPLOYMENT@SECONDS, e.g. EdgeTier@20, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--address", default=None, help="Ray address (default: the local cluster's)")
    p.add_argument("--app", default="dimee")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--kill", type=kill_spec, action="append", default=None, metavar="DEPLOYMENT@SECONDS",
                   help="kill one replica of DEPLOYMENT this many seconds into the load (repeatable)")
    p.add_argument("--dataset", default="rt-polarity")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    kills = args.kill or [("EdgeTier", 20.0), ("CloudTier", 40.0)]
    args.out.mkdir(parents=True, exist_ok=True)
    ray.init(address=args.address or local_cluster.address(), logging_level=logging.WARNING, log_to_driver=False)

    load_args = argparse.Namespace(host=args.host, texts_per_request=1, think_time=0.0, dataset=args.dataset,
                                   cpu_breakdown=False)
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(
        run_locust(load_args, "dimee", args.users, args.duration, args.out / "drill")))
    recoveries = []

    def kill_at(deployment: str, at: float) -> None:
        time.sleep(max(0.0, at - (time.monotonic() - started)))
        recoveries.append({"at_s": round(time.monotonic() - started, 1), **kill_and_time_recovery(args.app, deployment)})
        print(f"killed a {deployment} replica at {at:g} s; back after {recoveries[-1]['back_after_s']} s", flush=True)

    killers = [threading.Thread(target=kill_at, args=kill) for kill in kills]
    started = time.monotonic()
    for thread in [load, *killers]:
        thread.start()
    for thread in [load, *killers]:
        thread.join()
    ray.shutdown()

    seen = json.loads((args.out / "drill_tiers.json").read_text())
    report = {
        "users": args.users, "duration_s": args.duration, "requests": result["requests"], "failed": result["failures"],
        "answered": seen["predictions"], "answered_by_fallback": seen["fallback"], "answered_degraded": seen["degraded"],
        "answered_normally": seen["predictions"] - seen["fallback"] - seen["degraded"],
        "longest_wait_ms": result["max_ms"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "kills": recoveries,
    }
    (args.out / "drill.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
