"""How long `dimee serve ARTIFACT` takes to be ready on the running local cluster (loopback or
namespaced hosts), and per tier: when its replica was running, how long its constructor took (the
weights fetched and loaded), and what it fetched.

    python -m load.deploy_time ARTIFACT --cold --out runs/deploy-netns.json

--cold empties every node's weight cache first, so each tier fetches its files; without it a
node that holds them starts from its cache.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deployments import hosts, local_cluster
from deployments.weights import cache_dir
from dimee_models.tiers import Tier
from load.client import emit

STARTED = re.compile(r"^INFO (\S+ \S+) .*deployment='(\w+)'.*started successfully .* after ([\d.]+)s .*took ([\d.]+)s")


def empty_caches() -> None:
    if hosts.active() is None:
        shutil.rmtree(cache_dir(), ignore_errors=True)
        return
    for node in local_cluster.cluster_nodes():
        subprocess.run([*hosts.enter(node.host), "rm", "-rf", str(cache_dir())], check=True)


def replica_starts(since: str) -> dict[str, dict]:
    """Serve controller's log of the replicas that started after `since` (its own time format)."""
    starts = {}
    for log in Path("/tmp/ray/session_latest/logs/serve").glob("controller_*.log"):
        for line in log.read_text().splitlines():
            match = STARTED.match(line)
            if match and match[1] >= since:
                starts[match[2]] = {"running_after_s": float(match[3]), "constructor_s": float(match[4])}
    return starts


def on_cluster(work):
    """`work(serve)` as a driver of the running local cluster."""
    import ray
    from ray import serve

    local_cluster.connect()
    try:
        return work(serve)
    finally:
        ray.shutdown()


def fetches(serve) -> list[dict]:
    return [serve.get_deployment_handle(t.deployment, app_name="dimee").describe.remote().result(timeout_s=60)["fetch"]
            for t in Tier]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--cold", action="store_true", help="empty every node's weight cache first")
    p.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    on_cluster(lambda serve: serve.status().applications and serve.delete("dimee"))  # every replica starts anew
    if args.cold:
        empty_caches()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "deployments.cli", "serve", str(args.artifact)], check=True,
                   capture_output=True)
    wall = time.monotonic() - began
    starts = replica_starts(since)
    result = {"artifact": str(args.artifact), "hosts": "netns" if hosts.active() else "loopback", "cold": args.cold,
              "serve_to_ready_s": round(wall, 1),
              "tiers": {t.label: {**starts.get(t.deployment, {}), **fetched}
                        for t, fetched in zip(Tier, on_cluster(fetches))}}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
