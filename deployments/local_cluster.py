"""A heterogeneous Ray cluster simulated on one machine: a head node with no tier (the GCS, Serve's
controller and the HTTP proxy), then one Ray node per tier, each on its own loopback address with
its tier label and CPU share. The ingress (which runs the mobile slice) is on the mobile node.

A tier's node can be taken down (its raylet and every process on it killed, as when a machine is
lost) and brought back, under traffic: `dimee cluster node-down edge`, `dimee cluster node-up edge`.
Started with `--ha`, the head's GCS keeps its state in a Redis server, and the head can go the same
way and come back (`dimee cluster head-down`, `head-up`) while the mobile node keeps answering.

Clients send to the front door (deployments/front.py) on 127.0.0.1:8000. Behind it every node that
holds a replica has its own Serve proxy, on port 8100 + the last byte of its address (the head's
8102, the mobile node's 8103): the front door sends to the mobile node's, the head's is its backup.

Loopback only: Ray rewrites 127.0.0.1 to the external address, so nodes use 127.0.0.2 to .5.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from deployments import hosts
from deployments import links as shaped_links
from deployments.processes import stop_pid_file
from deployments.weights import HEAD_LABEL
from dimee_models.profile import Links
from dimee_models.tiers import Tier

log = logging.getLogger(__name__)

HEAD_IP, GCS_PORT, DASHBOARD_PORT = "127.0.0.2", 6390, 8265
PROMETHEUS_PORT = 9090
# Ray writes, per session, a Prometheus config that scrapes every node listed in its service
# discovery file (kept current as nodes come and go).
RAY_PROMETHEUS_CONFIG = Path("/tmp/ray/session_latest/metrics/prometheus/prometheus.yml")
PROMETHEUS_DIR = Path("/tmp/ray/dimee-prometheus")  # its data and pid file: gone with `dimee down`
# Every process of a node inherits these from its `ray start` (docs/DECISIONS.md, "Serving"):
# - Serve's proxy calls the ingress over gRPC instead of Ray actor tasks (faster here);
# - a small `ray.put` (under 100 KiB, e.g. one text's hidden state) stays in the putting process's
#   own object store, and the tier that needs it fetches it from there, instead of a round through
#   the node's shared-memory store and the raylets (Ray's default); measured faster here.
#   Export either of these two as 0 to opt out;
# - Serve's logs (a line per request in every replica and proxy) go to their files under
#   /tmp/ray/session_latest/logs/serve only, not to stderr too, from where Ray's log monitor
#   would read every line and publish it to drivers: ~10 ms of CPU per request here. Export
#   RAY_SERVE_LOG_TO_STDERR=1 to have them on stderr as well;
# - one authentication mode for every node: unset, Ray 2.60's `ray start --head` turns token auth on
#   when ~/.ray/auth_token exists (any earlier local `ray.init()` writes one) but `ray start
#   --address` does not, and the tier nodes would be refused. Without a token unless
#   RAY_AUTH_MODE=token is exported (README, "Security").
# - how long a node waits for a lost head before its processes exit: Ray's 60 s default would end
#   every replica during a minute without the head; with --ha the head comes back.
CLUSTER_ENV = {**{name: os.environ.get(name, "1")
                  for name in ("RAY_SERVE_USE_GRPC_BY_DEFAULT", "RAY_put_small_object_in_memory_store")},
               "RAY_SERVE_LOG_TO_STDERR": os.environ.get("RAY_SERVE_LOG_TO_STDERR", "0"),
               "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
               "RAY_gcs_rpc_server_reconnect_timeout_s": os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "600")}
FRONT_DIR = Path("/tmp/ray/dimee-front")
FRONT_HOST, FRONT_PORT = "127.0.0.1", 8000
PROXY_HOST, PROXY_PORT_BASE = "127.0.0.1", 8100
# --ha: the GCS's Redis (its data in memory only: it has to outlive the head, not itself)
REDIS_DIR, REDIS_PORT = Path("/tmp/ray/dimee-redis"), 6391


@dataclass(frozen=True)
class NodeSpec:
    tier: Tier
    ip: str
    num_cpus: float
    host: str | None = None  # its namespaced host (`--hosts netns`), None on loopback


# The head carries no tier (a real cluster would not put its control plane on a tier's hardware, and
# losing a tier's node must not take the GCS and Serve's controller with it) and no CPUs to schedule:
# Serve's controller and proxy need none.
DEFAULT_NODES = (NodeSpec(Tier.MOBILE, "127.0.0.3", 1), NodeSpec(Tier.EDGE, "127.0.0.4", 1),
                 NodeSpec(Tier.CLOUD, "127.0.0.5", 2))


# --hosts netns (deployments/hosts.py): every node a host of its own on a bridge, so every Serve
# proxy can take one port, and the front door runs on each mobile host.
NETNS_HEAD, NETNS_PROXY_PORT = "10.77.0.2", 8001
NETNS_NODES = {"mobile": NodeSpec(Tier.MOBILE, "10.77.0.3", 1, "mobile"),
               "edge": NodeSpec(Tier.EDGE, "10.77.0.4", 1, "edge"),
               "cloud": NodeSpec(Tier.CLOUD, "10.77.0.5", 2, "cloud"),
               "mobile2": NodeSpec(Tier.MOBILE, "10.77.0.6", 1, "mobile2")}


def netns_nodes(mobile_hosts: int = 1) -> tuple[NodeSpec, ...]:
    return tuple(NETNS_NODES[n] for n in ("mobile", "edge", "cloud", "mobile2")[:2 + mobile_hosts])


def cluster_nodes() -> tuple[NodeSpec, ...]:
    """The running local cluster's tier nodes: namespaced hosts if they are up, else loopback ones."""
    up_hosts = hosts.active()
    return tuple(NETNS_NODES[n] for n in up_hosts if n != "head") if up_hosts else DEFAULT_NODES


