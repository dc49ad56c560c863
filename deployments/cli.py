"""The `dimee` command: the model commands of `dimee_models.cli` plus the serving commands
(`up`, `down`, `cluster up|down`, `serve`, `profile`), which need Ray and so live here."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from deployments import hosts
from dimee_models import cli as model_cli
from dimee_models.tiers import TIER_NAMES, Tier

DEFAULT_ARTIFACT = Path("artifacts/default")
QUICK_EPOCHS = 3  # the first `dimee up` trains this many epochs so it finishes within 15 minutes
HA_HELP = ("with up: keep the GCS's state in a Redis server (`redis-server`, Debian's), so that the head can be lost "
           "and come back (`dimee cluster head-down`, `head-up`) with no redeploy while the mobile node answers")
METRICS_HELP = ("with up: also start a Prometheus server on http://127.0.0.1:9090 scraping every node (import "
                "deployments/grafana/dimee.json into Grafana to look at it); `dimee down` stops it")


def _env_var_set(name: str) -> str:
    if not os.environ.get(name):
        raise argparse.ArgumentTypeError(f"environment variable {name!r} is unset or empty")
    return name


def _port(value: str) -> int:
    port = model_cli.positive_int(value)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {value!r}")
    return port


def _share(value: str) -> float:
    share = float(value)
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return share


UP_REPLICAS = {"mobile": 2, "cloud": 2}  # `dimee up`'s, on the local cluster (0.5 CPU each)


def add_serve_flags(p) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: the local cluster's)")
    p.add_argument("--wait-for-nodes", type=float, default=0, metavar="SECONDS",
                   help="wait this long for nodes carrying every tier label to join before deploying")
    p.add_argument("--policy", default=None, help="stored policy to serve (default: the artifact's default)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    p.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--proxy-location", choices=("HeadOnly", "EveryNode"), default="HeadOnly",
                   help="on a cluster other than the local one: HTTP proxies on the head only, or on every node with "
                        "a replica, so clients can send to a mobile node and an easy sample never leaves it (the "
                        "local cluster has one per node, behind its front door on --host:--port)")
    # the name of a variable, not the key: a key on the command line would show in `ps` and shell history
    p.add_argument("--api-key-env", type=_env_var_set, default=None, metavar="VAR",
                   help="require the API key held in this environment variable in the X-API-Key header")
    p.add_argument("--mobile-replicas", type=model_cli.positive_int, default=1,
                   help="replicas of the mobile tier, which is the HTTP ingress (each runs the mobile slice; default "
                        f"1, with `dimee up` {UP_REPLICAS['mobile']})")
    p.add_argument("--edge-replicas", type=model_cli.positive_int, default=1, help="replicas of the edge tier (default 1)")
    p.add_argument("--cloud-replicas", type=model_cli.positive_int, default=1,
                   help=f"replicas of the cloud tier (default 1, with `dimee up` {UP_REPLICAS['cloud']})")
    p.add_argument("--hop-timeout", type=model_cli.positive_float, default=None, metavar="SECONDS",
                   help="longest wait for one tier call before falling back (default 2)")
    p.add_argument("--request-timeout", type=model_cli.positive_float, default=None, metavar="SECONDS",
                   help="a request's deadline, across all its tier calls (default 3)")
    p.add_argument("--max-texts-in-flight", type=model_cli.positive_int, default=None, metavar="N",
                   help="texts each ingress replica works on at once; a request past it gets 503 (default 64)")
    p.add_argument("--shadow-rate", type=_share, default=None, metavar="SHARE",
                   help="share of routed samples checked against the final exit after their answer has gone out, "
                        "for the live bound (default 0.02; 0: off)")
    p.add_argument("--policy-artifact", type=Path, default=None, metavar="DIR",
                   help="route with the policies of this recalibrated copy of the artifact (e.g. `dimee calibrate "
                        "COPY --from-traffic LOG`); its tier weights must be the artifact's")
    p.add_argument("--shadow-log", default=None, metavar="DIR",
                   help="append the shadow-checked texts to this directory on the head's disk, for `dimee "
                        "calibrate --from-traffic` (they hold what clients sent: off unless set)")
    p.add_argument("--on-drift", choices=("tighten", "alarm"), default=None,
                   help="when the live bound shows the budget broken: step back to a safer setting (tighten, the "
                        "default) or only report it (alarm)")
    p.add_argument("--cost-profile", type=Path, default=None, metavar="FILE",
                   help="report each answer's cost in ms from this cluster profile (`dimee profile`) instead of the "
                        "policy's cost model; the metric dimee_answer_cost and /v1/info's served_cost show the mean")


def add_hosts_flags(p) -> None:
    p.add_argument("--hosts", choices=("loopback", "netns"), default="loopback",
                   help="with up: the local cluster's nodes on loopback addresses of this machine (default), or each "
                        "on a host of its own that shares nothing but a network with the others (root only: network "
                        "and mount namespaces; docs/DEPLOYING.md)")
    p.add_argument("--mobile-hosts", type=int, choices=(1, 2), default=1,
                   help="with --hosts netns: how many mobile hosts (default 1)")
    p.add_argument("--links", type=_links_arg, default=None, metavar="lan|mobile|FILE",
                   help="with --hosts netns: give the hosts of each pair of tiers this network's round trip and "
                        "bandwidth (a preset, or a JSON file {mobile_edge, mobile_cloud, edge_cloud: {rtt_ms, "
                        "mbit_s}}; docs/DEPLOYING.md); default: the bridge, unshaped")


def _links_arg(value: str):
    from dimee_models.profile import read_links

    try:
        return read_links(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--links {value}: ")) from None


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="deploy a calibrated artifact onto a running cluster")
    p.add_argument("dir", type=Path)
    add_serve_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cluster", help="start or stop a local cluster (a head, then a node per tier), or lose "
                                       "one tier's node and bring it back")
    p.add_argument("action", choices=("up", "down", "node-down", "node-up", "head-down", "head-up", "link-down",
                                       "link-up", "links"))
    p.add_argument("tier", nargs="*", metavar="TIER",
                   help="with node-down and node-up: whose node; with link-down and link-up (--hosts netns): the two "
                        "hosts whose link to cut or restore, e.g. mobile cloud; `links` measures each shaped link")
    p.add_argument("--metrics", action="store_true", help=METRICS_HELP)
    p.add_argument("--ha", action="store_true", help=HA_HELP)
    add_hosts_flags(p)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("up", help="train and calibrate the default model if absent, start the local cluster, serve")
    p.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT, help=f"artifact to serve (default {DEFAULT_ARTIFACT})")
    p.add_argument("--dataset", default="rt-polarity", help="dataset for the default model when it must be trained")
    p.add_argument("--epochs", type=model_cli.positive_int, default=QUICK_EPOCHS,
                   help=f"epochs for the default model when it must be trained (default {QUICK_EPOCHS})")
    p.add_argument("--no-cluster", action="store_true",
                   help="deploy onto the running cluster (--address) instead of starting the local one")
    p.add_argument("--metrics", action="store_true", help=METRICS_HELP)
    p.add_argument("--ha", action="store_true", help=HA_HELP)
    add_hosts_flags(p)
    p.add_argument("--no-tune", action="store_true",
                   help="serve the policy calibrated for the paper's abstract cost at the trained tier boundaries, "
                        "instead of measuring the cluster and calibrating boundaries and thresholds for its latency")
    p.add_argument("--mobile-layers", type=model_cli.layer_range, default=None, metavar="RANGE",
                   help="when tuning: layers the mobile exit may be at, e.g. 1-4 (default any)")
    p.add_argument("--edge-layers", type=model_cli.layer_range, default=None, metavar="RANGE",
                   help="when tuning: layers the edge exit may be at (default any)")
    add_serve_flags(p)
    # the local cluster's cores for the modes it serves: the tuned policy's layers in the ingress,
    # cloud_only's in the cloud (one replica of each left the other core idle: rps 0.97 at 16 texts)
    p.set_defaults(func=cmd_up, mobile_replicas=UP_REPLICAS["mobile"], cloud_replicas=UP_REPLICAS["cloud"])

    p = sub.add_parser("down", help="stop the local cluster and everything it serves")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("profile", help="measure a running deployment (per-tier layer compute, hop costs, the fixed "
                                       "per-request cost) and write its cost profile for --cost-profile")
    p.add_argument("--address", default=None, help="Ray cluster address (default: the local cluster's)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the deployment's HTTP address")
    p.add_argument("--app", default="dimee", help="Serve application name")
    p.add_argument("--texts", type=model_cli.positive_int, default=100,
                   help="texts of the served artifact's test split to measure, one at a time (default 100)")
    p.add_argument("--batch", type=model_cli.positive_int, default=16,
                   help="texts per call in the batched compute measurement (default 16)")
    p.add_argument("--api-key-env", type=_env_var_set, default=None, metavar="VAR",
                   help="the environment variable holding the API key, if the deployment requires one")
    p.add_argument("--links", default=None, metavar="lan|mobile|FILE",
                   help="store the network between tiers of a real deployment with the measured hops (a preset, or "
                        "a JSON file {mobile_edge, mobile_cloud, edge_cloud: {rtt_ms, mbit_s}})")
    p.add_argument("--out", type=Path, default=Path("profile.json"), help="where to write it (default profile.json)")
    p.set_defaults(func=cmd_profile)


def cmd_cluster(args) -> int:
    if args.action == "down":
        return cmd_down(args)
    from deployments import local_cluster

    if args.action == "up":
        address = local_cluster.up(ha=args.ha, netns=args.hosts == "netns", links=args.links,
                                   nodes=local_cluster.netns_nodes(args.mobile_hosts) if args.hosts == "netns" else None)
        print(f"cluster up at {address}" + (" (head fault tolerant: GCS on Redis)" if args.ha else ""))
        if args.metrics:
            print(f"Prometheus at {local_cluster.start_prometheus()}")
        return 0
    if args.action in ("head-down", "head-up"):
        if not (local_cluster.REDIS_DIR / "namespace").is_file():
            raise ValueError(f"{args.action}: the local cluster was not started with --ha, so its head cannot come "
                             "back (`dimee cluster up --ha`)")
        if args.action == "head-down":
            print(f"head down ({local_cluster.stop_head()} processes killed); the mobile node keeps answering")
            return 0
        local_cluster.start_head()
        print(f"head up at {local_cluster.address()}; Serve's controller recovers the application from Redis")
        return 0
    if args.action == "links":
        from deployments import links

        if not links.active():
            raise ValueError("links: no shaped links are up (`dimee cluster up --hosts netns --links lan|mobile|FILE`)")
        print("link              configured             measured")
        for pair in links.active():
            got = links.check(pair["a"], pair["b"])
            print(f"{pair['a'] + ' -> ' + pair['b']:<17} {pair['rtt_ms']:7.2f} ms {pair['mbit_s']:7.1f} Mbit/s "
                  f"{got['rtt_ms']:7.2f} ms {got['mbit_s']:7.1f} Mbit/s")
        return 0
    if args.action in ("link-down", "link-up"):
        from deployments import links

        if len(args.tier) != 2:
            raise ValueError(f"{args.action} needs the two hosts whose link to cut or restore, e.g. mobile cloud")
        links.link(*args.tier, up_=args.action == "link-up")
        print(f"link {' <-> '.join(args.tier)} {args.action.removeprefix('link-')}")
        return 0
    if len(args.tier) != 1 or args.tier[0] not in TIER_NAMES:
        raise ValueError(f"{args.action} needs the tier whose node to take down or bring back, "
                         f"one of {', '.join(TIER_NAMES)}" + (f", not {' '.join(args.tier)}" if args.tier else ""))
    tier = Tier.named(args.tier[0])
    if args.action == "node-down":
        killed = local_cluster.stop_node(tier)
        print(f"{tier.label} node down ({killed} processes killed)" if killed else f"{tier.label} node was not running")
        return 0
    check_cluster_answers(local_cluster.address())
    local_cluster.start_node(local_cluster.node_spec(tier))
    print(f"{tier.label} node up at {local_cluster.node_ip(tier)}")
    return 0


def cmd_down(args) -> int:
    from deployments import local_cluster

    local_cluster.down()
    print("cluster down")
    return 0


def _host_port(address: str) -> tuple[str, str]:
    """HOST:PORT, also Ray's client address ray://HOST:PORT."""
    host, _, port = address.split("://")[-1].rpartition(":")
    return host, port


