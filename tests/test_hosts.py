"""Namespaced hosts (deployments/hosts.py) as a user brings them up with the CLI: two mobile hosts,
an ingress replica on each, and an EASY sample's request and answer crossing no other host."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from load import locality
from tests.conftest import wait_http

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(os.geteuid() != 0, reason="namespaced hosts need root (CI runs as root)")]
DIMEE = [sys.executable, "-m", "deployments.cli"]


def dimee(*args: str, timeout: float = 600) -> str:
    result = subprocess.run([*DIMEE, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def two_mobile_hosts(served_artifact):
    dimee("down")
    try:
        dimee("cluster", "up", "--hosts", "netns", "--mobile-hosts", "2")
        assert sorted(Path("/run/netns").glob("dimee-*")) == [Path(f"/run/netns/dimee-{h}") for h in
                                                               ("cloud", "edge", "head", "mobile", "mobile2")]
        out = dimee("serve", str(served_artifact), "--mobile-replicas", "2", "--shadow-rate", "0")
        url = out.split("serving ", 1)[1].split(" at ", 1)[1].split()[0]
        assert url == "http://10.77.0.3:8000", out  # the first mobile host's front door, on its own address
        wait_http(url + "/healthz")
        yield url
    finally:
        dimee("down")


def test_an_easy_sample_crosses_no_interface_but_its_mobile_hosts(two_mobile_hosts):
    result = locality.measure(two_mobile_hosts, 600)
    assert result["ingress_replicas_on"] == ["10.77.0.3", "10.77.0.6"]  # one ingress replica per mobile host
    assert result["tiers"] == ["mobile"]
    assert result["answered_by_ingress_on"] == {"mobile": 600, "mobile2": 0}  # the one on the host sent to
    sent = result["bytes_per_request"]
    assert sent["mobile"] > 500, result  # the request and its answer, over the client's link
    # a request and answer relayed through another host would add there what they add on mobile; what
    # the others show is Ray's own traffic (~10-50 KB/s at idle, the head's most) varying with load
    for host in ("mobile2", "edge", "cloud", "head"):
        assert sent[host] < 0.5 * sent["mobile"], (host, result)


def test_each_hosts_processes_share_one_cpu_group_of_their_own(two_mobile_hosts):
    """Separate machines do not take each other's CPU: every process in a host's network runs in
    that host's CPU group, and no group holds another host's processes."""
    from deployments import hosts

    root = hosts._cpu_cgroups()
    if root is None:
        missing = "no cgroup CPU controller on this machine"
        if os.environ.get("CI"):  # CI's machine has one: there its absence is a failure, not a skip
            pytest.fail(missing)
        pytest.skip(missing)
    for name in ("head", "mobile", "mobile2", "edge", "cloud"):
        members = {int(p) for p in (root / hosts.netns(name) / "cgroup.procs").read_text().split()}
        assert members and set(hosts.pids(name)) <= members, name
        others = {p for other in ("head", "mobile", "mobile2", "edge", "cloud") if other != name
                  for p in hosts.pids(other)}
        assert not members & others, name
