"""The ways an artifact's file can reach a tier node, timed on the running local cluster (best on
namespaced hosts, where the node has no view of the head's disk): a task on the cloud node gets
the file (into its own /tmp) by

- `store`: deployments/weights.py's way: chunks read on demand from the head's disk by the store
  actor, through Ray's object store;
- `owned`: one object put by a detached actor on the head that keeps it (an owner that lives), so
  the bytes sit in the head's object store for as long as the artifact is served;
- `s3`: a storage URI, here moto's S3-compatible server on the head (the production path beside it).

    python -m load.weights_bench ARTIFACT --file cloud.safetensors --repeats 3 --out runs/weights-bench.json
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray

from deployments import hosts, local_cluster, weights
from dimee_models.tiers import Tier
from load.client import emit


@ray.remote(num_cpus=0)
class Owner:
    """Holds one file's bytes in the object store for as long as it lives."""

    def __init__(self, path: str):
        self.ref = ray.put(Path(path).read_bytes())

    def get(self) -> list:
        return [self.ref]  # inside a list: the caller gets the reference, not a copy through this actor


@ray.remote(num_cpus=0, label_selector=Tier.CLOUD.label_selector)
def fetch_on_cloud(how: str, source: str, name: str, handle=None) -> dict:
    """Get `name` the `how` way into this node's /tmp; seconds and bytes."""
    began = time.monotonic()
    out = Path("/tmp") / f"bench-{os.getpid()}-{name}"
    with open(out, "wb") as dest:
        if how == "owned":
            dest.write(ray.get(ray.get(handle.get.remote())[0]))
        else:
            weights.Source(source).copy(name, dest, ray.get_runtime_context().get_node_id())
    seconds = time.monotonic() - began
    size = out.stat().st_size
    out.unlink()
    return {"seconds": round(seconds, 3), "bytes": size, "node": ray.util.get_node_ip_address()}


def moto_on_head(artifact: Path) -> tuple[subprocess.Popen, str]:
    """moto's server on the head's address, holding a copy of the artifact; its URI."""
    host = local_cluster.head_ip()
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    from pyarrow import fs

    uri = f"s3://bench/art?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    s3, path = fs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")
    s3.create_dir("bench")
    fs.copy_files(str(artifact), path, destination_filesystem=s3)
    return proc, uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--file", default="cloud.safetensors", help="the artifact's file to move (default cloud.safetensors)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    artifact = args.artifact.resolve()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    local_cluster.connect(runtime_env={"env_vars": {k: os.environ[k]
                                                    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    moto, uri = moto_on_head(artifact)
    try:
        weights.store()
        owner = Owner.options(label_selector={weights.HEAD_LABEL_KEY: weights.HEAD_LABEL_VALUE}).remote(
            str(artifact / args.file))
        runs = {how: [ray.get(fetch_on_cloud.remote(how, source, args.file, owner)) for _ in range(args.repeats)]
                for how, source in (("store", str(artifact)), ("owned", str(artifact)), ("s3", uri))}
    finally:
        moto.terminate()
        ray.shutdown()
    result = {"hosts": "netns" if hosts.active() else "loopback", "file": args.file, "runs": runs,
              "median_s": {how: sorted(r["seconds"] for r in rs)[len(rs) // 2] for how, rs in runs.items()}}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