def check_cluster_answers(address: str, timeout_s: float = 3.0) -> None:
    """Ray's client retries an address where nothing listens, or that refuses its token, for
    half a minute to minutes, with C++ warnings: refuse within seconds instead, saying what to do."""
    import socket

    if address == "auto":
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        raise ValueError(f"no Ray cluster answers at {address}: start the local one with `dimee cluster up` "
                         "(or use `dimee up`), or pass --address HOST:PORT of a running cluster's head") from None
    if "://" not in address and _gcs_refuses_token(address, timeout_s):
        raise ValueError(f"the Ray cluster at {address} uses token authentication and refused this machine's "
                         "token: export RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token "
                         "(or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)")


def _gcs_refuses_token(address: str, timeout_s: float) -> bool:
    """One call to the GCS answers in under a second, unlike `ray.init`'s retries. Anything but a
    token refusal (a slow or odd server) is left to `ray.init` to report."""
    import threading

    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    refused = threading.Event()

    def probe() -> None:
        try:
            GcsClient(address=address)
        except AuthenticationError:
            refused.set()
        except Exception:  # not a token refusal: ray.init reports it, see above
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return refused.is_set()


def head_is_here(address: str) -> bool:
    """The local cluster's head, or `auto` on a head node: its HTTP proxy binds on this machine."""
    import ipaddress

    try:
        return address == "auto" or ipaddress.ip_address(_host_port(address)[0]).is_loopback
    except ValueError:
        return False


