"""Shaped links between namespaced hosts (deployments/links.py): which pairs of hosts get one, and
(as root) that the emulation gives each link of the presets its round trip and rate within 10%;
and that a process that never joined a host needs no setns to stay on the machine's network."""

import os
import socket
import subprocess
import sys

import pytest

from deployments import hosts, links
from deployments.local_cluster import NETNS_HEAD, netns_nodes
from dimee_models.profile import LINK_PRESETS

NODES = netns_nodes(2)
TIERS = {n.host: n.tier.label for n in NODES}
ADDRESSES = {"head": NETNS_HEAD, **{n.host: n.ip for n in NODES}}


def test_every_pair_of_hosts_of_linked_tiers_has_a_link_each_way_and_no_other_pair_does():
    pairs = links.plan(TIERS, ADDRESSES, LINK_PRESETS["mobile"])
    assert sorted((p["a"], p["b"]) for p in pairs) == sorted(
        [("mobile", "edge"), ("edge", "mobile"), ("mobile2", "edge"), ("edge", "mobile2"), ("mobile", "cloud"),
         ("cloud", "mobile"), ("mobile2", "cloud"), ("cloud", "mobile2"), ("edge", "cloud"), ("cloud", "edge")])
    by_pair = {(p["a"], p["b"]): p for p in pairs}
    assert (by_pair["mobile2", "cloud"]["rtt_ms"], by_pair["mobile2", "cloud"]["mbit_s"]) == (60, 10)
    assert (by_pair["cloud", "edge"]["rtt_ms"], by_pair["cloud", "edge"]["mbit_s"]) == (20, 1000)
    assert by_pair["mobile", "edge"]["b_ip"] == ADDRESSES["edge"]


def test_a_data_centre_link_carries_jumbo_frames_and_a_device_link_does_not():
    assert links.mtu(1000) == 9000
    assert links.mtu(100) == links.mtu(10) == 1500


@pytest.mark.parametrize("args, error", [
    (["cluster", "up", "--links", "nowhere.json"], "--links: neither a preset (lan, mobile) nor a file"),
    (["cluster", "up", "--links", "lan"], "--links shapes the links between namespaced hosts: it needs --hosts netns"),
])
def test_a_bad_links_flag_is_named(args, error):
    result = subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert error in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_process_that_never_joined_a_host_stays_on_the_machines_network_without_setns(monkeypatch):
    """The cluster fixtures join the machine's network on teardown whatever the hosts; a user who
    is not root may not call setns, and need not: nothing moved."""
    monkeypatch.setattr(hosts, "_machine", None)
    monkeypatch.setattr(hosts.os, "open", lambda *a, **k: pytest.fail(f"opened {a[0]}"))
    hosts.join(None)


@pytest.fixture
def shaped_hosts():
    hosts.up(ADDRESSES, set())
    try:
        yield
    finally:
        hosts.down()


@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="namespaced hosts need root (CI runs as root)")
@pytest.mark.parametrize("preset", list(LINK_PRESETS))
def test_each_link_of_a_preset_gives_its_round_trip_and_rate_within_ten_percent(shaped_hosts, preset):
    network = LINK_PRESETS[preset]
    links.up(TIERS, network)
    # each link one way, and one the other way (both ends are shaped alike)
    for a, b, link in (("mobile", "edge", network.mobile_edge), ("mobile", "cloud", network.mobile_cloud),
                       ("edge", "cloud", network.edge_cloud), ("cloud", "mobile2", network.mobile_cloud)):
        got = links.check(a, b, seconds=2)
        # a packet's way through the forwarder and the hosts' wake-ups add 0.05-0.15 ms whatever the link
        assert got["rtt_ms"] == pytest.approx(link.rtt_ms, rel=0.1, abs=0.15), (a, b, link, got)
        assert got["mbit_s"] == pytest.approx(link.mbit_s, rel=0.1), (a, b, link, got)
    # hosts of one tier, and the head, keep the bridge: nothing between them is shaped
    assert links.check("mobile", "mobile2", pings=20, seconds=1)["rtt_ms"] < 0.5


@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="namespaced hosts need root (CI runs as root)")
def test_a_cut_shaped_link_carries_nothing_and_once_restored_is_shaped_again(shaped_hosts):
    links.up(TIERS, LINK_PRESETS["mobile"])
    server = links.run_in("cloud", socket.create_server, (ADDRESSES["cloud"], 0))

    def connect():
        with socket.create_connection(server.getsockname(), timeout=1):
            return "connected"

    try:
        assert links.run_in("mobile", connect) == "connected"
        links.link("mobile", "cloud", up_=False)
        with pytest.raises(OSError):
            links.run_in("mobile", connect)
        assert links.check("mobile", "edge", pings=10, seconds=0.5)["rtt_ms"] == pytest.approx(15, rel=0.1)
        links.link("mobile", "cloud", up_=True)
        assert links.run_in("mobile", connect) == "connected"
    finally:
        server.close()
    assert links.check("mobile", "cloud", pings=10, seconds=0.5)["rtt_ms"] == pytest.approx(60, rel=0.1)
