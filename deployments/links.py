"""Shaped links between the namespaced hosts (`dimee cluster up --hosts netns --links lan|mobile|FILE`).

Two hosts of different tiers talk over a point-to-point link of their own instead of the bridge:
a TUN device in each host, a route to the other host's address through it, the link's bandwidth
as a `tbf` qdisc on each end's egress, and its round trip from a forwarder that carries each
packet from one end to the other after the link's one-way delay (this kernel has no netem, so the
delay cannot be a qdisc). The forwarder is one process for all links, run as a real-time task
outside the hosts' CPU groups: a network is not a host's CPU, and its delay must not stretch when
the hosts are busy. Hosts of one tier, and the head, keep the bridge (unshaped).

`link` cuts the link between two hosts (a network partition), and restores it. `check` measures
what a link gives: a small message's round trip and a bulk transfer's rate.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

from deployments import hosts
from deployments.processes import process_of
from dimee_models.profile import Link, Links

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
JUMBO_MBIT_S = 500  # links this fast are a data centre's, with 9000-byte frames; slower ones carry 1500
CONFIG, PID_FILE, READY, LOG = (hosts.STATE / "links.json", hosts.LINKS_PID, hosts.STATE / "links.ready",
                                hosts.STATE / "links.log")
TIER_PAIRS = {("mobile", "edge"): "mobile_edge", ("mobile", "cloud"): "mobile_cloud", ("edge", "cloud"): "edge_cloud"}


def device(to: str) -> str:
    """The name of a host's end of its link to host `to`."""
    return f"l-{to}"[:15]


def plan(tiers: dict[str, str], addresses: dict[str, str], links: Links) -> list[dict]:
    """One entry per pair of hosts whose tiers are linked, each way: {a, b, a_ip, b_ip, link (its
    name in Links), rtt_ms, mbit_s}."""
    pairs = []
    for a, tier_a in tiers.items():
        for b, tier_b in tiers.items():
            name = TIER_PAIRS.get((tier_a, tier_b)) or TIER_PAIRS.get((tier_b, tier_a))
            if name:
                link = getattr(links, name)
                pairs.append({"a": a, "b": b, "a_ip": addresses[a], "b_ip": addresses[b], "link": name,
                              **link.model_dump()})
    return pairs


def up(tiers: dict[str, str], links: Links) -> None:
    """Link every pair of the namespaced hosts (already up) whose tiers `links` names; returns when
    the forwarder carries packets."""
    pairs = plan(tiers, hosts.active(), links)
    CONFIG.write_text(json.dumps(pairs))
    READY.unlink(missing_ok=True)
    with LOG.open("w") as log:  # a file, not a pipe: the forwarder outlives this process
        proc = subprocess.Popen([sys.executable, "-m", "deployments.links"], cwd=hosts.REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=log)
    PID_FILE.write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while not READY.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the links' forwarder did not start: {LOG.read_text().strip()[-2000:]}")
        time.sleep(0.05)


def active() -> list[dict]:
    """The shaped links of the running hosts, if any."""
    return json.loads(CONFIG.read_text()) if CONFIG.is_file() and process_of(PID_FILE, "python") else []


def network() -> Links | None:
    """The links the running hosts are shaped with, or None (unshaped, or loopback)."""
    pairs = {p["link"]: Link(rtt_ms=p["rtt_ms"], mbit_s=p["mbit_s"]) for p in active()}
    return Links(**pairs) if pairs else None


def route(here: str, there: str) -> list[str] | None:
    """The `ip route` arguments that send host `here`'s packets for `there` over their link, or None
    if the two have none (they use the bridge)."""
    return next((_route(pair) for pair in active() if (pair["a"], pair["b"]) == (here, there)), None)


def mtu(mbit_s: float) -> int:
    return 9000 if mbit_s >= JUMBO_MBIT_S else 1500


def link(a: str, b: str, up_: bool) -> None:
    """Cut the link between hosts `a` and `b` (a network partition: packets between them are
    dropped, in both directions, and nothing else changes), or restore it."""
    up_hosts = hosts.active() or {}
    for here, there in ((a, b), (b, a)):
        if here not in up_hosts or there not in up_hosts:
            raise ValueError(f"no namespaced host {here if here not in up_hosts else there!r}: the hosts are "
                             f"{sorted(up_hosts)} (`dimee cluster up --hosts netns`)")
        shaped = route(here, there)
        if up_ and shaped is None:
            hosts.run("ip", "netns", "exec", hosts.netns(here), "ip", "route", "del", "blackhole",
                      f"{up_hosts[there]}/32", check=False)
        else:  # a shaped link's route and the cut's take turns at one destination
            hosts.run("ip", "netns", "exec", hosts.netns(here), "ip", "route", "replace",
                      *(shaped if up_ else ["blackhole", f"{up_hosts[there]}/32"]))


def _route(pair: dict) -> list[str]:
    return [f"{pair['b_ip']}/32", "dev", device(pair["b"]), "src", pair["a_ip"]]