def check_http_port(host: str, port: int) -> None:
    """Serve's proxy, on a port another program holds, fails after ~15 s with a traceback and stays
    half-started. A port held by this cluster's own proxy (a redeploy) is fine."""
    import urllib.request

    from deployments import local_cluster

    try:
        local_cluster.check_port_free(host, port, "another program holds it: stop it, or serve on another port "
                                                  "with --port")
    except ValueError:
        try:
            with urllib.request.urlopen(f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/-/healthz",
                                        timeout=2) as reply:
                if reply.read() == b"success":  # what Serve's proxy answers there
                    return
        except OSError:
            pass
        raise


def cmd_serve(args) -> int:
    from deployments import front, local_cluster
    from deployments.placement import check_placement
    from dimee_models import artifact

    artifact.read_manifest(args.dir)  # before any cluster work: a wrong path is refused in a second
    router = {k: v for k, v in (("hop_timeout_s", args.hop_timeout), ("request_timeout_s", args.request_timeout),
                                ("max_texts_in_flight", args.max_texts_in_flight), ("shadow_rate", args.shadow_rate),
                                ("shadow_log", args.shadow_log), ("on_drift", args.on_drift),
                                ("policy_artifact", args.policy_artifact and str(args.policy_artifact.resolve())))
              if v is not None}
    if args.cost_profile is not None:
        from dimee_models.profile import latency_cost_model, read_profile

        router["cost_model"] = latency_cost_model(read_profile(args.cost_profile)).model_dump()
    address = args.address or local_cluster.address()
    local = address == local_cluster.address()
    if local:  # every node's Serve proxy on its own port, behind the front door on host:port
        http_options, proxy_location = local_cluster.proxy_http_options(), "EveryNode"
        if front.running(local_cluster.FRONT_DIR) is None:
            check_http_port(args.host, args.port)
    else:
        http_options, proxy_location = {"host": args.host, "port": args.port}, args.proxy_location
        if head_is_here(address):
            check_http_port(args.host, args.port)
    hosts.join_head()  # namespaced hosts: the check from the head's network, where connect puts the driver
    check_cluster_answers(address)
    local_cluster.connect(address)
    wait_for_tiers(args.wait_for_nodes)
    check_placement()  # before Serve starts on a cluster it cannot use
    # Only now the app, with torch and transformers: the checks above answer before those imports.
    from ray import serve

    from deployments.app import build_app, check_artifact
    from deployments.schemas import AppArgs

    app_args = AppArgs(
        artifact=str(args.dir.resolve()), policy=args.policy,
        mobile={"num_replicas": args.mobile_replicas}, edge={"num_replicas": args.edge_replicas},
        cloud={"num_replicas": args.cloud_replicas},
        api_key=os.environ[args.api_key_env] if args.api_key_env else None,
        router=router,
    )
    check_artifact(app_args)
    serve.start(http_options=http_options, proxy_location=proxy_location)
    serve.run(build_app(app_args), name="dimee", route_prefix="/")
    url = local_cluster.start_front(args.host, args.port) if local else f"http://{args.host}:{args.port}"
    print(f"serving {args.dir} at {url}  (OpenAPI docs: {url}/docs)")
    key_header = f"-H \"X-API-Key: ${args.api_key_env}\" " if args.api_key_env else ""
    print(f"try: curl -s {url}/v1/classify -H 'Content-Type: application/json' {key_header}"
          "-d '{\"texts\": [\"a gorgeous, witty, seductive movie.\", \"the plot is a mess.\"]}'")
    return 0


