"""Hop overhead of the serving path: the round trip of one Serve handle call to a tier replica minus
the layer compute the replica reports (`TierReply.compute_ms`), at p50 and p99, one text at a time.

    dimee cluster up && dimee serve artifacts/rt-polarity
    python load/hop_bench.py --artifact artifacts/rt-polarity --requests 200 --json runs/hops.json

Hops measured, each from a driver on the head node (where the router runs), over the same handle
transport as the router (gRPC unless RAY_SERVE_USE_GRPC_BY_DEFAULT=0, as `dimee cluster up`):
  noop            a call of the mobile replica's `describe`: Serve's own cost of one hop
  mobile_tokens   token ids in, layer-m hidden state stored in the object store (ray.put) out
  edge_hidden     the stored hidden state in (fetched from the mobile node's object store)
  cloud_hidden    the same, on the cloud replica
  cloud_tokens    token ids in (the cloud_only path)
  http_mobile_only  POST /v1/classify with policy mobile_only: HTTP proxy -> router -> mobile, minus
                    the mobile compute of a mobile_tokens call for the same text just before
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import ray
import requests
from ray import serve

from deployments import local_cluster
from deployments.schemas import TierRequest
from dimee_models import artifact

HOPS = ("noop", "mobile_tokens", "edge_hidden", "cloud_hidden", "cloud_tokens", "http_mobile_only")
WARMUP = 10


def measure(handles: dict, ids: list[int]) -> dict[str, tuple[float, float]]:
    """(round trip ms, compute ms) of each hop for one text."""
    out = {}

    def call(name: str, tier: str, request: TierRequest):
        began = time.perf_counter()
        reply = handles[tier].remote(request).result(timeout_s=60)
        out[name] = ((time.perf_counter() - began) * 1000, reply.compute_ms)
        return reply

    began = time.perf_counter()
    handles["mobile"].describe.remote().result(timeout_s=60)
    out["noop"] = ((time.perf_counter() - began) * 1000, 0.0)
    mobile = call("mobile_tokens", "mobile", TierRequest(input_ids=[ids], keep_hidden=True))
    call("edge_hidden", "edge", TierRequest(hidden=mobile.hidden, rows=[0]))
    call("cloud_hidden", "cloud", TierRequest(hidden=mobile.hidden, rows=[0]))
    call("cloud_tokens", "cloud", TierRequest(input_ids=[ids]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True, help="the artifact being served (for its test texts)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--address", default=None, help="Ray address (default: the local cluster's)")
    p.add_argument("--app", default="dimee", help="Serve application name")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    tokenizer = artifact.load_tokenizer(args.artifact)
    texts = artifact.load_split(args.artifact, "test").texts[: args.requests + WARMUP]
    os.environ.update(local_cluster.SERVE_ENV)  # read by the handles this driver creates
    ray.init(address=args.address or local_cluster.address(), logging_level=logging.WARNING, log_to_driver=False)
    handles = {t: serve.get_deployment_handle(f"{t.capitalize()}Tier", app_name=args.app) for t in artifact.TIERS}
    session = requests.Session()
    samples = {hop: [] for hop in HOPS}
    for i, text in enumerate(texts):
        ids = tokenizer(text, truncation=True, max_length=256)["input_ids"]
        hops = measure(handles, ids)
        began = time.perf_counter()
        session.post(f"{args.url}/v1/classify", json={"texts": [text], "policy": "mobile_only"},
                     timeout=60).raise_for_status()
        hops["http_mobile_only"] = ((time.perf_counter() - began) * 1000, hops["mobile_tokens"][1])
        if i >= WARMUP:
            for hop, (total, compute) in hops.items():
                samples[hop].append((total, compute))
    ray.shutdown()

    result = {}
    print(f"{'hop':>18} {'n':>5} {'total p50':>10} {'compute p50':>12} {'overhead p50':>13} {'overhead p99':>13}")
    for hop, rows in samples.items():
        total, compute = np.array(rows).T
        overhead = total - compute
        result[hop] = {"n": len(rows), "total_p50_ms": float(np.median(total)), "compute_p50_ms": float(np.median(compute)),
                       "overhead_p50_ms": float(np.percentile(overhead, 50)),
                       "overhead_p99_ms": float(np.percentile(overhead, 99))}
        r = result[hop]
        print(f"{hop:>18} {r['n']:5d} {r['total_p50_ms']:10.1f} {r['compute_p50_ms']:12.1f} "
              f"{r['overhead_p50_ms']:13.1f} {r['overhead_p99_ms']:13.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