def head_ip() -> str:
    return NETNS_HEAD if hosts.active() else HEAD_IP


def address() -> str:
    return f"{head_ip()}:{GCS_PORT}"


def connect(to: str | None = None, runtime_env: dict | None = None) -> None:
    """This process as a Ray driver of the cluster at `to` (default: the local one's head), from the
    head's network when the namespaced hosts are up (hosts.join_head). Ray's own log from warnings
    up, and not the replicas' lines: a tool's output stays its own."""
    import ray

    hosts.join_head()
    ray.init(address=to or address(), logging_level=logging.WARNING, log_to_driver=False, runtime_env=runtime_env)


def proxy_port(ip: str) -> int:
    """The port of the Serve proxy of the node at `ip` (one host: every proxy needs its own)."""
    return NETNS_PROXY_PORT if hosts.active() else PROXY_PORT_BASE + int(ip.rsplit(".", 1)[1])


HEAD_PROXY_PORT = PROXY_PORT_BASE + int(HEAD_IP.rsplit(".", 1)[1])


def proxy_http_options() -> dict:
    """Serve's http_options: the head's proxy (the others take the port of `proxy_port`)."""
    if hosts.active():
        return {"host": "0.0.0.0", "port": NETNS_PROXY_PORT}
    return {"host": PROXY_HOST, "port": HEAD_PROXY_PORT}


def node_ip(tier: Tier, nodes: tuple[NodeSpec, ...] | None = None) -> str:
    """The address of the local cluster's node for `tier`."""
    return node_spec(tier, nodes).ip


def ray_cli(name: str = "ray") -> str:
    """Ray's command-line tools of this interpreter's environment (a venv need not be on PATH)."""
    return str(Path(sys.executable).parent / name)