def wait_for_tiers(seconds: float) -> None:
    """Nodes of a freshly launched cluster join over minutes; deploy once every tier has one
    (then a missing one is refused, with the label it lacks)."""
    from deployments.placement import missing_tiers

    deadline = time.time() + seconds
    while time.time() < deadline and missing_tiers():
        time.sleep(5)


def cmd_up(args) -> int:
    from deployments import local_cluster
    from dimee_models.artifact import read_manifest

    trained = (args.artifact / "manifest.json").is_file()
    if not trained and args.artifact.exists() and (args.artifact.is_file() or any(args.artifact.iterdir())):
        raise ValueError(f"--artifact {args.artifact} is not a DIMEE artifact (no manifest.json) and not an empty "
                         "folder: pass an artifact, or a new folder to train the default model into")
    if not args.no_cluster:  # ports first: in seconds, not after training and a cluster start
        local_cluster.down()  # a stale cluster from an earlier run would hold them
        local_cluster.check_head_ports()
        check_http_port(args.host, args.port)
    if not trained:
        from dimee_models.train import TrainConfig, train

        print(f"no artifact at {args.artifact}: training a {args.epochs}-epoch {args.dataset} model (cached there)")
        train(TrainConfig(dataset=args.dataset, epochs=args.epochs), args.artifact)
    from dimee_models.cost import CostModel
    from dimee_models.calibration import write_calibration
    from dimee_models.policy import load_policies

    manifest = read_manifest(args.artifact)
    stored = load_policies(args.artifact)[1].cost_model if manifest.policy is not None else None
    if stored is None or (args.no_tune and stored.unit != "abstract"):
        write_calibration(args.artifact, CostModel(), 0.3, pairs=[trained_exits(manifest)])
    if not args.no_cluster:
        netns = args.hosts == "netns"
        local_cluster.up(ha=args.ha, netns=netns, links=args.links,
                         nodes=local_cluster.netns_nodes(args.mobile_hosts) if netns else None)
        if args.metrics:
            print(f"Prometheus at {local_cluster.start_prometheus()}")
    hosts.join_head()  # namespaced hosts: a driver runs on the head's network
    args.dir = args.artifact
    if args.no_tune:
        return cmd_serve(args)
    return tune_and_serve(args)


