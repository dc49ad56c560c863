"""A heterogeneous Ray cluster simulated on one machine: one Ray node per tier, each on its own
loopback address with its tier resource and CPU share. The head node is the cloud node and also
runs the HTTP proxy and Serve's controller; the ingress (which runs the mobile slice) is on the
mobile node.

Loopback only: Ray rewrites 127.0.0.1 to the external address, so nodes use 127.0.0.2, .3, .4.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HEAD_IP, GCS_PORT, DASHBOARD_PORT = "127.0.0.2", 6390, 8265
# Every process of a node inherits these from its `ray start` (docs/DECISIONS.md, "Serving"):
# - Serve's proxy calls the ingress over gRPC instead of Ray actor tasks (faster here);
# - a small `ray.put` (under 100 KiB, e.g. one text's hidden state) stays in the putting process's
#   own object store, and the tier that needs it fetches it from there, instead of a round through
#   the node's shared-memory store and the raylets (Ray's default); measured faster here.
# Export either as 0 to opt out.
SERVE_ENV = {name: os.environ.get(name, "1")
             for name in ("RAY_SERVE_USE_GRPC_BY_DEFAULT", "RAY_put_small_object_in_memory_store")}


@dataclass(frozen=True)
class NodeSpec:
    tier: str
    ip: str
    num_cpus: float


DEFAULT_NODES = (NodeSpec("cloud", HEAD_IP, 2), NodeSpec("mobile", "127.0.0.3", 1), NodeSpec("edge", "127.0.0.4", 1))


def address() -> str:
    return f"{HEAD_IP}:{GCS_PORT}"


def node_ip(tier: str, nodes: tuple[NodeSpec, ...] = DEFAULT_NODES) -> str:
    """The address of the local cluster's node for `tier`."""
    return next(node.ip for node in nodes if node.tier == tier)


def ray_cli(name: str = "ray") -> str:
    """Ray's command-line tools of this interpreter's environment (a venv need not be on PATH)."""
    return str(Path(sys.executable).parent / name)


def _ray(*args: str, timeout: float = 120) -> None:
    cmd = [ray_cli(), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **SERVE_ENV})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def up(nodes: tuple[NodeSpec, ...] = DEFAULT_NODES, dashboard: bool = True) -> str:
    """Start the head (first node) and the workers; returns the cluster address."""
    head, *workers = nodes
    started = time.time()
    _ray("start", "--head", f"--node-ip-address={head.ip}", f"--port={GCS_PORT}", f"--num-cpus={head.num_cpus}",
         f"--resources={json.dumps({f'tier_{head.tier}': 1})}", f"--include-dashboard={str(dashboard).lower()}",
         f"--dashboard-host={HEAD_IP}", f"--dashboard-port={DASHBOARD_PORT}", "--disable-usage-stats")
    for node in workers:
        _ray("start", f"--address={address()}", f"--node-ip-address={node.ip}", f"--num-cpus={node.num_cpus}",
             f"--resources={json.dumps({f'tier_{node.tier}': 1})}", "--disable-usage-stats")
    log.info("local cluster up at %s in %.0f s: %s", address(), time.time() - started,
             ", ".join(f"{n.tier}@{n.ip}" for n in nodes))
    return address()


def down() -> None:
    """Stop every Ray process on this machine (all nodes of the local cluster share it)."""
    _ray("stop", "--force")