def _ray(*args: str, timeout: float = 120, env: dict | None = None, host: str | None = None) -> None:
    cmd = [*(hosts.enter(host) if host else []), ray_cli(), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **CLUSTER_ENV, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def check_port_free(host: str, port: int, fix: str) -> None:
    """Refuse in a second what Ray would find out in a minute, behind a C++ stack trace."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ValueError(f"port {port} on {host} is in use ({err.strerror}): {fix}") from None


def check_head_ports(dashboard: bool = True) -> None:
    for port in (GCS_PORT, DASHBOARD_PORT) if dashboard else (GCS_PORT,):
        check_port_free(HEAD_IP, port, "a Ray cluster or another program holds it (`dimee down` stops a local "
                                       "cluster started earlier)")


def up(nodes: tuple[NodeSpec, ...] | None = None, dashboard: bool = True, ha: bool = False,
       netns: bool = False, links: Links | None = None) -> str:
    """Start the head (with `ha`, on a fresh Redis) and a node per tier; returns the cluster address.
    `netns`: each on a host of its own (deployments/hosts.py; `nodes` default to NETNS_NODES'), with
    `links` between the tiers' hosts (deployments/links.py)."""
    started = time.time()
    if links is not None and not netns:
        raise ValueError("--links shapes the links between namespaced hosts: it needs --hosts netns")
    if netns:
        nodes = nodes or netns_nodes()
        hosts.up({"head": NETNS_HEAD, **{n.host: n.ip for n in nodes}}, {n.host for n in nodes})
        if links is not None:
            shaped_links.up({n.host: n.tier.label for n in nodes}, links)
    else:
        nodes = nodes or DEFAULT_NODES
        check_head_ports(dashboard)
    if ha:
        start_redis()
    start_head(dashboard)
    for node in nodes:
        start_node(node)
    log.info("local cluster up at %s in %.0f s: head@%s, %s", address(), time.time() - started, head_ip(),
             ", ".join(f"{n.tier.label}@{n.ip}" for n in nodes))
    return address()


def start_head(dashboard: bool = True) -> None:
    """`ray start --head`; on a cluster started with --ha, on its Redis and namespace: the same GCS state."""
    env, host = {}, "head" if hosts.active() else None
    if (REDIS_DIR / "namespace").is_file():
        env = {"RAY_REDIS_ADDRESS": f"127.0.0.1:{REDIS_PORT}",
               "RAY_external_storage_namespace": (REDIS_DIR / "namespace").read_text().strip()}
        # `ray start --head` refuses an address that this host's raylets name as their GCS's, and the
        # tier nodes' raylets here do: the file it compares with is forgotten, so the head can come back
        # (on a head of its own machine, no raylet of another node is there to be found).
        from ray._private.utils import get_ray_address_file

        Path(get_ray_address_file(None)).unlink(missing_ok=True)
    _ray("start", "--head", f"--node-ip-address={head_ip()}", f"--port={GCS_PORT}", "--num-cpus=0",
         f"--include-dashboard={str(dashboard).lower()}", f"--dashboard-host={head_ip()}",
         f"--dashboard-port={DASHBOARD_PORT}", f"--labels={HEAD_LABEL}", "--disable-usage-stats", env=env, host=host)


def start_node(node: NodeSpec) -> None:
    """Join a tier's node to the running cluster (again, after `stop_node`)."""
    _ray("start", f"--address={address()}", f"--node-ip-address={node.ip}", f"--num-cpus={node.num_cpus}",
         f"--labels={node.tier.node_label}", "--disable-usage-stats",
         env={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(proxy_port(node.ip))}, host=node.host)


def start_redis() -> None:
    """A Redis server for the GCS's state, and a fresh namespace in it for this cluster."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("--ha needs `redis-server` (Debian's package: `./scripts/install.sh --with-redis`)")
    stop_redis()
    REDIS_DIR.mkdir(parents=True, exist_ok=True)
    if not hosts.active():  # on namespaced hosts, in the head's own network
        check_port_free("127.0.0.1", REDIS_PORT, "another Redis or program holds it")
    subprocess.run([*(hosts.enter("head") if hosts.active() else []), binary, "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no",
                    "--daemonize", "yes", "--pidfile", str(REDIS_DIR / "redis.pid"),
                    "--logfile", str(REDIS_DIR / "redis.log"), "--dir", str(REDIS_DIR)], check=True, timeout=30)
    (REDIS_DIR / "namespace").write_text(f"dimee-{uuid.uuid4().hex[:12]}")


def stop_redis() -> None:
    stop_pid_file(REDIS_DIR / "redis.pid", "redis")
    (REDIS_DIR / "namespace").unlink(missing_ok=True)


def start_front(host: str = FRONT_HOST, port: int = FRONT_PORT, nodes: tuple[NodeSpec, ...] | None = None) -> str:
    """The front door on host:port, in front of the mobile nodes' Serve proxies (the head's as backup);
    returns its URL. On namespaced hosts, one on each mobile host's port `port`, in front of that
    host's proxy; the URL is the first's."""
    from deployments import front

    nodes = nodes or cluster_nodes()
    if hosts.active():
        mobiles = [n for n in nodes if n.tier == Tier.MOBILE]
        for node in mobiles:
            subprocess.run([*hosts.enter(node.host), sys.executable, "-m", "deployments.front",
                            "--listen", f"0.0.0.0:{port}", "--server", f"127.0.0.1:{NETNS_PROXY_PORT}",
                            "--backup", f"{NETNS_HEAD}:{NETNS_PROXY_PORT}", "--dir", str(FRONT_DIR)],
                           check=True, capture_output=True, timeout=60, cwd=hosts.REPO)
        return f"http://{mobiles[0].ip}:{port}"
    if front.running(FRONT_DIR) is None:
        check_port_free(host, port, "another program holds it: stop it, or serve on another port with --port")
    mobile = [f"{PROXY_HOST}:{proxy_port(n.ip)}" for n in nodes if n.tier == Tier.MOBILE]
    front.start(FRONT_DIR, f"{host}:{port}", mobile, [f"{PROXY_HOST}:{HEAD_PROXY_PORT}"])
    return f"http://{host}:{port}"


def front_retries() -> int | None:
    """The retry counters of the front doors `start_front` started, added up (deployments/front.py);
    None on loopback when none runs."""
    from deployments import front

    if not hosts.active():
        return front.retries(FRONT_DIR) if front.running(FRONT_DIR) else None
    code = f"from deployments import front; print(front.retries(__import__('pathlib').Path({str(FRONT_DIR)!r})))"
    return sum(int(subprocess.run([*hosts.enter(n.host), sys.executable, "-c", code], check=True, capture_output=True,
                                  text=True, timeout=60).stdout) for n in cluster_nodes() if n.tier == Tier.MOBILE)


def node_spec(tier: Tier, nodes: tuple[NodeSpec, ...] | None = None) -> NodeSpec:
    return next(node for node in nodes or cluster_nodes() if node.tier == tier)


def stop_node(tier: Tier, nodes: tuple[NodeSpec, ...] | None = None) -> int:
    """Lose a tier's node at once: SIGKILL its raylet and every process it started (the tier's
    replicas among them), with no drain and no goodbye to the GCS, as when the machine goes away.
    Returns how many processes were killed (0: the node was not running)."""
    return _kill_node(node_spec(tier, nodes).ip)


def stop_head() -> int:
    """Lose the head the same way: its raylet and what it started (Serve's controller and the head's
    proxy), the GCS, the dashboard and Ray's monitors. Returns how many processes were killed."""
    return _kill_node(head_ip(), head=True)