def trained_exits(manifest) -> tuple[int, int]:
    from dimee_models.manifest import default_exits

    t = manifest.training
    default = default_exits(manifest.num_layers)
    return t.get("mobile_exit") or default[0], t.get("edge_exit") or default[1]


def tune_and_serve(args) -> int:
    """`dimee up`'s tuning: the cluster's profile (measured on the deployment, or the one kept with
    the artifact if the nodes are the same), then boundaries and thresholds calibrated for its
    latency, then the deployment of that; an artifact already tuned for this profile is served at once."""
    import ray

    from deployments.profile import describe_nodes, format_profile, run_profile
    from dimee_models.artifact import CLUSTER_PROFILE, read_manifest
    from dimee_models.boundaries import boundary_pairs
    from dimee_models.calibration import wire_cost, write_calibration
    from dimee_models.policy import load_policies
    from dimee_models.profile import latency_cost_model, read_profile, wire_savings, write_profile

    from deployments import links as shaped_links
    from deployments import local_cluster

    path = args.artifact / CLUSTER_PROFILE  # reused while the cluster's nodes are the same
    local_cluster.connect(args.address)
    nodes = describe_nodes()
    ray.shutdown()
    profile = read_profile(path) if path.is_file() else None
    if profile is not None and (_node_kinds(profile.nodes) != _node_kinds(nodes)
                                or profile.measured_across != shaped_links.network()):
        print(f"the cluster's nodes or links differ from those {path} was measured on: measuring again")
        profile = None
    latency = latency_cost_model(profile) if profile is not None else None
    doc = load_policies(args.artifact)[1]
    if latency is not None and doc.boundaries is not None and doc.cost_model == wire_cost(
            latency, wire_savings(profile), doc.wire, doc.boundaries["mobile"]):
        return cmd_serve(args)
    if profile is None:
        cmd_serve(args)
        print("measuring the deployment for its cost profile (dimee profile, ~1 min)")
        headers = {"X-API-Key": os.environ[args.api_key_env]} if args.api_key_env else {}
        front = local_cluster.cluster_nodes()[0].ip if local_cluster.hosts.active() else "127.0.0.1"
        profile = run_profile(f"http://{front}:{args.port}", "dimee", 100, 16, headers)
        from ray import serve

        serve.delete("dimee")  # its replicas hold the old tier weights; the same app args would not restart them
        ray.shutdown()
        write_profile(path, profile)
        print(format_profile(profile))
        latency = latency_cost_model(profile)
    pairs = boundary_pairs(read_manifest(args.artifact).num_layers, args.mobile_layers, args.edge_layers)
    doc = write_calibration(args.artifact, latency, 0.3, pairs=pairs, savings=wire_savings(profile),
                            mobile_slice=doc.wire.mobile_slice)  # as the artifact was calibrated (`--mobile-slice`)
    served = doc.policies[doc.default]
    print(f"tuned for the measured latency: {doc.default} at mobile exit {served['exits']['mobile']}, "
          f"edge exit {served['exits']['edge']} (thresholds {served['thresholds']}), {doc.wire.format} hidden "
          f"states, {doc.wire.carrier} to cloud")
    return cmd_serve(args)


