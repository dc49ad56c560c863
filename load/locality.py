"""Whether an EASY sample stays on the mobile host its client sent it to, measured on the namespaced
hosts (`dimee cluster up --hosts netns --mobile-hosts 2`, `dimee serve ART --mobile-replicas 2
--shadow-rate 0`): the bytes on every host's interface while one client sends mobile-answered
requests to the first mobile host's front door, less those of an idle period as long (Ray's own
heartbeats and metrics), per request; and where each ingress replica runs.

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
from load.client import CLASSIFY

TEXT = "a gorgeous, witty, seductive movie."


def interface_bytes() -> dict[str, int]:
    """Bytes received and sent on each host's interface so far."""
    out = {}
    for name in hosts.active() or {}:
        link = json.loads(subprocess.run(["ip", "-n", hosts.netns(name), "-s", "-j", "link", "show", "eth0"],
                                         capture_output=True, text=True, check=True).stdout)[0]
        out[name] = link["stats64"]["rx"]["bytes"] + link["stats64"]["tx"]["bytes"]
    return out


def ingress_hosts() -> list[str]:
    """The address of the node of each ingress replica, from Serve's REST API on the head."""
    apps = requests.get(f"http://{local_cluster.NETNS_HEAD}:{local_cluster.DASHBOARD_PORT}/api/serve/applications/",
                        timeout=30).json()["applications"]
    return sorted(r["node_ip"] for r in apps["dimee"]["deployments"]["Router"]["replicas"])


def measure(url: str, count: int) -> dict:
    session = requests.Session()
    body = {"texts": [TEXT], "mode": "mobile_only"}
    for _ in range(10):  # warm: connections open, replicas past their first request
        session.post(url + CLASSIFY, json=body, timeout=30).raise_for_status()
    began, before = time.monotonic(), interface_bytes()
    tiers = set()
    for _ in range(count):
        reply = session.post(url + CLASSIFY, json=body, timeout=30)
        reply.raise_for_status()
        tiers |= {p["tier"] for p in reply.json()["predictions"]}
    loaded, seconds = interface_bytes(), time.monotonic() - began
    time.sleep(seconds)
    idle = interface_bytes()
    per_request = {name: ((loaded[name] - before[name]) - (idle[name] - loaded[name])) / count for name in before}
    return {"url": url, "requests": count, "seconds": round(seconds, 2), "tiers": sorted(tiers),
            "ingress_replicas_on": ingress_hosts(), "hosts": hosts.active(),
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
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