def _tbf(mbit_s: float) -> list[str]:
    """A token bucket at the link's rate. Its burst is one packet, or a quarter millisecond at the
    rate where that is more (a late timer would otherwise cost a fast link its rate): a larger one
    would send a hidden state faster than the link's rate. Its queue holds a second at the rate."""
    size = mtu(mbit_s)
    burst = max(size + 100, int(mbit_s * 125_000 * 0.00025))
    return ["tbf", "rate", f"{mbit_s}mbit", "burst", str(burst), "limit", str(max(int(mbit_s * 125_000), 4 * size))]


def _open_tun(host: str, name: str) -> int:
    hosts.join(host)  # a TUN device is made in the network of the thread that opens it
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    finally:
        hosts.join(None)
    return fd


def forward() -> None:
    """The forwarder: make each link's two ends, then carry packets between them after the link's
    one-way delay, for as long as it runs (its devices, and so the links, go with it)."""
    pairs = json.loads(CONFIG.read_text())
    ends = {(p["a"], p["b"]): _open_tun(p["a"], device(p["b"])) for p in pairs}
    for p in pairs:
        run = ["ip", "netns", "exec", hosts.netns(p["a"])]
        # a connection that idled keeps its congestion window: an RPC channel is idle between
        # requests, and starting slow again would cost each hidden state round trips of the link
        for cmd in (["sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0"],
                    ["ip", "link", "set", device(p["b"]), "mtu", str(mtu(p["mbit_s"])), "up"],
                    ["ip", "route", "replace", *_route(p)],
                    ["tc", "qdisc", "replace", "dev", device(p["b"]), "root", *_tbf(p["mbit_s"])]):
            subprocess.run([*run, *cmd], check=True, capture_output=True)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError:
        os.nice(-10)
    # each end's packets leave from the other end after half the round trip
    out = {ends[p["a"], p["b"]]: (ends[p["b"], p["a"]], p["rtt_ms"] / 2000) for p in pairs}
    queues: dict[int, collections.deque] = {fd: collections.deque() for fd in out}
    # how late this process wakes (a sleeping CPU takes time to wake), learnt from its wakes for a
    # packet due: each packet leaves that much early, and was that much older when it was read
    # (its arrival woke this process alike), so that a link's delay is what it holds
    late = 0.0
    READY.touch()
    while True:
        due = min((q[0][0] for q in queues.values() if q), default=None)
        wake = None if due is None else due - late
        wait = None if wake is None else max(0.0, wake - time.monotonic())
        readable, _, _ = select.select(list(out), [], [], wait)
        now = time.monotonic()
        if not readable and wait:  # the timer woke it, after sleeping
            late = min(max(late + 0.1 * (now - wake - late), 0.0), 0.0005)
        for fd in readable:
            delay = out[fd][1]
            while True:
                try:
                    queues[fd].append((now - late + delay, os.read(fd, 65536)))
                except BlockingIOError:
                    break
        for fd, queue in queues.items():
            while queue and queue[0][0] - late <= now:
                try:
                    os.write(out[fd][0], queue.popleft()[1])
                except OSError:  # the far end is down: the packet is lost, as on a wire
                    pass


def run_in(host: str, fn, *args):
    """Run `fn(*args)` on a thread of its own in host `host`'s network; returns what it returns, or
    raises what it raised."""
    result: list = []

    def target():
        hosts.join(host)
        try:
            result.append((True, fn(*args)))
        except BaseException as err:  # handed to the caller's thread
            result.append((False, err))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def check(a: str, b: str, pings: int = 50, seconds: float = 3.0) -> dict:
    """What the network gives between hosts `a` and `b`: the median round trip of a 64-byte message
    over TCP (ms) and the rate of a bulk transfer from `a` to `b` (Mbit/s; after its first second, in
    a transfer of more than one)."""
    addresses = hosts.active()
    server = run_in(b, socket.create_server, (addresses[b], 0))
    port = server.getsockname()[1]
    results = {}

    def serve():  # the socket is in b's network whichever thread accepts on it
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(64):
            conn.sendall(data)
        conn, _ = server.accept()
        received, marks = 0, []
        while data := conn.recv(1 << 20):
            received += len(data)
            marks.append((time.monotonic(), received))
        late = [m for m in marks if m[0] >= marks[0][0] + 1.0]
        start = late[0] if len(late) > 1 else marks[0]  # one read after the first second spans no time
        results["mbit_s"] = (marks[-1][1] - start[1]) * 8 / (marks[-1][0] - start[0]) / 1e6
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()

    def client():
        rtts = []
        with socket.create_connection((addresses[b], port)) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(pings + 5):
                start = time.perf_counter()
                conn.sendall(b"x" * 64)
                got = 0
                while got < 64:
                    got += len(conn.recv(64))
                rtts.append((time.perf_counter() - start) * 1000)
        chunk = b"\0" * (1 << 16)
        with socket.create_connection((addresses[b], port)) as conn:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                conn.sendall(chunk)
        return sorted(rtts[5:])[pings // 2]

    results["rtt_ms"] = run_in(a, client)
    thread.join()
    server.close()
    return results


if __name__ == "__main__":
    forward()