def _node_kinds(nodes: list[dict]) -> list[tuple]:
    """What makes a profile stale: another node, tier or CPU count. Not memory: Ray sizes a node's
    memory from what is free when it starts, so it differs a little on every start."""
    return sorted((n["address"], n["tier"], n["cpus"]) for n in nodes)


def cmd_profile(args) -> int:
    import ray

    from deployments import links as shaped_links
    from deployments import local_cluster
    from deployments.profile import format_profile, run_profile
    from dimee_models.profile import read_links, write_profile

    links = read_links(args.links) if args.links is not None else None  # a bad one before any measuring
    if links is not None and shaped_links.network() is not None:
        raise ValueError("--links adds a network to hops measured without one, and this cluster's hosts are "
                         "linked already (`dimee cluster up --links`): measure without --links")
    address = args.address or local_cluster.address()
    hosts.join_head()  # namespaced hosts: the check from the head's network, where connect puts the driver
    check_cluster_answers(address)
    headers = {"X-API-Key": os.environ[args.api_key_env]} if args.api_key_env else {}
    local_cluster.connect(address)
    try:
        profile = run_profile(args.url.rstrip("/"), args.app, args.texts, args.batch, headers, links)
    finally:
        ray.shutdown()
    print(format_profile(profile))
    write_profile(args.out, profile)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return model_cli.main(argv, extra_commands=add_commands)


if __name__ == "__main__":
    sys.exit(main())
