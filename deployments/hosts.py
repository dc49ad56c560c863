"""Hosts that share nothing but a network, on one machine (root only): `dimee cluster up --hosts netns`.

Each host is a network namespace `dimee-<name>` with its own address on the bridge `dimee-br0`
(10.77.0.0/24; this machine is 10.77.0.1 there, so clients reach the hosts through the bridge).
A tier host also has its own mount namespace: a private /tmp (so its own /tmp/ray and its own
weight cache), a private /dev/shm (its own object store) and no view of the artifacts: the
repository's `artifacts/` is hidden, and so is every other folder of the machine's /tmp. What it
still sees is the installed software, the repository's code and virtual environment, as every
machine of a real cluster has its own copy of them. The head has its own network only: it
stands for the machine you run `dimee` on, whose disk holds the artifact and whose /tmp/ray is
the one drivers read.

Each host's processes also share one CPU group (cgroup `dimee-<name>`, equal weights), as separate
machines do not take each other's CPU: without it, the dozen processes of a head started again
outran the mobile host's ingress on this machine's cores for seconds.

The link between two hosts can be cut and restored (deployments/links.py): a network partition.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

BRIDGE, GATEWAY, PREFIX = "dimee-br0", "10.77.0.1", 24
STATE = Path("/run/dimee-hosts")  # hosts.json, each tier host's mount-namespace file, the shaped links
LINKS_PID = STATE / "links.pid"  # the shaped links' forwarder (deployments/links.py)
NETNS_DIR = Path("/run/netns")
REPO = Path(__file__).resolve().parents[1]
CLONE_NEWNET = 0x40000000


def _cpu_cgroups() -> Path | None:
    """Where CPU groups are made: cgroup v1's cpu hierarchy, or v2's root if its cpu controller is
    handed down; None if neither (the hosts then share the CPU as any processes do)."""
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    if (v1 / "cpu.shares").exists():
        return v1
    control = v2 / "cgroup.subtree_control"
    return v2 if control.exists() and "cpu" in control.read_text().split() else None


def netns(name: str) -> str:
    return f"dimee-{name}"


def active() -> dict[str, str] | None:
    """{host name: address} of the namespaced hosts that are up, or None."""
    path = STATE / "hosts.json"
    return json.loads(path.read_text()) if path.is_file() else None


def inside() -> str | None:
    """The host this process runs in (its network namespace), or None for the machine itself."""
    here = os.stat("/proc/self/ns/net").st_ino
    for name in active() or {}:
        path = NETNS_DIR / netns(name)
        if path.exists() and os.stat(path).st_ino == here:
            return name
    return None


def join(name: str | None) -> None:
    """Move this thread, and the threads and processes it starts from now on, into host `name`'s
    network (None: the machine's own, as this process was started). A Ray driver must run on the
    head's network: Ray finds the driver's node by the address it reaches the cluster from."""
    global _machine
    if name is None and _machine is None:  # never left it (and a user who is not root may not setns)
        return
    if _machine is None:
        _machine = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    fd = os.open(NETNS_DIR / netns(name), os.O_RDONLY) if name else _machine
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into host {name or 'machine'} failed")
    finally:
        if name:
            os.close(fd)


_machine: int | None = None  # the machine's own network, kept open by the first `join`


def join_head() -> None:
    """Where a Ray driver of the local cluster runs: on the head's network when the namespaced
    hosts are up (a no-op otherwise, or when there already)."""
    if active() is not None and inside() != "head":
        join("head")


def enter(name: str) -> list[str]:
    """The command prefix that runs a command on host `name` (its network, and for a tier host its
    files)."""
    mounts = STATE / f"{name}.mnt"
    prefix = ["nsenter", f"--net={NETNS_DIR / netns(name)}"] + ([f"--mount={mounts}"] if mounts.exists() else [])
    group = _cpu_cgroups()
    if group is not None and (group / netns(name)).is_dir():
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group / netns(name)), *prefix]
    return prefix


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result


def up(hosts: dict[str, str], private: set[str]) -> None:
    """Create the bridge and a host per entry of `hosts` ({name: address}); those in `private` also
    get their own files (tier hosts)."""
    if os.geteuid() != 0:
        raise PermissionError("--hosts netns needs root (network and mount namespaces); the loopback cluster "
                              "(the default) does not")
    down()
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{GATEWAY}/{PREFIX}", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    STATE.mkdir(parents=True, exist_ok=True)
    # a mount-namespace file must sit on a private mount
    run("mount", "--bind", str(STATE), str(STATE))
    run("mount", "--make-private", str(STATE))
    for name, ip in hosts.items():
        run("ip", "netns", "add", netns(name))
        veth = f"dv-{name}"[:15]
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns(name))
        run("ip", "link", "set", veth, "master", BRIDGE, "up")
        for cmd in (["ip", "addr", "add", f"{ip}/{PREFIX}", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                    ["ip", "link", "set", "lo", "up"]):
            run("ip", "netns", "exec", netns(name), *cmd)
        if name in private:
            _private_files(name)
        if _cpu_cgroups() is not None:
            (_cpu_cgroups() / netns(name)).mkdir(exist_ok=True)
    (STATE / "hosts.json").write_text(json.dumps(hosts))


def _private_files(name: str) -> None:
    """A mount namespace, kept in STATE/<name>.mnt, with a fresh /tmp and /dev/shm and no artifacts;
    the repository and the interpreter's environment stay where they are when they live under /tmp."""
    paths = {str(REPO), sys.prefix}
    keep = sorted(p for p in paths if p.startswith("/tmp/") and not any(p.startswith(q + "/") for q in paths))
    script = ["set -e", "mkdir -p /run/dimee-keep"]
    for k, path in enumerate(keep):
        script += [f"mkdir -p /run/dimee-keep/{k}", f"mount --bind {path} /run/dimee-keep/{k}"]
    script += ["mount -t tmpfs tmpfs /tmp", "mount -t tmpfs tmpfs /dev/shm"]
    for k, path in enumerate(keep):
        script += [f"mkdir -p {path}", f"mount --move /run/dimee-keep/{k} {path}"]
    if (REPO / "artifacts").is_dir():
        script.append(f"mount -t tmpfs tmpfs {REPO / 'artifacts'}")
    mounts = STATE / f"{name}.mnt"
    mounts.touch()
    run("unshare", f"--mount={mounts}", "--propagation", "private", "sh", "-c", "; ".join(script))


def pids(name: str) -> list[int]:
    out = run("ip", "netns", "pids", netns(name), check=False).stdout
    return [int(p) for p in out.split()]


def down() -> None:
    """Kill every process in the hosts and remove them and the bridge."""
    if os.geteuid() != 0:  # only root makes them
        return
    import psutil

    from deployments.processes import stop_pid_file

    stop_pid_file(LINKS_PID, "python")  # its devices, and so the links, go with it
    for path in STATE.glob("links.*") if STATE.is_dir() else []:
        path.unlink()

    for path in sorted(NETNS_DIR.glob("dimee-*")) if NETNS_DIR.is_dir() else []:
        name = path.name.removeprefix("dimee-")
        procs = []
        for pid in pids(name):
            try:
                procs.append(psutil.Process(pid))
                procs[-1].kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        run("ip", "netns", "del", path.name, check=False)
    for group in _cpu_cgroups().glob("dimee-*") if _cpu_cgroups() is not None else []:
        try:
            group.rmdir()
        except OSError:  # a process outside the namespace still in it: the group goes with the next `down`
            pass
    for line in run("ip", "-o", "link", "show", "type", "veth", check=False).stdout.splitlines():
        veth = line.split(":")[1].strip().split("@")[0]
        if veth.startswith("dv-"):  # one whose namespace something still holds
            run("ip", "link", "del", veth, check=False)
    for mounts in STATE.glob("*.mnt") if STATE.is_dir() else []:
        run("umount", str(mounts), check=False)
        mounts.unlink(missing_ok=True)
    (STATE / "hosts.json").unlink(missing_ok=True)
    if STATE.is_dir():
        run("umount", str(STATE), check=False)
    run("ip", "link", "del", BRIDGE, check=False)
