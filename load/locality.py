"""Whether an EASY sample stays on the mobile host its client sent it to, measured on the namespaced
hosts (`dimee cluster up --hosts netns --mobile-hosts 2`, `dimee serve ART --mobile-replicas 2
--shadow-rate 0`): the bytes on every host's interface while one client sends mobile-answered
requests to the first mobile host's front door, less those of an idle period as long (Ray's own
heartbeats and metrics), per request; where each ingress replica runs, and how many of the
requests each mobile host's ingress replica answered (Serve's access log on that host).

    python -m load.locality --requests 300 --out runs/locality.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import requests

from deployments import hosts, local_cluster
from load.client import emit, post, request_body

TEXT = "a gorgeous, witty, seductive movie."


def interface_bytes() -> dict[str, int]:
    """Bytes received and sent on each host's interface so far."""
    out = {}
    for name in hosts.active() or {}:
        link = json.loads(subprocess.run(["ip", "-n", hosts.netns(name), "-s", "-j", "link", "show", "eth0"],
                                         capture_output=True, text=True, check=True).stdout)[0]
        out[name] = link["stats64"]["rx"]["bytes"] + link["stats64"]["tx"]["bytes"]
    return out


def ingress_requests() -> dict[str, int]:
    """Requests each mobile host's ingress replicas have logged (Serve's access log, on the host's own disk)."""
    count = "cat /tmp/ray/session_latest/logs/serve/replica_dimee_Router_*.log 2>/dev/null | grep -c 'POST /v1/classify'"
    return {n.host: int(subprocess.run([*hosts.enter(n.host), "sh", "-c", count], capture_output=True,
                                       text=True).stdout.strip() or 0)
            for n in local_cluster.cluster_nodes() if n.tier.label == "mobile"}


def ingress_hosts() -> list[str]:
    """The address of the node of each ingress replica, from Serve's REST API on the head."""
    apps = requests.get(f"http://{local_cluster.NETNS_HEAD}:{local_cluster.DASHBOARD_PORT}/api/serve/applications/",
                        timeout=30).json()["applications"]
    return sorted(r["node_ip"] for r in apps["dimee"]["deployments"]["Router"]["replicas"])


def measure(url: str, count: int) -> dict:
    session = requests.Session()
    body = request_body([TEXT], "mobile_only")
    for _ in range(10):  # warm: connections open, replicas past their first request
        post(session, url, body, timeout=30).raise_unless_answered()
    began, before, logged = time.monotonic(), interface_bytes(), ingress_requests()
    tiers = set()
    for _ in range(count):
        tiers |= {p["tier"] for p in post(session, url, body, timeout=30).raise_unless_answered().predictions}
    loaded, seconds = interface_bytes(), time.monotonic() - began
    answered_by = {host: n - logged[host] for host, n in ingress_requests().items()}
    time.sleep(seconds)
    idle = interface_bytes()
    per_request = {name: ((loaded[name] - before[name]) - (idle[name] - loaded[name])) / count for name in before}
    return {"url": url, "requests": count, "seconds": round(seconds, 2), "tiers": sorted(tiers),
            "ingress_replicas_on": ingress_hosts(), "hosts": hosts.active(), "answered_by_ingress_on": answered_by,
            "bytes_per_request": {k: round(v, 1) for k, v in per_request.items()},
            "idle_bytes_per_second": {k: round((idle[k] - loaded[k]) / seconds, 1) for k in idle}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300, help="one-text requests to send (default 300)")
    p.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    if hosts.active() is None:
        p.error("no namespaced hosts are up: `dimee cluster up --hosts netns --mobile-hosts 2` first")
    first = next(n for n in local_cluster.cluster_nodes() if n.host == "mobile")
    result = measure(f"http://{first.ip}:{local_cluster.FRONT_PORT}", args.requests)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