def _kill_node(ip: str, head: bool = False) -> int:
    import psutil

    flags = {f"--node_ip_address={ip}", f"--node-ip-address={ip}"}

    def on_node(cmdline: list[str]) -> bool:
        if head and cmdline and (cmdline[0].endswith("gcs_server") or any("monitor.py" in c for c in cmdline)):
            return True
        return bool(flags & set(cmdline)) and (head or cmdline[0].endswith("raylet"))

    roots = [p for p in psutil.process_iter(["cmdline"]) if on_node(p.info["cmdline"] or [])]
    victims = {q.pid: q for root in roots for q in [root, *root.children(recursive=True)]}
    for proc in victims.values():
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)
    return len(victims)


def start_prometheus(port: int = PROMETHEUS_PORT) -> str:
    """A Prometheus server scraping the running local cluster (Ray's own config for it), on loopback;
    returns its URL. Needs the `prometheus` binary (Debian's package: `scripts/install.sh --with-prometheus`)."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("`prometheus` is not installed: `./scripts/install.sh --with-prometheus` installs "
                           "Debian's package (or put a Prometheus 2.x binary on PATH)")
    if not RAY_PROMETHEUS_CONFIG.is_file():
        raise RuntimeError(f"{RAY_PROMETHEUS_CONFIG} not found: start the cluster first")
    check_port_free("127.0.0.1", port, "another Prometheus or program holds it")
    stop_prometheus()
    PROMETHEUS_DIR.mkdir(parents=True, exist_ok=True)
    with open(PROMETHEUS_DIR / "prometheus.log", "w") as log_file:
        proc = subprocess.Popen([binary, f"--config.file={RAY_PROMETHEUS_CONFIG.resolve()}",
                                 f"--storage.tsdb.path={PROMETHEUS_DIR / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
    (PROMETHEUS_DIR / "pid").write_text(str(proc.pid))
    return f"http://127.0.0.1:{port}"


def stop_prometheus() -> None:
    stop_pid_file(PROMETHEUS_DIR / "pid", "prometheus")


def down() -> None:
    """Stop every Ray process on this machine (all nodes of the local cluster share it), and the
    front door, Redis and Prometheus servers started for it."""
    from deployments import front

    hosts.down()  # namespaced hosts, if up: every process in them
    stop_prometheus()
    front.stop(FRONT_DIR)
    _ray("stop", "--force")
    stop_redis()
